"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(final: Path, text: str) -> Path:
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(final)


def write_json(final: Path, data: object) -> Path:
    return write_text(final, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = _outgoing(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder so that it goes at once: renamed out of sight, then deleted. A process killed halfway
    leaves a hidden folder that `leftovers` finds, never a half-deleted one under its own name."""
    hidden = _outgoing(Path(path))
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def leftovers(folder: Path, prefix: str = "") -> list[Path]:
    """The hidden folders of this module's that a killed process left in `folder`, for names starting with
    `prefix`: a temporary whose block never finished (`.NAME.*.tmp`) and one on its way out (`.NAME.old`)."""
    return [p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith(f".{prefix}")
            and p.name.endswith((".tmp", ".old"))]


def _outgoing(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")
