"""Timed training steps for `edgeft bench` (runs in the training runtime, or the main one for torch).

Full-length batches (batch x seq tokens, every token a target) cut from real tokenized text; one warm-up
step, then `runs` timed steps of the same engine the training loop uses. Nothing is saved.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeft.core import rss
from edgeft.runtime import jobs
from edgeft.trainer import events


def _batches(tokens: np.ndarray, batch: int, seq: int, n: int) -> list[dict]:
    need = batch * seq
    reps = -(-need * n // max(len(tokens), 1))
    flat = np.tile(tokens, max(reps, 1))[: need * n].astype(np.int64)
    out = []
    for i in range(n):
        ids = flat[i * need: (i + 1) * need].reshape(batch, seq)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def main(job: jobs.BenchTraining) -> dict:
    batch, seq, runs = job.batch_size, job.seq_len, job.runs
    tokens = np.load(job.tokens)
    if job.backend == "ort":
        from edgeft.trainer.ort_engine import OrtEngine

        engine = OrtEngine(Path(job.artifacts), Path(job.artifacts) / "optimizer_model.onnx", device=job.device)
    else:
        from edgeft.trainer.torch_engine import TorchEngine

        cfg = {"seed": 0, "lr": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0,
               "base_quant": job.base_quant, "recompute": job.recompute}
        engine = TorchEngine(Path(job.model_dir), Path(job.adapter_init), cfg)
    steps = []
    for i, b in enumerate(_batches(tokens, batch, seq, runs + 1)):
        t = time.perf_counter()
        engine.forward_backward(b)
        engine.step(1e-5)
        dt = time.perf_counter() - t
        if i:
            steps.append(dt)
        events.progress(step=i, total=runs, step_s=dt, tokens_per_s=batch * seq / dt, peak_rss_mb=rss.peak_mb())
    return {"step_s": steps, "peak_rss_mb": rss.peak_mb(), "warmup_s": None}
