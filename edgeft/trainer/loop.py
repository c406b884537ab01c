"""The training loop both backends share: data order, accumulation, schedule, evaluation, checkpoints.

It sees the model only through an engine:
    forward_backward(batch) -> float    loss of one micro-batch; gradients accumulate
    grad_norm() -> float                L2 norm of the accumulated gradients, before clipping
    step(lr) -> None                    one optimizer update, then gradients reset
    finite() -> bool                    whether every trained value is finite
    eval_loss(batch) -> float           mean loss over the batch's target tokens, no gradients
    save(folder) -> None                adapter weights and optimizer state
Gradients are summed over the micro-batches of a step (each micro-batch loss is its own token mean);
AdamW is scale-invariant, and --max-grad-norm clips that sum, in both backends alike.

A loss, gradient norm or validation loss that is not finite stops the run with a user error before the
update it would poison, and no checkpoint is written from a diverged state: the last one saved stays the
run's last good state.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core import rss
from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import checkpoint_dir
from edgeft.trainer import batching, checkpoints, events
from edgeft.trainer.schedule import learning_rate


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens_seen: int = 0
    best_eval: float | None = None


@contextlib.contextmanager
def _sigint_deferred():
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != batching.IGNORE_INDEX).sum())


def evaluate(engine, split: batching.Split, batch_size: int, pad_id: int) -> float:
    total, count = 0.0, 0
    for idx in batching.sequential(len(split), batch_size):
        batch = batching.collate(split, idx, pad_id)
        n = _targets(batch)
        if n:
            total += engine.eval_loss(batch) * n
            count += n
    return total / max(count, 1)


def run(engine, args: dict) -> dict:
    cfg = args["config"]
    data = Path(args["dataset"])
    train = batching.Split(data / "train.npz")
    val = batching.Split(data / "val.npz")
    pad_id = int(args["pad_token_id"])
    root = Path(args["checkpoints"])
    bs, accum = cfg["batch_size"], cfg["grad_accum"]
    micro_per_epoch = math.ceil(len(train) / bs)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total = cfg["max_steps"] or cfg["epochs"] * steps_per_epoch
    eval_every = cfg["eval_every"] or steps_per_epoch
    pos = Position(**args["resume_state"]["position"]) if args.get("resume_state") else Position()
    base_state = {k: args[k] for k in ("config_hash", "options", "data_key", "identity")}

    def order(epoch: int) -> list[np.ndarray]:
        return batching.length_grouped(train.lengths, bs, cfg["seed"], epoch)

    def diverged(what: str, value: float) -> EdgeftError:
        kept = checkpoints.latest(root)
        saved = f"the last checkpoint, {kept.name}, is intact" if kept else "no checkpoint was written"
        return EdgeftError(
            f"training stopped at step {pos.step + 1}: the {what} is {value} (not finite), so the run diverged; "
            f"nothing of the diverged state was saved, and {saved}. Lower --lr (this run: {cfg['lr']:g}) or clip "
            f"with --max-grad-norm, remove {root.parent} and train again")

    def save(reason: str) -> Path:
        if not engine.finite():
            raise diverged("adapter", "NaN or infinite after the update")
        state = {**base_state, "position": vars(pos), "total_steps": total, "reason": reason}
        path = checkpoints.save(root, pos.step, engine.save, state)
        best = checkpoints.best(root)
        checkpoints.prune(root, cfg["keep_last"], best)
        events.emit("checkpoint", step=pos.step, path=str(path), reason=reason)
        return path

    events.emit("start", total_steps=total, steps_per_epoch=steps_per_epoch, train_samples=len(train),
                val_samples=len(val), resumed_from=pos.step)
    batches = order(pos.epoch)
    started, done_at_start = time.time(), pos.step
    last_saved = pos.step if args.get("resume_state") else -1
    try:
        while pos.step < total:
            t = time.time()
            lr = learning_rate(pos.step, cfg["lr"], total, cfg["warmup_steps"], cfg["schedule"])
            losses, tokens = [], 0
            epoch, micro = pos.epoch, pos.micro
            for _ in range(accum):
                if micro >= len(batches):
                    epoch, micro = epoch + 1, 0
                    batches = order(epoch)
                batch = batching.collate(train, batches[micro], pad_id)
                micro += 1
                loss = engine.forward_backward(batch)
                if not math.isfinite(loss):
                    raise diverged("training loss", loss)
                losses.append(loss)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = engine.grad_norm()
            if not math.isfinite(grad_norm):
                raise diverged("gradient norm", grad_norm)
            with _sigint_deferred():  # the update and the position that records it happen together
                engine.step(lr)
                pos.step, pos.epoch, pos.micro = pos.step + 1, epoch, micro
                pos.tokens_seen += tokens
            dt = time.time() - t
            elapsed = time.time() - started
            rate = (pos.step - done_at_start) / elapsed
            events.progress(step=pos.step, total=total, epoch=round(epoch + micro / len(batches), 3),
                            loss=float(np.mean(losses)), lr=lr, grad_norm=grad_norm, tokens=tokens,
                            tokens_per_s=tokens / dt,
                            step_s=dt, elapsed_s=elapsed, eta_s=(total - pos.step) / rate if rate else None,
                            rss_mb=round(rss.current_mb(), 1), peak_rss_mb=round(rss.peak_mb(), 1))
            if len(val) and (pos.step % eval_every == 0 or pos.step == total):
                eval_loss = evaluate(engine, val, bs, pad_id)
                if not math.isfinite(eval_loss):
                    raise diverged("validation loss", eval_loss)
                improved = pos.best_eval is None or eval_loss < pos.best_eval
                if improved:
                    pos.best_eval = eval_loss
                events.emit("eval", step=pos.step, eval_loss=eval_loss, best=improved)
                if improved:
                    checkpoints.mark_best(root, save("best"))
                    last_saved = pos.step
            if pos.step != last_saved and (
                    (cfg["save_every"] and pos.step % cfg["save_every"] == 0) or pos.step == total):
                save("last" if pos.step == total else "periodic")
                last_saved = pos.step
    except KeyboardInterrupt:
        path = save("interrupted") if pos.step != last_saved else checkpoint_dir(root, pos.step)
        return {"interrupted": True, "step": pos.step, "total_steps": total, "checkpoint": str(path)}
    elapsed = time.time() - started
    best = checkpoints.best(root)
    return {"interrupted": False, "step": pos.step, "total_steps": total, "best_eval_loss": pos.best_eval,
            "tokens_seen": pos.tokens_seen, "seconds": elapsed,
            "tokens_per_s": pos.tokens_seen / elapsed if elapsed and not done_at_start else None,
            "peak_rss_mb": round(rss.peak_mb(), 1), "last": str(checkpoints.latest(root)),
            "best": str(best) if best else None}
