"""train: fine-tune a workspace's adapter with ONNX Runtime (default) or PyTorch, on JSONL data.

Both backends run as a subprocess with the same loop (`edgeft.trainer.loop`) and stream the same
events; this side shows progress, writes `WS/train/metrics.jsonl` and `metrics.png`, and records the
summary in the manifest. Checkpoints: `WS/train/checkpoints/step-NNNNNN/` (last N plus the best).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgeft.core import atomic, plots, schema, state
from edgeft.core.errors import EdgeftError, command
from edgeft.core.schema import spec
from edgeft.core.workspace import Workspace
from edgeft.data import formats
from edgeft.data.dataset import DataConfig, build
from edgeft.devices import plan, profiles
from edgeft.quant import quantize
from edgeft.runtime import launcher, training_build
from edgeft.stages.export import check_artifacts
from edgeft.trainer import checkpoints
from edgeft.trainer.batching import Split
from edgeft.trainer.schedule import SCHEDULES

CADENCE = ("eval_every", "save_every", "keep_last")  # may change between a run and its resume
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = spec("passes over the training data (ignored with max_steps)", 1, min=1)
    max_steps: int | None = spec("optimizer steps to run, instead of epochs", None, min=1)
    lr: float = spec("peak learning rate", 2e-4, gt=0)
    warmup_steps: int = spec("linear warmup steps", 0, min=0)
    schedule: str = spec("decay after warmup", "cosine", choices=SCHEDULES)
    weight_decay: float = spec("AdamW weight decay", 0.0, min=0)
    batch_size: int = spec("samples per micro-batch", 4, min=1)
    grad_accum: int = spec("micro-batches per optimizer step", 1, min=1)
    seq_len: int | None = spec(f"longest sample in tokens (default: {DEFAULT_SEQ_LEN}, or the model's longest if "
                                "shorter)", None, min=8)
    truncation: str = spec("over-long samples: drop or right (keep the start)", "drop", choices=("drop", "right"))
    train_on_prompt: bool = spec("train on every token, not only the answers", False)
    val_fraction: float = spec("validation share when no --eval-data is given", 0.1, min=0, max=0.5)
    seed: int = spec("seed for data order and split", 0)
    eval_every: int = spec("steps between evaluations (0: once per epoch)", 0, min=0)
    save_every: int = spec("steps between checkpoints (0: only at evaluations and the end)", 0, min=0)
    keep_last: int = spec("checkpoints kept besides the best", 2, min=1)
    max_grad_norm: float | None = spec("clip the gradient norm (none: no clipping)", 1.0, gt=0)
    backend: str = spec("ort: ONNX Runtime training; torch: PEFT + torch AdamW", "ort", choices=("ort", "torch"))
    ep: str = spec("execution provider of the ORT backend", "cpu", choices=("cpu", "cuda"))
    recompute: bool | None = spec("recompute each decoder layer's activations in the backward pass (torch backend: "
                                  "checkpointing; the ORT backend recomputes as exported); default: as the "
                                  "workspace was exported, or as prepare's device plan chose", None)

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, self.backend == "ort" or self.ep == "cpu",
                     "ep: --ep cuda applies to the ort backend; the torch backend uses torch's own device")
        schema.raise_if(problems, "train options")


def options(cfg: TrainConfig) -> dict:
    """The options a checkpoint is bound to: all but the cadence, which a resumed run may change."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CADENCE}


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(options(cfg), sort_keys=True).encode()).hexdigest()[:16]


def changed_options(saved: dict | None, now: dict) -> str:
    """'lr 0.001 -> 0.0005, max_steps 4 -> 6': what a resume changed, or '' where the checkpoint predates the
    record of its options."""
    if not saved:
        return ""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(saved.keys() | now.keys())
                     if saved.get(k) != now.get(k))


class Reporter:
    """Live progress on a terminal; a line every few percent otherwise (CI logs, pipes)."""

    def __init__(self, metrics_path: Path, resume_step: int):
        self.metrics_path = metrics_path
        self.tty = sys.stdout.isatty()
        self.progress = self.task = None
        self.total = None
        self.every = 1
        self._trim(resume_step)
        self.file = open(metrics_path, "a", encoding="utf-8")

    def _trim(self, resume_step: int) -> None:
        """Keep what the run being resumed logged up to its checkpoint; a line its kill cut short goes too."""
        if not self.metrics_path.exists():
            return
        rows, _ = state.read_jsonl(self.metrics_path)
        keep = [row for row in rows if row.get("step", 0) <= resume_step]
        atomic.write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in keep))

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind in ("progress", "eval", "checkpoint"):
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()
        if kind == "start":
            self.total = event["total_steps"]
            self.every = max(1, self.total // 20)
            print(f"training: {event['train_samples']} samples ({event['val_samples']} validation), "
                  f"{self.total} steps" + (f", resuming at step {event['resumed_from']}" if event["resumed_from"] else ""))
            if self.tty:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.description}"), TimeRemainingColumn())
                self.progress.start()
                self.task = self.progress.add_task("", total=self.total, completed=event["resumed_from"])
        elif kind == "progress":
            text = (f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  grad norm {event.get('grad_norm', 0):.3g}  "
                    f"{event['tokens_per_s']:.0f} tok/s  "
                    f"rss {event['rss_mb']:.0f} MB (peak {event['peak_rss_mb']:.0f})")
            if self.progress:
                self.progress.update(self.task, completed=event["step"], description=text)
            elif event["step"] % self.every == 0 or event["step"] == self.total:
                eta = f"  eta {event['eta_s']:.0f} s" if event.get("eta_s") is not None else ""
                print(f"step {event['step']}/{event['total']}  {text}{eta}", flush=True)
        elif kind == "eval":
            line = f"step {event['step']}: eval loss {event['eval_loss']:.4f}" + ("  (best)" if event["best"] else "")
            (self.progress.console.print if self.progress else print)(line)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        self.file.close()


def plot(metrics_path: Path, out: Path) -> Path:
    plt = plots.pyplot()
    rows, _ = state.read_jsonl(metrics_path)
    prog = [r for r in rows if r.get("event") == "progress"]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    ax1.plot([r["step"] for r in prog], [r["loss"] for r in prog], lw=1, label="train loss")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in prog], [r["lr"] for r in prog], color="tab:green")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return plots.save(fig, out)


def _identity(ws: Workspace, backend: str) -> str:
    prep = ws.require("prepare", f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    if backend == "ort":
        exp = ws.require("export", f"the ort backend trains exported artifacts; run `edgeft export {ws.root}` "
                                   "first (or train with --backend torch)")
        return f"{prep['finished_at']}|{exp['finished_at']}"
    return prep["finished_at"]


def _recompute(ws: Workspace, cfg: TrainConfig) -> bool:
    default = plan.recomputed(ws.manifest()["stages"])
    if cfg.backend == "ort" and cfg.recompute is not None and cfg.recompute != default:
        flag = "--recompute" if cfg.recompute else "--no-recompute"
        raise EdgeftError(f"{flag}: the ORT backend recomputes as its artifacts were exported; run "
                          f"`edgeft export {ws.root} {flag}` first")
    return default if cfg.recompute is None else cfg.recompute


def resume_command(ws: Workspace, data: Path) -> str:
    return command("edgeft", "train", ws.root, "--data", data, "--resume")


def default_seq_len(cfg: TrainConfig, max_len: int) -> TrainConfig:
    """The options with seq_len set: as given (refused past what the model takes), else DEFAULT_SEQ_LEN or the
    model's longest sequence if that is shorter (said once)."""
    if cfg.seq_len is None:
        if max_len < DEFAULT_SEQ_LEN:
            print(f"train: --seq-len {max_len}, the longest sequence this model takes (the default is "
                  f"{DEFAULT_SEQ_LEN})")
        return dataclasses.replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, max_len))
    if cfg.seq_len > max_len:
        raise EdgeftError(f"--seq-len {cfg.seq_len} exceeds {max_len}, the longest sequence this model was exported "
                          f"for (long-context rope is exported up to original_max_position_embeddings); use <= {max_len}")
    return cfg


def train(ws_path: Path, data: Path, cfg: TrainConfig = TrainConfig(), eval_data: Path | None = None,
          device=None, resume: bool = False) -> dict:
    """Train the workspace's adapter on `data` (holding the workspace's lock); the train record, or, when
    interrupted, where it stopped and how to resume."""
    ws = Workspace(ws_path)
    if not ws.root.is_dir():
        raise EdgeftError(f"workspace {ws.root} does not exist; run `edgeft prepare MODEL_DIR --out {ws.root}`")
    data = formats.check_path(Path(data), "--data")
    eval_data = formats.check_path(Path(eval_data), "--eval-data") if eval_data else None
    with ws.lock("train"):
        return _train(ws, data, cfg, eval_data, device, resume)


def _train(ws: Workspace, data: Path, cfg: TrainConfig, eval_data: Path | None, device, resume: bool) -> dict:
    identity = _identity(ws, cfg.backend)
    prep = ws.stage("prepare")
    cfg = default_seq_len(cfg, prep["max_seq_len"])
    if cfg.backend == "ort" and training_build.unsupported_reason():
        raise EdgeftError(training_build.unsupported_reason())
    if cfg.backend == "ort":
        check_artifacts(ws, ws.stage("export"))
    model_dir = Path(prep["config"]["model_dir"])
    dataset = build(data, model_dir, ws.root / "data",
                    DataConfig(cfg.seq_len, cfg.truncation, cfg.train_on_prompt, cfg.val_fraction, cfg.seed),
                    eval_data, ws.hashes)
    if device is None and prep.get("device"):
        try:
            device = profiles.load(prep["device"])
        except EdgeftError:
            print(f"train: the profile {prep['device']!r} used at prepare is not found; pass --device to check the "
                  "run against its budget")
    recompute = _recompute(ws, cfg)
    if device:
        longest = max(int(Split(dataset.split(name)).lengths.max(initial=0)) for name in ("train", "val"))
        p = plan.for_target(ws.root, device, min(cfg.seq_len, longest), cfg.batch_size, backend=cfg.backend,
                            recompute=recompute)
        plan.require_fit(p, device, f"training (longest sample {longest} tokens)")
    out = ws.root / "train"
    root = out / "checkpoints"
    chash = config_hash(cfg)
    previous = ws.stage("train")
    resume_state, resume_path = None, None
    if resume:
        resume_path = checkpoints.latest(root)
        if resume_path is None:
            raise EdgeftError(f"nothing to resume: {root} has no complete checkpoint; run without --resume")
        resume_state = checkpoints.read_state(resume_path)
        checkpoints.verify(resume_path, ws.hashes)
        expected = (("model or export", "identity", identity), ("data", "data_key", dataset.meta["key"]),
                    ("training options", "config_hash", chash))
        mismatch = [label for label, key, want in expected if resume_state[key] != want]
        if mismatch:
            changed = changed_options(resume_state.get("options"), options(cfg)) \
                if resume_state["config_hash"] != chash else ""
            raise EdgeftError(f"cannot resume from {resume_path}: its {', '.join(mismatch)} differ from this run's"
                              f"{f' ({changed})' if changed else ''}; resume with the original data and options "
                              f"(a changed schedule or step count would not continue the same run), or remove {out} "
                              "to start over")
    elif previous and previous["config_hash"] == chash and previous["data_key"] == dataset.meta["key"] \
            and previous["identity"] == identity and checkpoints.latest(root):
        print(f"train: finished with these data and options at {previous['finished_at']}; nothing to do")
        return previous
    elif checkpoints.latest(root):
        raise EdgeftError(f"{out} holds checkpoints of another run; continue it with --resume, or remove {out} "
                          "to start over")
    out.mkdir(parents=True, exist_ok=True)
    if swept := checkpoints.sweep(root):
        print(f"train: removed {len(swept)} unfinished checkpoint folder(s) a stopped run left: {', '.join(swept)}")
    if not resume:
        for stale in (out / "metrics.jsonl", root / "best.json"):
            stale.unlink(missing_ok=True)
    args = {
        "config": dataclasses.asdict(cfg) | {"base_quant": quantize.settings(prep["config"]), "recompute": recompute},
        "dataset": str(dataset.root), "pad_token_id": dataset.meta["pad_token_id"],
        "checkpoints": str(root), "config_hash": chash, "options": options(cfg), "data_key": dataset.meta["key"], "identity": identity,
        "resume_state": resume_state, "resume_path": str(resume_path) if resume_path else None,
        "artifacts": str(ws.root / "artifacts"), "work": str(out / "work"), "device": cfg.ep,
        "model_dir": str(model_dir), "adapter_init": str(ws.root / "adapter_init"),
    }
    entry = "edgeft.trainer.ort_engine:main" if cfg.backend == "ort" else "edgeft.trainer.torch_engine:main"
    reporter = Reporter(out / "metrics.jsonl", resume_state["position"]["step"] if resume_state else 0)
    started = time.time()
    try:
        result = launcher.run(entry, args, ep=cfg.ep, on_event=reporter, log_path=ws.root / "logs" / "train.log",
                              runtime_name="training" if cfg.backend == "ort" else "main")
    except KeyboardInterrupt:  # before the loop could save: continue from the last checkpoint, if there is one
        if checkpoints.latest(root):
            print(f"interrupted; continue with `{resume_command(ws, data)}` (with the same options)", file=sys.stderr)
        raise
    finally:
        reporter.close()
    png = plot(out / "metrics.jsonl", out / "metrics.png")
    if result["interrupted"]:
        result["resume_command"] = resume_command(ws, data)
        return result
    record = {
        "config": dataclasses.asdict(cfg), "config_hash": chash, "data_key": dataset.meta["key"], "identity": identity,
        "data": dataset.meta, "device": getattr(device, "name", None), "wall_s": round(time.time() - started, 1),
        "metrics": str(out / "metrics.jsonl"), "plot": str(png),
        **{k: result[k] for k in ("step", "total_steps", "best_eval_loss", "tokens_seen", "tokens_per_s",
                                  "peak_rss_mb", "last", "best")},
    }
    ws.drop("merge", "package")
    ws.record("train", record)
    return ws.stage("train")
