"""The ServerApp edgeft ships: Flower's strategy, behind a guard that keeps a bad device out of the average, and
a record of every round in the workspace.

Each round's global adapter is kept (`WS/fleet/rounds/round-NNNN.npz`), with one line per round in
`WS/fleet/metrics.jsonl` (devices asked, updates taken, refused and failed, losses, bytes each way, seconds) and
`state.json` naming the last completed round, from which a restarted server resumes. An update is refused, and
logged with its node, when its tensors are not the adapter's (names, shapes), not finite, or its example count
is not a positive number; a round that takes fewer than `min_clients` updates keeps the previous global adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower

from edgeft.core import atomic, compare, rss, state
from edgeft.fleet.client import from_record, hyperparameters, load_npz, to_record
from edgeft.fleet.config import FleetConfig

ROUND_FILE = "round-{:04d}.npz"


def build_strategy(cfg: FleetConfig, devices: int) -> flower.Strategy:
    """Flower's strategy `cfg.strategy`, wrapped in its server-side differential privacy when asked."""
    # Flower samples fraction x the nodes connected at that moment: asking for `asked` at least (and waiting until
    # that many are connected) makes a round's sample the fleet's share, not a share of the first nodes to connect.
    asked = max(1, math.ceil(cfg.fraction * devices))
    common = {"fraction_train": cfg.fraction, "fraction_evaluate": cfg.fraction if cfg.evaluate else 0.0,
              "min_train_nodes": asked, "min_evaluate_nodes": asked, "min_available_nodes": asked}
    server_opt = {"eta": cfg.server_lr}
    made = {
        "fedavg": lambda: flower.FedAvg(**common),
        "fedprox": lambda: flower.FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedadam": lambda: flower.FedAdam(**common, **server_opt),
        "fedyogi": lambda: flower.FedYogi(**common, **server_opt),
        "fedadagrad": lambda: flower.FedAdagrad(**common, **server_opt),
        "fedavgm": lambda: flower.FedAvgM(**common, server_learning_rate=cfg.server_lr),
        "fedmedian": lambda: flower.FedMedian(**common),
        "fedtrimmedavg": lambda: flower.FedTrimmedAvg(**common),
    }[cfg.strategy]()
    if cfg.privacy == "fixed":
        return flower.DifferentialPrivacyServerSideFixedClipping(made, cfg.noise, cfg.clip, asked)
    if cfg.privacy == "adaptive":
        return flower.DifferentialPrivacyServerSideAdaptiveClipping(made, cfg.noise, asked, initial_clipping_norm=cfg.clip)
    return made


def update_problem(template: dict, msg: Message) -> str | None:
    """Why a device's reply cannot enter the average, or None."""
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "carries no adapter tensors or no metrics"
    metrics = content.metric_records["metrics"]
    count = metrics.get("num-examples")
    if not isinstance(count, (int, float)) or not math.isfinite(count) or count <= 0:
        return f"reports {str(count)[:40]} training examples (not a positive number)"
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float))):
        return "reports non-finite metrics"
    try:
        arrays = from_record(content.array_records["arrays"])
    except Exception as e:  # noqa: BLE001 - a peer's bytes that do not decode are its problem, said in the log
        return f"sent tensors that do not decode ({type(e).__name__})"
    problem = compare.weights_problem(template, arrays)
    return f"sent an adapter that {problem}" if problem else None


class Recorder:
    """The fleet's folder: each round's global adapter, the metrics log and the resume point."""

    def __init__(self, root: Path, key: str, total_rounds: int, log=print):
        self.root, self.key, self.total, self.log = Path(root), key, total_rounds, log
        self.rounds = self.root / "rounds"
        self.metrics = self.root / "metrics.jsonl"
        self.state_path = self.root / "state.json"

    def completed(self) -> int:
        """The last round whose global adapter is kept, for this fleet's key (0: none)."""
        if not self.state_path.is_file():
            return 0
        saved = state.read_json(self.state_path, "the fleet's state", f"remove {self.root} to start over",
                                keys=("round", "key"))
        if saved["key"] != self.key or not (self.rounds / ROUND_FILE.format(saved["round"])).is_file():
            return 0
        return int(saved["round"])

    def global_adapter(self, server_round: int) -> dict[str, np.ndarray]:
        return load_npz(self.rounds / ROUND_FILE.format(server_round))

    def keep(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        atomic.write_npz(self.rounds / ROUND_FILE.format(server_round), arrays)
        atomic.write_json(self.state_path, {"round": server_round, "key": self.key})

    def start_over(self, initial: dict[str, np.ndarray]) -> None:
        """Forget what an earlier fleet of another key left; `initial` is round 0's global adapter."""
        for stale in (self.metrics, self.state_path):
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.rounds, ignore_errors=True)
        self.keep(0, initial)

    def row(self, row: dict) -> None:
        """Log a round's record and say it (the metrics log is also what `fleet run` follows and says)."""
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.log(round_line(row, self.total))

    def trim(self, after_round: int) -> None:
        """Drop what a stopped server logged past the round it resumes from."""
        if self.metrics.exists():
            rows, _ = state.read_jsonl(self.metrics)
            atomic.write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows if r["round"] <= after_round))


def round_line(row: dict, total: int) -> str:
    """A metrics row as the line a user reads."""
    if row["event"] == "eval":
        return (f"fleet: round {row['round']}: eval loss of the global adapter {row['eval_loss']:.4f} "
                f"({row['devices']} devices)")
    loss = f", train loss {row['train_loss']:.4f}" if "train_loss" in row else ""
    problems = "".join(f", {row[k]} {k}" for k in ("failed", "refused") if row[k])
    return (f"fleet: round {row['round']}/{total}: {row['updates']}/{row['asked']} updates{problems}{loss}, "
            f"{row['bytes_sent'] / 1e6:.2f} MB out, {row['bytes_received'] / 1e6:.2f} MB in, {row['seconds']:.1f} s")


@dataclass
class _Round:
    started: float = 0.0
    asked: int = 0
    bytes_sent: int = 0


class Guard(flower.Strategy):
    """Any Flower strategy, with bad updates kept out and every round recorded (see the module's doc)."""

    def __init__(self, inner: flower.Strategy, template: dict, recorder: Recorder, cfg: FleetConfig, offset: int):
        self.inner, self.template, self.recorder, self.cfg, self.offset = inner, template, recorder, cfg, offset
        self.now = _Round(time.time())
        self.kept: dict | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        size = sum(a.numpy().nbytes for a in arrays.values())
        self.now = _Round(time.time(), len(messages), size * len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.offset
        good, failed, refused = [], [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append(node)
                self.recorder.log(f"fleet: round {absolute}: device {node} failed: {msg.error.reason[:300]}")
            elif problem := update_problem(self.template, msg):
                refused.append(node)
                self.recorder.log(f"fleet: round {absolute}: refused the update of device {node}: it {problem}")
            else:
                good.append(msg)
        arrays = metrics = None
        if len(good) >= self.cfg.min_clients:
            arrays, metrics = self.inner.aggregate_train(server_round, good)
            if arrays is not None and (problem := compare.weights_problem(self.template, from_record(arrays))):
                self.recorder.log(f"fleet: round {absolute}: the aggregate {problem}; the previous global adapter stays")
                arrays = metrics = None
        received = sum(a.numpy().nbytes for m in good for a in m.content.array_records["arrays"].values())
        row = {"round": absolute, "asked": self.now.asked, "updates": len(good), "failed": len(failed),
               "refused": len(refused), "kept_previous": arrays is None, "bytes_sent": self.now.bytes_sent,
               "bytes_received": received, "seconds": round(time.time() - self.now.started, 2),
               "server_peak_rss_mb": round(rss.peak_mb(), 1)}
        if good:
            weights = [m.content.metric_records["metrics"]["num-examples"] for m in good]
            row["train_loss"] = float(np.average([m.content.metric_records["metrics"]["train_loss"] for m in good],
                                                 weights=weights))
            row["device_peak_rss_mb"] = max(m.content.metric_records["metrics"]["peak_rss_mb"] for m in good)
        if arrays is None and len(good) < self.cfg.min_clients:
            self.recorder.log(f"fleet: round {absolute}: {len(good)} update(s), fewer than min_clients "
                              f"{self.cfg.min_clients}; the previous global adapter stays")
        self.kept = from_record(arrays) if arrays is not None else self.kept
        self.recorder.row({"event": "train", **row})  # before the round counts as kept: a resume trims it
        self.recorder.keep(absolute, self.kept)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        losses, weights = [], []
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            m = msg.content.metric_records["metrics"]
            loss, count = m.get("eval_loss"), m.get("num-examples")
            if isinstance(loss, float) and math.isfinite(loss) and isinstance(count, int) and count > 0:
                losses.append(loss)
                weights.append(count)
        if not losses:
            return None
        value = float(np.average(losses, weights=weights))
        self.recorder.row({"event": "eval", "round": server_round + self.offset, "eval_loss": value,
                           "devices": len(losses)})
        return MetricRecord({"eval_loss": value})


def run_rounds(grid: Grid, cfg: FleetConfig, devices: int, recorder: Recorder, train: dict) -> None:
    """The fleet's remaining rounds on `grid`, from the last round `recorder` kept; `train`: the devices' local
    training options (sent with every round)."""
    random.seed(cfg.seed)  # Flower samples the devices of a round with `random`
    done = recorder.completed()
    recorder.trim(done)
    start = recorder.global_adapter(done)
    guard = Guard(build_strategy(cfg, devices), start, recorder, cfg, done)
    guard.kept = start
    if done < cfg.rounds:
        guard.start(grid=grid, initial_arrays=to_record(start), num_rounds=cfg.rounds - done, timeout=cfg.timeout,
                    train_config=ConfigRecord({"round-offset": done,
                                               **hyperparameters(train, cfg.rounds, cfg.local_steps, cfg.seed)}),
                    evaluate_config=ConfigRecord({"round-offset": done}))


def server_app(cfg: FleetConfig, devices: int, recorder: Recorder, train: dict) -> ServerApp:
    """The ServerApp of a simulated fleet of `devices`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        run_rounds(grid, cfg, devices, recorder, train)

    return app


@dataclass(frozen=True)
class Plan:
    """What a deployed fleet's ServerApp reads (its run config names the file): the options, the fleet's folder
    and its key."""

    config: dict
    train: dict
    devices: int
    root: str
    key: str

    def save(self, path: Path) -> Path:
        return atomic.write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = state.read_json(Path(path), "the fleet's server plan", "run `edgeft fleet run` again",
                               keys=("config", "train", "devices", "root", "key"))
        return cls(**{k: data[k] for k in ("config", "train", "devices", "root", "key")})


def deployed_app() -> ServerApp:
    """The ServerApp of a deployed fleet: Flower's SuperLink starts it with the run config `plan='PATH'`."""
    from edgeft.core import schema

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        plan = Plan.load(Path(str(context.run_config["plan"])))
        cfg = schema.parse(FleetConfig, plan.config, "the fleet's options")
        run_rounds(grid, cfg, plan.devices, Recorder(Path(plan.root), plan.key, cfg.rounds), plan.train)

    return app


app = deployed_app()  # `edgeft.fleet.server:app`, as a Flower app's pyproject names it
