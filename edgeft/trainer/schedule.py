"""Learning-rate schedules: linear warmup, then cosine, linear or constant (pure Python, both backends)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
