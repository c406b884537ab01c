"""Figures for reports: a headless pyplot, and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

from edgeft.core import atomic


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path) -> Path:
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return out
