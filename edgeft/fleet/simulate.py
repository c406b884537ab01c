"""A fleet simulated on this machine with Flower's simulation engine: every device a ClientApp of its own,
training with edgeft's engine on its share of the data, the ServerApp aggregating.

The result is a training run like `edgeft train`'s: the final global adapter (and the round with the best
federated validation loss, marked best) as checkpoints in `WS/train/checkpoints/`, with the `train` record that
merge, package and eval read; the fleet's own record (`fleet` in the manifest) holds the rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeft.core import atomic, plots, state
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.data import formats
from edgeft.data.dataset import build, read_clean
from edgeft.fleet.config import FleetConfig
from edgeft.fleet.federation import Device, Federation
from edgeft.runtime import jobs, launcher
from edgeft.stages import train as train_stage
from edgeft.stages.prepare import Prepared
from edgeft.trainer import checkpoints
from edgeft.trainer.ort_engine import CHECKPOINT


@dataclass(frozen=True)
class Federated(Record):
    """What a fleet run recorded: its options, devices and rounds."""

    STAGE: ClassVar[str] = "fleet"
    config: FleetConfig = spec("the fleet's options")
    train: train_stage.TrainConfig = spec("each device's local training options")
    devices: int = spec("devices of the fleet")
    samples: list[int] = spec("training samples per device")
    rounds: int = spec("rounds completed")
    final_eval_loss: float | None = spec("federated validation loss of the final global adapter", None)
    best_round: int | None = spec("the round with the lowest federated validation loss", None)
    bytes_per_round: float = spec("mean bytes sent and received by the server per round", 0.0)
    seconds_per_round: float = spec("mean wall time per round", 0.0)
    wall_s: float = spec("wall time of the simulation", 0.0)
    metrics: str = spec("the per-round metrics log", "")
    plot: str = spec("the per-round plot", "")


def partition(data: Path, cfg: FleetConfig, out: Path) -> list[Path]:
    """Each device's training file: the JSONL files of `cfg.data_dir` (partition files), or `data` shuffled and
    dealt out evenly (iid)."""
    if cfg.partition == "files":
        folder = Path(cfg.data_dir)
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if not files:
            raise EdgeftError(f"data_dir {folder}: no .jsonl files there (one per device); point it at a folder of "
                              "them, or use partition: iid")
        return files
    records = [r.data for r in read_clean(data).records]
    if len(records) < cfg.clients:
        raise EdgeftError(f"{data} has {len(records)} records, fewer than --clients {cfg.clients}: every device needs "
                          "at least one; use fewer devices or more data")
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    files = []
    for i in range(cfg.clients):
        share = [records[j] for j in order[i::cfg.clients]]
        files.append(atomic.write_text(out / f"device-{i:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in share)))
    return files


def federation(ws: Workspace, cfg: FleetConfig, train_cfg, data: Path, log=print) -> Federation:
    """The federation of a simulated fleet: every device's data tokenized in the workspace's data cache."""
    prep = ws.read(Prepared)
    files = partition(data, cfg, ws.root / "fleet" / "data")
    devices = []
    for path in files:
        ds = build(path, prep.model_dir, ws.data, train_stage.data_config(train_cfg), None, ws.hashes)
        devices.append(Device(dataset=str(ds.root), data_key=ds.meta["key"], pad_token_id=ds.meta["pad_token_id"],
                              samples=ds.meta["splits"]["train"]["samples"]))
    log(f"fleet: {len(devices)} devices, {sum(d.samples for d in devices)} training samples "
        f"({min(d.samples for d in devices)}-{max(d.samples for d in devices)} per device)")
    return Federation(
        backend=train_cfg.backend, ep=train_cfg.ep, artifacts=str(ws.artifacts), model_dir=str(prep.model_dir),
        adapter_init=str(ws.adapter_init), identity=train_stage.trained_from(ws, train_cfg.backend),
        train=train_stage.job_config(prep, train_cfg, train_stage.recomputes(ws, train_cfg)),
        rounds=cfg.rounds, local_steps=cfg.local_steps, seed=cfg.seed, work=str(ws.root / "fleet" / "work"),
        devices=devices)


def check_backend(cfg: FleetConfig, train_cfg) -> None:
    if train_cfg.backend == "ort" and cfg.strategy == "fedprox":
        raise EdgeftError("strategy: fedprox adds a proximal term to each device's loss, which the ONNX Runtime "
                          "training graph does not have; use --backend torch, or another strategy")


def key(cfg: FleetConfig, fed: Federation) -> str:
    return key_of("fleet", dataclasses.asdict(cfg), fed.train, [d.data_key for d in fed.devices], fed.identity)


def simulate(ws_path: Path, data: Path, cfg: FleetConfig, train_cfg: train_stage.TrainConfig, log=print) -> Federated:
    """Run the fleet (holding the workspace's lock); resumes after the last round a stopped run completed."""
    ws = Workspace.existing(ws_path)
    data = formats.check_path(Path(data), "--data")
    with ws.lock("fleet"):
        prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
        train_cfg = train_stage.default_seq_len(train_cfg, prep.max_seq_len, quiet=True)
        check_backend(cfg, train_cfg)
        fed = federation(ws, cfg, train_cfg, data, log)
        run_key = key(cfg, fed)
        if (previous := ws.unchanged(Federated, run_key)) and checkpoints.latest(ws.checkpoints):
            log(f"fleet: finished with these data and options at {previous.finished_at}; nothing to do")
            return previous
        return _run(ws, cfg, train_cfg, fed, run_key, log)


def _run(ws: Workspace, cfg: FleetConfig, train_cfg, fed: Federation, run_key: str, log) -> Federated:
    from edgeft.fleet import server

    root = ws.root / "fleet"
    fed_path = fed.save(root / "federation.json")
    recorder = server.Recorder(root, run_key, cfg.rounds, log)
    done = recorder.completed()
    if done:
        log(f"fleet: resuming after round {done} of {cfg.rounds}")
    else:
        recorder.start_over(initial_weights(fed, root))
    started = time.time()
    if done < cfg.rounds:
        _simulation(cfg, fed_path, len(fed.devices), recorder, ws.log("fleet"))
    if (reached := recorder.completed()) < cfg.rounds:
        raise EdgeftError(f"the fleet stopped after round {reached} of {cfg.rounds} (see the log above); run the same "
                          "command again to resume from there")
    return finish(ws, cfg, train_cfg, fed, recorder, run_key, time.time() - started)


def initial_weights(fed: Federation, work: Path) -> dict[str, np.ndarray]:
    """The adapter's initial trainable tensors, as the engine names them (round 0's global adapter)."""
    from edgeft.fleet.client import close_workers, run_job

    try:
        _, arrays = run_job(fed, 0, "weights", None, 0)
    finally:
        close_workers()  # this process runs no more device jobs
    return arrays


def _simulation(cfg: FleetConfig, fed_path: Path, devices: int, recorder, log_path: Path) -> None:
    """Flower's simulation engine; its own log goes to `log_path` (warnings to the terminal too).

    Ray rewrites this process's environment (PYTHONPATH with this interpreter's whole sys.path, PYTHONBREAKPOINT,
    RAY_*): it is put back afterwards, so that no later subprocess (a training runtime, a device runtime, torchrun)
    inherits it."""
    saved = dict(os.environ)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    flower_log(log_path)

    from edgeft.fleet.client import client_app
    from edgeft.fleet.server import server_app

    try:
        run_simulation(server_app(cfg, devices, recorder, Federation.load(fed_path).train), client_app(fed_path),
                       num_supernodes=devices,
                       backend_config={"client_resources": {"num_cpus": cfg.resources, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}})
    finally:
        os.environ.clear()
        os.environ.update(saved)


def flower_log(path: Path) -> None:
    """Flower's INFO lines to a file; only its warnings on the terminal (edgeft prints a line per round)."""
    import logging

    logger = logging.getLogger("flwr")
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.absolute() for h in logger.handlers):
        file = logging.FileHandler(path, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)


def finish(ws: Workspace, cfg: FleetConfig, train_cfg, fed: Federation, recorder, run_key: str,
            wall: float) -> Federated:
    """The final global adapter (and the best round's) as training checkpoints, with the train and fleet records."""
    rows, _ = state.read_jsonl(recorder.metrics)
    trains = [r for r in rows if r.get("event") == "train"]
    evals = {r["round"]: r["eval_loss"] for r in rows if r.get("event") == "eval"}
    best_round = min(evals, key=evals.get) if evals else None
    data_key = key_of("fleet-data", [d.data_key for d in fed.devices], run_key)
    bound = {"identity": fed.identity, "data_key": data_key, "config_hash": train_stage.config_hash(train_cfg)}
    if ws.training.exists():
        previous = ws.previous_training
        shutil.rmtree(previous, ignore_errors=True)
        ws.training.rename(previous)
        print(f"fleet: the workspace's previous training run is kept in {previous}")
    last = _checkpoint(ws, fed, recorder, cfg.rounds, bound, evals.get(cfg.rounds), trains)
    # the round of the lowest federated validation loss; without evaluation, the final global adapter (what
    # merge and package take by default)
    best = _checkpoint(ws, fed, recorder, best_round, bound, evals[best_round], trains) \
        if best_round not in (None, cfg.rounds) else last
    checkpoints.mark_best(ws.checkpoints, best)
    png = plot(recorder.metrics, ws.root / "fleet" / "metrics.png")
    shutil.copyfile(recorder.metrics, ws.metrics)
    steps = cfg.rounds * cfg.local_steps
    ws.write(train_stage.Trained(
        config=train_cfg, **bound, data={"fleet": len(fed.devices), "samples": sum(d.samples for d in fed.devices)},
        wall_s=round(wall, 1), metrics=str(recorder.metrics), plot=str(png), step=steps, total_steps=steps,
        best_eval_loss=evals.get(best_round) if best_round else None,
        tokens_seen=0, peak_rss_mb=max((r.get("device_peak_rss_mb", 0) for r in trains), default=0.0),
        last=str(last), best=str(best),
        key=train_stage.key(train_cfg, data_key, fed.identity)))
    return ws.write(Federated(
        config=cfg, train=train_cfg, devices=len(fed.devices), samples=[d.samples for d in fed.devices],
        rounds=cfg.rounds, final_eval_loss=evals.get(cfg.rounds), best_round=best_round,
        bytes_per_round=float(np.mean([r["bytes_sent"] + r["bytes_received"] for r in trains])) if trains else 0.0,
        seconds_per_round=float(np.mean([r["seconds"] for r in trains])) if trains else 0.0, wall_s=round(wall, 1),
        metrics=str(recorder.metrics), plot=str(png), key=run_key))


def _checkpoint(ws: Workspace, fed: Federation, recorder, server_round: int, bound: dict, eval_loss, trains) -> Path:
    """Round `server_round`'s global adapter as a checkpoint of the step it stands for."""
    return save_checkpoint(ws, fed, recorder.global_adapter(server_round), server_round * fed.local_steps, bound,
                           eval_loss, round=server_round)


def save_checkpoint(ws: Workspace, fed: Federation, arrays: dict, step: int, bound: dict, eval_loss=None,
                    **noted) -> Path:
    """Trainable tensors as the workspace's training checkpoint of `step` (the engine's own format)."""
    position = {"step": step, "epoch": 0, "micro": 0, "tokens_seen": 0, "best_eval": eval_loss}
    trainer_state = {**bound, "options": {}, "position": position, "total_steps": step, "reason": "fleet", **noted}

    def write(folder: Path) -> None:
        if fed.backend == "ort":
            weights = atomic.write_npz(folder.parent / f".weights-{step}.npz", arrays)
            try:
                launcher.run(jobs.WriteTrained(artifacts=fed.artifacts, weights=str(weights),
                                               out=str(folder / CHECKPOINT)))
            finally:
                weights.unlink(missing_ok=True)
        else:
            from safetensors.numpy import save_file

            from edgeft.trainer.torch_engine import ADAPTER

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / ADAPTER))

    return checkpoints.save(ws.checkpoints, step, write, trainer_state)


def plot(metrics: Path, out: Path) -> Path:
    """Training loss (devices' mean) and federated validation loss per round, and the bytes each round moved."""
    plt = plots.pyplot()
    rows, _ = state.read_jsonl(metrics)
    trains = [r for r in rows if r.get("event") == "train" and "train_loss" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    ax1.plot([r["round"] for r in trains], [r["train_loss"] for r in trains], "o-", label="devices' train loss")
    if evals:
        ax1.plot([r["round"] for r in evals], [r["eval_loss"] for r in evals], "s-", label="global adapter, eval loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.bar([r["round"] for r in rows if r.get("event") == "train"],
            [(r["bytes_sent"] + r["bytes_received"]) / 1e6 for r in rows if r.get("event") == "train"])
    ax2.set_ylabel("MB moved")
    ax2.set_xlabel("round")
    fig.tight_layout()
    return plots.save(fig, out)


def summary(rec: Federated) -> str:
    final = f", final eval loss {rec.final_eval_loss:.4f}" if rec.final_eval_loss is not None else ""
    return (f"fleet: {rec.rounds} rounds of {rec.devices} devices{final}; {rec.bytes_per_round / 1e6:.2f} MB and "
            f"{rec.seconds_per_round:.1f} s per round")

