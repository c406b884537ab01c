"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
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
        os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp's 0600 would make every written file private
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask (read without changing it where Linux says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_text(final: Path, text: str) -> Path:
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(final)


def write_json(final: Path, data: object) -> Path:
    return write_text(final, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_npz(final: Path, arrays: dict) -> Path:
    """Named numpy arrays as an .npz (no pickled objects)."""
    import numpy as np

    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only if the block succeeds. What a killed
    writer of `final` left is swept first (`sweep`)."""
    final = Path(final)
    with scratch_dir(final.parent, final.name) as tmp:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would make the folder private
        if final.exists():
            old = _outgoing(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


@contextlib.contextmanager
def scratch_dir(folder: Path, name: str) -> Iterator[Path]:
    """A working folder in `folder` (on the disk its results go to, so that they can be renamed into place),
    deleted after the block. It is hidden and named for its process, so that the next `scratch_dir` of the
    same name sweeps it if that process was killed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep(folder, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder so that it goes at once: renamed out of sight, then deleted. A process killed halfway
    leaves a hidden temporary that `sweep` and `leftovers` find, never a half-deleted folder under its name."""
    path = Path(path)
    hidden = path.with_name(f".{path.name}.{os.getpid()}.removed.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def sweep(folder: Path, name: str) -> list[str]:
    """Clear what killed processes left in `folder` while writing `name`: their temporary folders (named for
    their process id; those of a process still running are left alone), and the previous version of `name`
    on its way out (`.NAME.old`: deleted if `name` is there, put back if the kill came between the two
    renames of atomic_dir). Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    temporary = re.compile(rf"\.{re.escape(name)}\.(\d+)\.\w+\.tmp")
    removed = []
    for path in folder.iterdir():
        match = temporary.fullmatch(path.name)
        if match and path.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    old, final = _outgoing(folder / name), folder / name
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
        else:
            os.replace(old, final)
    return sorted(removed)


def leftovers(folder: Path, prefix: str = "") -> list[Path]:
    """The hidden folders of this module's that a killed process left in `folder`, for names starting with
    `prefix`: a temporary (`.NAME.*.tmp`) and one on its way out (`.NAME.old`). Only for a folder no process
    is writing to: a running process's temporaries are among them."""
    return [p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith(f".{prefix}")
            and p.name.endswith((".tmp", ".old"))]


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _outgoing(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")
