"""train: fine-tune a workspace's adapter with ONNX Runtime (default) or PyTorch, on JSONL data.

Both backends run as a subprocess with the same loop (`edgeft.trainer.loop`) and stream the same
events; this side shows progress, writes `WS/train/metrics.jsonl` and `metrics.png`, and records the
summary in the manifest. Checkpoints: `WS/train/checkpoints/step-NNNNNN/` (last N plus the best).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeft.core import atomic, plots, schema, state
from edgeft.core.errors import EdgeftError, command
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.data import formats
from edgeft.data.dataset import DataConfig, build, cache_key
from edgeft.devices import plan, profiles
from edgeft.runtime import jobs, launcher, torchrun, training_build
from edgeft.runtime.torchrun import SHARDS_BASE, STRATEGIES, parse_rdzv
from edgeft.stages import planning, tracking
from edgeft.stages.export import Exported, check_artifacts
from edgeft.stages.prepare import Prepared
from edgeft.trainer import checkpoints
from edgeft.trainer.batching import Split
from edgeft.trainer.schedule import SCHEDULES

CADENCE = ("eval_every", "save_every", "keep_last", "report_to")  # may change between a run and its resume
LAUNCH = ("nproc", "strategy", "nnodes", "node_rank", "rdzv", "rdzv_timeout")  # where it runs, not what it computes
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
    columns: str | None = spec("the data's own names for the format's fields, NAME=COLUMN[,...] with NAME "
                               "messages, prompt, completion or text (e.g. messages=conversations)", None)
    eval_every: int = spec("steps between evaluations (0: once per epoch)", 0, min=0)
    save_every: int = spec("steps between checkpoints (0: only at evaluations and the end)", 0, min=0)
    keep_last: int = spec("checkpoints kept besides the best", 2, min=1)
    max_grad_norm: float | None = spec("clip the gradient norm (none: no clipping)", 1.0, gt=0)
    backend: str = spec("ort: ONNX Runtime training; torch: PEFT + torch AdamW", "ort", choices=("ort", "torch"))
    ep: str = spec("where training computes: cpu, or cuda (ort: the CUDA training build; torch: one rank per GPU, "
                   "NCCL between them, launched by torchrun also on one GPU)", "cpu", choices=("cpu", "cuda"))
    bf16: bool = spec("torch backend: matmuls in bfloat16 (autocast), a replica's frozen base held in bf16; LoRA "
                      "weights, gradients and AdamW state stay fp32", False)
    recompute: bool | None = spec("recompute each decoder layer's activations in the backward pass (torch backend: "
                                  "checkpointing; the ORT backend recomputes as exported); default: as the "
                                  "workspace was exported, or as prepare's device plan chose", None)
    nproc: int = spec("ranks on this machine (torch backend, under torchrun; --batch-size stays the global batch)", 1,
                      min=1, max=1024)
    strategy: str = spec("how the ranks share the model: ddp (a replica each), zero2 / zero3 (DeepSpeed ZeRO), fsdp "
                         "(PyTorch FSDP2); zero3 and fsdp shard the frozen base too", "ddp", choices=STRATEGIES)
    nnodes: int = spec("machines in the job (each runs this command with its --node-rank)", 1, min=1, max=1024)
    node_rank: int = spec("this machine's place among --nnodes (0 hosts the rendezvous and writes checkpoints)", 0,
                          min=0)
    rdzv: str | None = spec("node 0's HOST:PORT, where the machines meet (needed with --nnodes > 1)", None)
    rdzv_timeout: int = spec("seconds to wait for every rank to join", 300, min=5, max=86400)
    report_to: str | None = spec("experiment trackers that also get the metrics, the options and eval's table: "
                                 "tensorboard, wandb, mlflow, comma-separated (none by default)", None)

    def __post_init__(self):
        problems: list[str] = []
        for name, parse in (("columns", formats.parse_columns), ("report_to", tracking.parse)):
            try:
                parse(getattr(self, name))
            except EdgeftError as e:
                problems.append(f"{name}: {e}")
        schema.check(problems, self.backend == "torch" or not self.bf16,
                     "bf16: the ORT backend trains in fp32, as its artifacts were exported; add --backend torch")
        ranks = self.nproc * self.nnodes
        schema.check(problems, ranks == 1 or self.backend == "torch",
                     f"nproc/nnodes: {ranks} ranks train with the torch backend (the ONNX Runtime training build trains "
                     "in one process); add --backend torch")
        schema.check(problems, ranks <= self.batch_size,
                     f"batch_size: {self.batch_size} is the global batch, shared by {ranks} ranks; use --batch-size >= "
                     f"{ranks} or fewer ranks")
        schema.check(problems, self.node_rank < self.nnodes,
                     f"node_rank: {self.node_rank} is not a machine of --nnodes {self.nnodes} (0 to {self.nnodes - 1})")
        schema.check(problems, self.nnodes == 1 or self.rdzv is not None,
                     "rdzv: several machines meet at node 0's address; give --rdzv HOST:PORT")
        if self.rdzv is not None:
            try:
                parse_rdzv(self.rdzv)
            except EdgeftError as e:
                problems.append(f"rdzv: {e}")
        schema.raise_if(problems, "train options")


def options(cfg: TrainConfig) -> dict:
    """The options a checkpoint is bound to: all but the cadence and where the ranks run, which a resumed run may
    change."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CADENCE + LAUNCH}


def config_hash(cfg: TrainConfig) -> str:
    """The hash of the options a checkpoint is bound to."""
    return hashlib.sha256(json.dumps(options(cfg), sort_keys=True).encode()).hexdigest()[:16]


def changed_options(saved: dict | None, now: dict) -> str:
    """'lr 0.001 -> 0.0005, max_steps 4 -> 6': what a resume changed, or '' where the checkpoint predates the
    record of its options."""
    if not saved:
        return ""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(saved.keys() | now.keys())
                     if saved.get(k) != now.get(k))


class Reporter:
    """Live progress on a terminal; a line every few percent otherwise (CI logs, pipes); the metrics to
    metrics.jsonl and to the experiment trackers, if any (tracking.py)."""

    def __init__(self, metrics_path: Path, resume_step: int, trackers: tracking.Trackers | None = None):
        self.metrics_path, self.trackers = metrics_path, trackers
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
            if self.trackers:
                self.trackers.event(event)
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
                    f"rss {event['rss_mb']:.0f} MB (peak {event['peak_rss_mb']:.0f})" +
                    (f"  gpu {event['gpu_mb']:.0f} MB (peak {event['gpu_peak_mb']:.0f})" if "gpu_mb" in event else ""))
            if self.progress:
                self.progress.update(self.task, completed=event["step"], description=text)
            elif event["step"] % self.every == 0 or event["step"] == self.total:
                eta = f"  eta {event['eta_s']:.0f} s" if event.get("eta_s") is not None else ""
                print(f"step {event['step']}/{event['total']}  {text}{eta}", flush=True)
        elif kind == "log":
            (self.progress.console.print if self.progress else print)(f"train: {event['message']}")
        elif kind == "eval":
            line = f"step {event['step']}: eval loss {event['eval_loss']:.4f}" + ("  (best)" if event["best"] else "")
            (self.progress.console.print if self.progress else print)(line)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        self.file.close()
        if self.trackers:
            self.trackers.close()


def plot(metrics_path: Path, out: Path) -> Path:
    """Loss (training and validation) and learning rate over the steps, from the metrics log."""
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


def trained_from(ws: Workspace, backend: str) -> str:
    """What a run trains from: the key of the export (ORT) or of the prepared workspace (torch). A checkpoint
    records it, and resumes only onto the same."""
    prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    if backend == "ort":
        exp = ws.require(Exported, f"the ort backend trains exported artifacts; run `edgeft export {ws.root}` "
                                   "first (or train with --backend torch)")
        check_artifacts(ws, exp)
        return exp.key
    return prep.key


def recomputes(ws: Workspace, cfg: TrainConfig) -> bool:
    default = planning.recomputes(ws)
    if cfg.backend == "ort" and cfg.recompute is not None and cfg.recompute != default:
        flag = "--recompute" if cfg.recompute else "--no-recompute"
        raise EdgeftError(f"{flag}: the ORT backend recomputes as its artifacts were exported; run "
                          f"`edgeft export {ws.root} {flag}` first")
    return default if cfg.recompute is None else cfg.recompute


def resume_command(ws: Workspace, data: Path, on=None) -> str:
    """The command that continues this run (on the same device, `on`: a targets.train.TrainOn), shell-quoted."""
    return command("edgeft", "train", ws.root, "--data", data, "--resume", *(on.flags if on else ()))


def default_seq_len(cfg: TrainConfig, max_len: int, quiet: bool = False) -> TrainConfig:
    """The options with seq_len set: as given (refused past what the model takes), else DEFAULT_SEQ_LEN or the
    model's longest sequence if that is shorter (said, unless `quiet`)."""
    if cfg.seq_len is None:
        if max_len < DEFAULT_SEQ_LEN and not quiet:
            print(f"train: --seq-len {max_len}, the longest sequence this model takes (the default is "
                  f"{DEFAULT_SEQ_LEN})")
        return dataclasses.replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, max_len))
    if cfg.seq_len > max_len:
        raise EdgeftError(f"--seq-len {cfg.seq_len} exceeds {max_len}, the longest sequence this model was exported "
                          f"for (long-context rope is exported up to original_max_position_embeddings); use <= {max_len}")
    return cfg


@dataclass(frozen=True)
class Trained(Record):
    """What train recorded: the finished run, its data and its checkpoints."""

    STAGE: ClassVar[str] = "train"
    config: TrainConfig = spec("the options, seq_len resolved")
    config_hash: str = spec("hash of the options a checkpoint is bound to")
    data_key: str = spec("the tokenized data's cache key (data, eval data, tokenizer, data options)")
    identity: str = spec("the key of what was trained: the export (ort) or the prepared workspace (torch)")
    data: dict = spec("the tokenized data's description")
    device: str | None = spec("the device profile the run was checked against", None)
    wall_s: float = spec("wall time", 0.0)
    metrics: str = spec("the metrics log", "")
    plot: str = spec("the metrics plot", "")
    step: int = spec("the last step", 0)
    total_steps: int = spec("steps of the run", 0)
    best_eval_loss: float | None = spec("the best validation loss", None)
    tokens_seen: int = spec("tokens trained on", 0)
    tokens_per_s: float | None = spec("training throughput (none for a resumed run)", None)
    peak_rss_mb: float = spec("peak memory of the training process (the highest rank's, distributed)", 0.0)
    rank_peak_rss_mb: list[float] = spec("each rank's peak memory, in rank order", default_factory=list)
    rank_training_peak_rss_mb: list[float] = spec("each rank's peak memory after its model was loaded (distributed: "
                                                   "ddp and zero2 load the whole model, zero3 and fsdp a layer at a "
                                                   "time)", default_factory=list)
    last: str = spec("the last checkpoint", "")
    best: str | None = spec("the best checkpoint", None)


@dataclass(frozen=True)
class Interrupted:
    """A run stopped by Ctrl-C or SIGTERM after saving where it was."""

    step: int
    total_steps: int
    checkpoint: str
    resume_command: str


@dataclass(frozen=True)
class Joined:
    """A node other than node 0 that took part in a run to its end (node 0 holds its checkpoints and record)."""

    node_rank: int
    nnodes: int
    step: int
    total_steps: int


def key(cfg: TrainConfig, data_key: str, identity: str) -> str:
    """The train stage's key: its options, the tokenized data's key and what it trains from."""
    return key_of("train", dataclasses.asdict(cfg), data_key, identity)


def data_config(cfg: TrainConfig) -> DataConfig:
    return DataConfig(cfg.seq_len, cfg.truncation, cfg.train_on_prompt, cfg.val_fraction, cfg.seed, cfg.columns)


def unchanged(ws: Workspace, data: Path, cfg: TrainConfig = TrainConfig(), eval_data: Path | None = None
              ) -> Trained | None:
    """The train record if training again would train the same run (options, data, what it trains from), and its
    checkpoints are there."""
    prep = ws.read(Prepared)
    if prep is None or (cfg.backend == "ort" and ws.read(Exported) is None) or not checkpoints.latest(ws.checkpoints):
        return None
    cfg = default_seq_len(cfg, prep.max_seq_len, quiet=True)
    data_key = cache_key(Path(data), Path(eval_data) if eval_data else None, prep.model_dir, data_config(cfg),
                         ws.hashes)
    return ws.unchanged(Trained, key(cfg, data_key, trained_from(ws, cfg.backend)))


def train(ws_path: Path, data: Path, cfg: TrainConfig = TrainConfig(), eval_data: Path | None = None,
          device=None, resume: bool | None = False, on=None) -> Trained | Interrupted:
    """Train the workspace's adapter on `data` (holding the workspace's lock); the record, or, when interrupted,
    where it stopped. `resume`: continue the run the latest checkpoint belongs to; None (edgeft run): continue it
    if it is this run, put a finished run of other options aside and start over. `on`: the device the loop runs on
    over SSH (a targets.train.TrainOn; its checkpoints come back here as they are written)."""
    ws = Workspace.existing(ws_path)
    data = formats.check_path(Path(data), "--data")
    eval_data = formats.check_path(Path(eval_data), "--eval-data") if eval_data else None
    with ws.lock("train"):
        identity = trained_from(ws, cfg.backend)
        prep = ws.read(Prepared)
        cfg = default_seq_len(cfg, prep.max_seq_len)
        check_on(cfg, on)
        if cfg.backend == "ort" and training_build.unsupported_reason() and on is None:
            raise EdgeftError(training_build.unsupported_reason())
        dataset = build(data, prep.model_dir, ws.data, data_config(cfg), eval_data, ws.hashes)
        device = _device(prep, device)
        recompute = recomputes(ws, cfg)
        if on is not None and cfg.backend == "torch" and recompute:
            print("train: --on with the torch backend keeps every layer's activations (the exported program cannot "
                  "recompute them)")
            recompute = False
        if device:
            longest = max(int(Split(dataset.split(name)).lengths.max(initial=0)) for name in ("train", "val"))
            p = planning.for_workspace(ws, device, min(cfg.seq_len, longest), cfg.batch_size, backend=cfg.backend,
                                       recompute=recompute, ranks=cfg.nproc * cfg.nnodes, strategy=cfg.strategy)
            plan.require_fit(p, device, f"training (longest sample {longest} tokens)")
        stage_key = key(cfg, dataset.meta["key"], identity)
        if resume is not True and (previous := ws.unchanged(Trained, stage_key)) and checkpoints.latest(ws.checkpoints):
            print(f"train: finished with these data and options at {previous.finished_at}; nothing to do")
            return previous
        check_torch_device(cfg)
        check_strategy(prep, cfg)
        tracking.check_installed(tracking.parse(cfg.report_to))
        run = _Run(cfg, dataset, identity, recompute, stage_key)
        if cfg.node_rank > 0:  # node 0 resumes, writes the checkpoints and hands its state to every rank
            ws.training.mkdir(parents=True, exist_ok=True)
            return _launch(ws, run, data, None, device)
        resume_path = _start(ws, run, resume)
        return _launch(ws, run, data, resume_path, device, on)


def check_on(cfg: TrainConfig, on) -> None:
    """Refuse what `train --on` cannot run on the device, with the fix."""
    if on is None:
        return
    problems = []
    schema.check(problems, cfg.ep == "cpu", "ep: --on trains on the device's CPU; drop --ep cuda")
    schema.check(problems, cfg.nproc * cfg.nnodes == 1, "nproc/nnodes: --on trains in one process on the device")
    schema.check(problems, not cfg.bf16, "bf16: --on trains in fp32 on the device's CPU; drop --bf16")
    schema.check(problems, cfg.backend == "ort" or cfg.recompute is not True,
                 "recompute: the program exported for the device's torch keeps every layer's activations "
                 "(torch.export inlines activation checkpointing); drop --recompute, or train with the ORT backend "
                 "on an x86-64 device")
    schema.raise_if(problems, "train --on")
    on.check(cfg.backend)


def check_torch_device(cfg: TrainConfig) -> None:
    """Refuse a torch-backend run on a device this machine lacks, with the reason and the fix."""
    if cfg.backend != "torch" or cfg.ep != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU (no NVIDIA " \
              "driver, or CUDA_VISIBLE_DEVICES hides them all)"
        raise EdgeftError(f"--ep cuda: {why}. Train on the CPU with --ep cpu, or on a machine with an NVIDIA GPU")
    if cfg.nproc > (gpus := torch.cuda.device_count()):
        raise EdgeftError(f"--nproc {cfg.nproc} with --ep cuda runs one rank per GPU, and this machine has {gpus}; "
                          f"use --nproc {gpus} or fewer (--batch-size stays the global batch)")
    if cfg.bf16 and not torch.cuda.is_bf16_supported():
        raise EdgeftError(f"--bf16: {torch.cuda.get_device_name()} does not compute in bfloat16 (it needs compute "
                          "capability 8.0 or later); train without --bf16")


def launched_by_torchrun(cfg: TrainConfig) -> bool:
    """Whether the run goes through torchrun: several ranks, or the torch backend on CUDA (one GPU is then a world
    of one, on NCCL, running its strategy)."""
    return cfg.nproc * cfg.nnodes > 1 or (cfg.backend == "torch" and cfg.ep == "cuda")


def check_strategy(prep: Prepared, cfg: TrainConfig) -> None:
    """Refuse a data-parallel run that cannot run here, with the reason."""
    if not launched_by_torchrun(cfg):
        return
    if cfg.strategy in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise EdgeftError(f"--strategy {cfg.strategy} runs on DeepSpeed, which is not installed: "
                          "`DS_BUILD_OPS=0 pip install 'edgeft[distributed]'` (or `make setup`), or use --strategy "
                          "ddp or fsdp")
    precision = prep.config.base_quant.get("precision", "fp32")
    if cfg.strategy in SHARDS_BASE and precision != "fp32":
        raise EdgeftError(f"--strategy {cfg.strategy} shards the frozen base's parameters, but this workspace's base is "
                          f"{precision}, held as packed buffers that neither ZeRO-3 nor FSDP shards: use --strategy ddp "
                          "or zero2 (each rank keeps the quantized base), or prepare with --base-precision fp32")


@dataclass(frozen=True)
class _Run:
    cfg: TrainConfig
    dataset: object  # data.dataset.Dataset
    identity: str
    recompute: bool
    key: str

    @property
    def bound(self) -> dict:
        """What a checkpoint of this run records, and a resume must match."""
        return {"identity": self.identity, "data_key": self.dataset.meta["key"], "config_hash": config_hash(self.cfg)}


def _device(prep: Prepared, device):
    """The profile to check the run against: the one given, else the one prepare planned for (if still known)."""
    if device is None and prep.device:
        try:
            return profiles.load(prep.device)
        except EdgeftError:
            print(f"train: the profile {prep.device!r} used at prepare is not found; pass --device to check the "
                  "run against its budget")
    return device


def _start(ws: Workspace, run: _Run, resume: bool | None) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), after clearing what a stopped run left. With resume
    None (auto): this run's checkpoints are resumed, a finished run of other options goes to train.previous."""
    latest = checkpoints.latest(ws.checkpoints)
    if resume is None and latest is not None:
        matches = {k: checkpoints.read_state(latest)[k] for k in run.bound} == run.bound
        if not matches and ws.read(Trained) is not None:
            previous = ws.previous_training
            shutil.rmtree(previous, ignore_errors=True)
            ws.training.rename(previous)
            print(f"train: options or data changed; starting over (the finished run is kept in {previous})")
            latest = None
        resume = latest is not None
        if resume:
            print(f"train: resuming the interrupted run from {latest}")
    if resume:
        if latest is None:
            raise EdgeftError(f"nothing to resume: {ws.checkpoints} has no complete checkpoint; run without --resume")
        _check_resume(ws, run, latest)
    elif latest is not None:
        raise EdgeftError(f"{ws.training} holds checkpoints of another run; continue it with --resume, or remove "
                          f"{ws.training} to start over")
    ws.training.mkdir(parents=True, exist_ok=True)
    if swept := checkpoints.sweep(ws.checkpoints):
        print(f"train: removed {len(swept)} unfinished checkpoint folder(s) a stopped run left: {', '.join(swept)}")
    if not resume:
        for stale in (ws.metrics, ws.checkpoints / "best.json", ws.training / tracking.STATE):
            stale.unlink(missing_ok=True)
    return latest if resume else None


def _check_resume(ws: Workspace, run: _Run, path: Path) -> None:
    saved = checkpoints.read_state(path)
    checkpoints.verify(path, ws.hashes)
    labels = {"identity": "model or export", "data_key": "data", "config_hash": "training options"}
    if mismatch := [labels[k] for k, want in run.bound.items() if saved[k] != want]:
        changed = changed_options(saved.get("options"), options(run.cfg)) \
            if saved["config_hash"] != run.bound["config_hash"] else ""
        raise EdgeftError(f"cannot resume from {path}: its {', '.join(mismatch)} differ from this run's"
                          f"{f' ({changed})' if changed else ''}; resume with the original data and options "
                          f"(a changed schedule or step count would not continue the same run), or remove "
                          f"{ws.training} to start over")


def job_config(prep: Prepared, cfg: TrainConfig, recompute: bool) -> dict:
    """What a training job's loop and engine read: the options, the base's quantization and recomputation."""
    return dataclasses.asdict(cfg) | {"base_quant": prep.config.base_quant, "recompute": recompute}


def _launch(ws: Workspace, run: _Run, data: Path, resume_path: Path | None, device, on=None) -> Trained | Interrupted:
    """The training runtime (or the torch engine) runs the loop; progress is shown and logged as it comes."""
    prep, cfg = ws.read(Prepared), run.cfg
    resume_state = checkpoints.read_state(resume_path) if resume_path else None
    job_type = jobs.Train if cfg.backend == "ort" else jobs.TorchTrain
    job = job_type(
        config=job_config(prep, cfg, run.recompute),
        dataset=str(run.dataset.root), pad_token_id=run.dataset.meta["pad_token_id"], checkpoints=str(ws.checkpoints),
        options=options(cfg), **run.bound, artifacts=str(ws.artifacts), work=str(ws.training / "work"),
        model_dir=str(prep.model_dir), adapter_init=str(ws.adapter_init), device=cfg.ep, resume_state=resume_state,
        resume_path=str(resume_path) if resume_path else None)
    trackers = tracking.Trackers(tracking.parse(cfg.report_to), ws.training, ws.root.name, options(cfg) | {
        "data": str(data), "recompute": run.recompute}) if cfg.report_to and cfg.node_rank == 0 else None
    reporter = Reporter(ws.metrics, resume_state["position"]["step"] if resume_state else 0, trackers)
    started = time.time()
    launch = torchrun.Launch(cfg.nproc, cfg.nnodes, cfg.node_rank, cfg.rdzv, cfg.rdzv_timeout)
    try:
        if on is not None:
            result = on.run(job, reporter, ws.log("train"), resume_command(ws, data, on), ws.root / "programs")
        elif launched_by_torchrun(cfg):
            result = torchrun.run(job, launch, on_event=reporter, log_path=ws.log("train"))
        else:
            result = launcher.run(job, ep=cfg.ep, on_event=reporter, log_path=ws.log("train"))
    except KeyboardInterrupt:  # before the loop could save: continue from the last checkpoint, if there is one
        if checkpoints.latest(ws.checkpoints):
            print(f"interrupted; continue with `{resume_command(ws, data, on)}` (with the same options)",
                  file=sys.stderr)
        raise
    except launcher.TrainingRuntimeError as e:
        if launched_by_torchrun(cfg) and (last := checkpoints.latest(ws.checkpoints)):
            raise launcher.TrainingRuntimeError(f"{e}\n  continue from {last.name} with `{resume_command(ws, data)}` "
                                                "(with the same options)", log_path=e.log_path) from None
        raise
    finally:
        reporter.close()
    png = plot(ws.metrics, ws.training / "metrics.png")
    if result["interrupted"]:
        return Interrupted(result["step"], result["total_steps"], result["checkpoint"], resume_command(ws, data, on))
    if result.get("follower"):
        return Joined(cfg.node_rank, cfg.nnodes, result["step"], result["total_steps"])
    return ws.write(Trained(
        config=cfg, **run.bound, data=run.dataset.meta, device=getattr(device, "name", None),
        wall_s=round(time.time() - started, 1), metrics=str(ws.metrics), plot=str(png), key=run.key,
        **{k: result[k] for k in ("step", "total_steps", "best_eval_loss", "tokens_seen", "tokens_per_s",
                                  "peak_rss_mb", "last", "best")},
        rank_peak_rss_mb=result.get("rank_peak_rss_mb", []),
        rank_training_peak_rss_mb=result.get("rank_training_peak_rss_mb", [])))
