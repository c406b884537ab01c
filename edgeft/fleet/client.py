"""The ClientApp edgeft ships: one device's part of a round, trained by edgeft's engine in its own subprocess.

On a `train` message it writes the round's global tensors to an .npz, runs the training job from them for the
round's local steps on the device's data (the ONNX Runtime training build, or the torch engine), and replies with
the trained tensors and its metrics; on `evaluate`, the validation loss of the global tensors on its own data.
Only trainable tensors and metrics leave the device. It imports no tokenizer and no transformers: a device
needs the training runtime, numpy, Flower and the files its federation file names.

In a simulation the device is the node's `partition-id`; a deployed node names its federation file in its node
config (`flower-supernode --node-config "federation='/path/node.json'"`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgeft.core.atomic import write_npz
from edgeft.core.errors import EdgeftError
from edgeft.fleet.federation import Federation, round_seed
from edgeft.runtime import jobs, launcher
from edgeft.trainer.schedule import learning_rate


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


# The local training options the server sends each round (ConfigRecord key: train option), so that every device
# of a run trains alike; a device checks them as it would a flag: a number, finite, in range.
SENT = {"lr": ("lr", float, 0.0), "schedule": ("schedule", str, None), "warmup-steps": ("warmup_steps", int, -1),
        "batch-size": ("batch_size", int, 0), "grad-accum": ("grad_accum", int, 0),
        "weight-decay": ("weight_decay", float, -1e-300), "max-grad-norm": ("max_grad_norm", float, -1e-300)}


def hyperparameters(train: dict, rounds: int, local_steps: int, seed: int) -> dict:
    """What the server sends each round (the reverse of `received`)."""
    sent = {key: (train[name] if train[name] is not None else 0.0) for key, (name, _, _) in SENT.items()}
    return sent | {"rounds": rounds, "local-steps": local_steps, "seed": seed}


def received(fed: Federation, config) -> Federation:
    """The federation with the round's options from the server's message, each checked."""
    train, rounds, local, seed = dict(fed.train), fed.rounds, fed.local_steps, fed.seed
    for key, (name, kind, above) in SENT.items():
        if key in config:
            value = config[key]
            if kind is str:
                if value not in ("cosine", "linear", "constant"):
                    raise EdgeftError(f"the server sent schedule {str(value)[:40]!r}; this device knows cosine, linear "
                                      "and constant")
            elif not isinstance(value, (int, float)) or not math.isfinite(value) or value <= above:
                raise EdgeftError(f"the server sent {key} {str(value)[:40]}, not a finite number above {above:g}")
            train[name] = kind(value) if not (name == "max_grad_norm" and value == 0) else None
    for key in ("rounds", "local-steps", "seed"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or value < (0 if key == "seed" else 1)):
            raise EdgeftError(f"the server sent {key} {str(value)[:40]}, not a count")
    rounds, local, seed = config.get("rounds", rounds), config.get("local-steps", local), config.get("seed", seed)
    return dataclasses.replace(fed, train=train, rounds=int(rounds), local_steps=int(local), seed=int(seed))


def job(fed: Federation, device: int, mode: str, weights_in: Path | None, weights_out: Path | None,
        server_round: int = 1, **options) -> jobs.Train:
    """The training job of one device for one round (`mode` train or evaluate), or, device 0 with mode "weights",
    the job that writes the adapter's initial tensors."""
    d = fed.devices[device]
    step = (server_round - 1) * fed.local_steps
    t = fed.train
    lr = learning_rate(step, t["lr"], fed.rounds * fed.local_steps, t["warmup_steps"], t["schedule"])
    config = t | {"max_steps": fed.local_steps, "lr": lr, "warmup_steps": 0, "schedule": "constant",
                  "seed": round_seed(fed.seed, server_round, device), "epochs": 1} | options
    job_type = jobs.Train if fed.backend == "ort" else jobs.TorchTrain
    work = Path(fed.work) / f"device-{device:05d}"
    return job_type(config=config, dataset=d.dataset, pad_token_id=d.pad_token_id, checkpoints=str(work / "unused"),
                    options={}, identity=fed.identity, data_key=d.data_key, config_hash="", artifacts=fed.artifacts,
                    work=str(work), model_dir=fed.model_dir, adapter_init=fed.adapter_init, device=fed.ep,
                    weights_in=str(weights_in) if weights_in else None,
                    weights_out=str(weights_out) if weights_out else None, mode=mode)


# One worker per runtime side and execution provider, kept for the life of this process (a simulation's actor runs
# round after round of any device; a deployed node's ClientApp process, one round): the runtime starts once.
_workers: dict[tuple[str, str], launcher.Worker] = {}


def close_workers() -> None:
    while _workers:
        _workers.popitem()[1].close()


def run_job(fed: Federation, device: int, mode: str, arrays: dict | None, server_round: int, **options) -> tuple:
    """Run one device's job on `arrays` (in this process's worker); (its result, the trained tensors or None)."""
    work = Path(fed.work)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"device-{device:05d}-", dir=work) as tmp:
        given = write_npz(Path(tmp) / "global.npz", arrays) if arrays is not None else None
        out = Path(tmp) / "trained.npz"
        the_job = job(fed, device, mode, given, out if mode != "evaluate" else None, server_round, **options)
        log = work / "logs" / f"device-{device:05d}-round-{server_round:04d}-{mode}.log"
        worker = _workers.setdefault((the_job.side, fed.ep), launcher.Worker(the_job.side, fed.ep))
        result = worker.run(the_job, log_path=log)
        return result, load_npz(out) if out.exists() else None


def client_app(federation: Path | None = None) -> ClientApp:
    """The ClientApp; `federation`: the file of every simulated device (None: the node config names it)."""
    app = ClientApp()

    def device_of(context: Context) -> tuple[Federation, int]:
        if federation is not None:
            return Federation.load(federation), int(context.node_config["partition-id"])
        path = context.node_config.get("federation")
        if not path:
            raise EdgeftError("this SuperNode has no federation file: start it with --node-config "
                              "\"federation='/path/node.json'\" (written by `edgeft fleet node`)")
        return Federation.load(Path(str(path))), 0

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fed, device = device_of(context)
        config = msg.content["config"]
        fed = received(fed, config)
        server_round = int(config["server-round"]) + int(config.get("round-offset", 0))
        options = {"proximal_mu": float(config["proximal-mu"])} if "proximal-mu" in config else {}
        result, trained = run_job(fed, device, "train", from_record(msg.content["arrays"]), server_round, **options)
        metrics = MetricRecord({"num-examples": int(result["train_samples"]), "train_loss": result["train_loss"],
                                "steps": int(result["steps"]), "tokens": int(result["tokens"]),
                                "seconds": float(result["seconds"]), "peak_rss_mb": float(result["peak_rss_mb"])})
        return Message(RecordDict({"arrays": to_record(trained), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        fed, device = device_of(context)
        config = msg.content["config"]
        server_round = int(config["server-round"]) + int(config.get("round-offset", 0))
        result, _ = run_job(fed, device, "evaluate", from_record(msg.content["arrays"]), server_round)
        metrics = {"num-examples": int(result["val_samples"])}
        if result["eval_loss"] is not None:
            metrics["eval_loss"] = float(result["eval_loss"])
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = client_app()  # a deployed node's ClientApp (`edgeft.fleet.client:app`)
