"""The training loop both backends share: data order, accumulation, schedule, evaluation, checkpoints.

It sees the model only through an engine:
    forward_backward(batch) -> float    loss of one micro-batch; gradients accumulate
    grad_norm() -> float                L2 norm of the accumulated gradients, before clipping
    step(lr) -> None                    one optimizer update, then gradients reset
    finite() -> bool                    whether every trained value is finite
    eval_loss(batch) -> float           mean loss over the batch's target tokens, no gradients
    save(folder) -> None                adapter weights and optimizer state
    weights() / load_weights(arrays)    the trainable tensors as numpy arrays, by the engine's names
    memory() -> dict                    accelerator memory, for progress (gpu_mb, gpu_peak_mb; {} on the CPU)
Gradients are summed over the micro-batches of a step (each micro-batch loss is its own token mean);
AdamW is scale-invariant, and --max-grad-norm clips that sum, in both backends alike.

Under torchrun (the torch engine's strategies, distributed.py) every rank runs this loop on its share of each
micro-batch, the engine takes `forward_backward(batch, scale)` and makes `grad_norm`, `finite`, `weights` and
`save` collective; rank 0 alone writes checkpoints, and an interrupted distributed run is not saved (a peer may
be gone): it resumes from its last checkpoint.

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

from edgeft.core import compare, rss
from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import checkpoint_dir
from edgeft.trainer import batching, checkpoints, events
from edgeft.trainer.distributed import ALONE, World, targets
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


def evaluate(engine, split: batching.Split, batch_size: int, pad_id: int, world: World = ALONE) -> float:
    total, count = 0.0, 0
    for idx in batching.sequential(len(split), batch_size):
        batch = batching.collate(split, idx, pad_id)
        n = targets(batch)
        if n:
            if world.distributed:
                mine, weight = world.share(batch)
                local = engine.eval_loss(mine)  # on every rank, rows or not: sharded parameters are gathered
                loss = world.sum(local * weight if weight else 0.0)[0]
            else:
                loss = engine.eval_loss(batch)
            total += loss * n
            count += n
    return total / max(count, 1)


def train(engine, job) -> dict:
    """Run `job` (jobs.Train) to its last step with `engine`; a summary, or where it stopped when interrupted.
    A fleet client's job (`job.mode` set) runs one round instead: see `local`."""
    if job.mode is not None:
        return local(engine, job)
    loop = _Loop(engine, job)
    events.emit("start", total_steps=loop.total, steps_per_epoch=loop.steps_per_epoch, train_samples=len(loop.train),
                val_samples=len(loop.val), resumed_from=loop.pos.step)
    try:
        while loop.pos.step < loop.total:
            loop.step()
            loop.evaluate_and_save()
    except KeyboardInterrupt:
        if loop.world.distributed:  # saving is collective, and a peer may be gone: the last checkpoint stands
            path, step = checkpoints.latest(loop.root), loop.last_saved
        elif loop.pos.step != loop.last_saved:
            path, step = loop.save("interrupted"), loop.pos.step
        else:
            path, step = checkpoint_dir(loop.root, loop.pos.step), loop.pos.step
        return {"interrupted": True, "step": step, "total_steps": loop.total, "checkpoint": str(path)}
    return loop.summary()


def local(engine, job) -> dict:
    """One fleet client's part of a round, from the round's global tensors (`job.weights_in`): "train" runs
    max_steps updates (no evaluation, no checkpoint) and writes the trained tensors to `job.weights_out`;
    "evaluate" is the validation loss of the global tensors; "weights" writes the engine's initial tensors."""
    if job.weights_in:
        with np.load(job.weights_in, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        if problem := compare.weights_problem(engine.weights(), arrays):
            raise EdgeftError(f"the round's global adapter {problem}; this client does not train on it")
        engine.load_weights(arrays)
    if job.mode == "weights":
        _write_weights(engine, job.weights_out)
        return {}
    if job.mode == "evaluate":
        val = batching.Split(Path(job.dataset) / "val.npz")
        loss = evaluate(engine, val, job.config["batch_size"], int(job.pad_token_id)) if len(val) else None
        if loss is not None and not math.isfinite(loss):
            raise EdgeftError(f"the validation loss of the global adapter is {loss} (not finite)")
        return {"eval_loss": loss, "val_samples": len(val)}
    loop = _Loop(engine, job)
    events.emit("start", total_steps=loop.total, steps_per_epoch=loop.steps_per_epoch, train_samples=len(loop.train),
                val_samples=len(loop.val), resumed_from=0)
    losses = []
    while loop.pos.step < loop.total:
        losses.append(loop.step())
    if not engine.finite():
        raise loop.diverged("adapter", "NaN or infinite after the update")
    _write_weights(engine, job.weights_out)
    return {"train_loss": float(np.mean(losses)), "steps": loop.pos.step, "tokens": loop.pos.tokens_seen,
            "train_samples": len(loop.train), "seconds": time.time() - loop.started,
            "peak_rss_mb": round(rss.peak_mb(), 1)}


def _write_weights(engine, path: str) -> None:
    from edgeft.core.atomic import write_npz

    write_npz(Path(path), engine.weights())


class _Loop:
    """One run's state: data, schedule, position, and what was last saved."""

    def __init__(self, engine, job):
        self.engine, self.cfg = engine, job.config
        self.world = getattr(engine, "world", ALONE)
        self.train = batching.Split(Path(job.dataset) / "train.npz")
        self.val = batching.Split(Path(job.dataset) / "val.npz")
        self.pad_id, self.root = int(job.pad_token_id), Path(job.checkpoints)
        self.bs, self.accum = self.cfg["batch_size"], self.cfg["grad_accum"]
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train) / self.bs) / self.accum)
        self.total = self.cfg["max_steps"] or self.cfg["epochs"] * self.steps_per_epoch
        self.eval_every = self.cfg["eval_every"] or self.steps_per_epoch
        self.pos = Position(**job.resume_state["position"]) if job.resume_state else Position()
        self.bound = {"config_hash": job.config_hash, "options": job.options, "data_key": job.data_key,
                      "identity": job.identity}
        self.batches = self.order(self.pos.epoch)
        self.started, self.done_at_start = time.time(), self.pos.step
        self.last_saved = self.pos.step if job.resume_state else -1

    def order(self, epoch: int) -> list[np.ndarray]:
        return batching.length_grouped(self.train.lengths, self.bs, self.cfg["seed"], epoch)

    def step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches, refused before the update if it diverged; its mean
        loss."""
        t = time.time()
        pos, engine = self.pos, self.engine
        lr = learning_rate(pos.step, self.cfg["lr"], self.total, self.cfg["warmup_steps"], self.cfg["schedule"])
        losses, tokens = [], 0
        epoch, micro = pos.epoch, pos.micro
        for _ in range(self.accum):
            if micro >= len(self.batches):
                epoch, micro = epoch + 1, 0
                self.batches = self.order(epoch)
            batch = batching.collate(self.train, self.batches[micro], self.pad_id)
            micro += 1
            loss = self.forward_backward(batch)
            if not math.isfinite(loss):
                raise self.diverged("training loss", loss)
            losses.append(loss)
            tokens += int(batch["attention_mask"].sum())
        grad_norm = engine.grad_norm()
        if not math.isfinite(grad_norm):
            raise self.diverged("gradient norm", grad_norm)
        with _sigint_deferred():  # the update and the position that records it happen together
            engine.step(lr)
            pos.step, pos.epoch, pos.micro = pos.step + 1, epoch, micro
            pos.tokens_seen += tokens
        dt, elapsed = time.time() - t, time.time() - self.started
        rate = (pos.step - self.done_at_start) / elapsed
        events.progress(step=pos.step, total=self.total, epoch=round(epoch + micro / len(self.batches), 3),
                        loss=float(np.mean(losses)), lr=lr, grad_norm=grad_norm, tokens=tokens,
                        tokens_per_s=tokens / dt, step_s=dt, elapsed_s=elapsed,
                        eta_s=(self.total - pos.step) / rate if rate else None,
                        rss_mb=round(rss.current_mb(), 1), peak_rss_mb=round(rss.peak_mb(), 1), **engine.memory())
        return float(np.mean(losses))

    def forward_backward(self, batch: dict) -> float:
        """The micro-batch's loss (its token mean), this rank's share of it back-propagated."""
        world = self.world
        if not world.distributed:
            return self.engine.forward_backward(batch)
        mine, weight = world.share(batch)
        loss = self.engine.forward_backward(mine, weight * world.size)
        return world.sum(loss * weight if weight else 0.0)[0]

    def evaluate_and_save(self) -> None:
        """Evaluate when it is time (a better validation loss is saved as the best checkpoint), and save when
        `save_every` or the last step asks."""
        pos = self.pos
        if len(self.val) and (pos.step % self.eval_every == 0 or pos.step == self.total):
            eval_loss = evaluate(self.engine, self.val, self.bs, self.pad_id, self.world)
            if not math.isfinite(eval_loss):
                raise self.diverged("validation loss", eval_loss)
            improved = pos.best_eval is None or eval_loss < pos.best_eval
            if improved:
                pos.best_eval = eval_loss
            events.emit("eval", step=pos.step, eval_loss=eval_loss, best=improved)
            if improved and (path := self.save("best")):
                checkpoints.mark_best(self.root, path)
        every = self.cfg["save_every"]
        if pos.step != self.last_saved and ((every and pos.step % every == 0) or pos.step == self.total):
            self.save("last" if pos.step == self.total else "periodic")

    def save(self, reason: str) -> Path | None:
        """Save a checkpoint (rank 0 writes it; the other ranks take part in gathering the state: None)."""
        if not self.engine.finite():
            raise self.diverged("adapter", "NaN or infinite after the update")
        if not self.world.main:
            self.engine.save(None)
            self.last_saved = self.pos.step
            return None
        state = {**self.bound, "position": vars(self.pos), "total_steps": self.total, "reason": reason}
        path = checkpoints.save(self.root, self.pos.step, self.engine.save, state)
        checkpoints.prune(self.root, self.cfg["keep_last"], checkpoints.best(self.root))
        events.emit("checkpoint", step=self.pos.step, path=str(path), reason=reason)
        self.last_saved = self.pos.step
        return path

    def diverged(self, what: str, value) -> EdgeftError:
        kept = checkpoints.latest(self.root)
        saved = f"the last checkpoint, {kept.name}, is intact" if kept else "no checkpoint was written"
        return EdgeftError(
            f"training stopped at step {self.pos.step + 1}: the {what} is {value} (not finite), so the run "
            f"diverged; nothing of the diverged state was saved, and {saved}. Lower --lr (this run: "
            f"{self.cfg['lr']:g}) or clip with --max-grad-norm, remove {self.root.parent} and train again")

    def summary(self) -> dict:
        elapsed = time.time() - self.started
        best = checkpoints.best(self.root)
        # each rank's (its own process): training's peak, and loading's where the engine measured it apart
        training = self.world.gather(round(rss.peak_mb(), 1))
        loading = self.world.gather(getattr(self.engine, "load_peak_mb", 0.0))
        peaks = [max(a, b) for a, b in zip(training, loading, strict=True)]
        return {"rank_peak_rss_mb": peaks, "rank_training_peak_rss_mb": training, "interrupted": False, "step": self.pos.step, "total_steps": self.total,
                "best_eval_loss": self.pos.best_eval, "tokens_seen": self.pos.tokens_seen, "seconds": elapsed,
                "tokens_per_s": self.pos.tokens_seen / elapsed if elapsed and not self.done_at_start else None,
                "peak_rss_mb": max(peaks), "last": str(checkpoints.latest(self.root)),
                "best": str(best) if best else None, "follower": not self.world.main}
