"""One writer per workspace.

Every stage that writes into a workspace (prepare, export, train, merge, package, eval, bench, and `run`
around them) holds `WS/.edgeft.lock`, an exclusive `flock` on a file that names the holder: pid, command,
stage, start time, host. A second writer is refused with that description instead of both "succeeding" and
one result silently replacing the other. The kernel drops the lock when its process ends, however it ends,
so the lock of a killed process is simply taken over; the holder removes the file when it is done.

Held once per process and folder: `run` holds it around the stages it calls, which take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edgeft.core.errors import EdgeftError

LOCK = ".edgeft.lock"

_held: dict[str, int] = {}  # folder -> how many holders in this process


def _describe(info: dict) -> str:
    return (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')}, stage {info.get('stage', '?')}, started "
            f"{info.get('started', '?')} on {info.get('host', '?')})")


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _acquire(path: Path, folder: Path) -> int:
    """An fd holding the lock on `path`, which is the file now at that path (a holder that just finished unlinks
    it, and a lock taken on the unlinked file would exclude nobody)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise EdgeftError(f"workspace {folder} is in use: {_describe(holder)} is writing to it. Wait for it to "
                              f"finish, or stop it (kill {holder.get('pid', 'PID')}); two writers would overwrite "
                              "each other's results") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold(folder: Path, stage: str) -> Iterator[None]:
    """Hold the lock of workspace `folder` (created if missing, and removed again if this left it empty) while
    `stage` writes to it; EdgeftError naming the holder if another process holds it."""
    folder = Path(folder).absolute()
    key = str(folder.resolve()) if folder.exists() else str(folder)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    if folder.exists() and not folder.is_dir():
        raise EdgeftError(f"{folder} is a file, not a workspace folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    path = folder / LOCK
    fd = _acquire(path, folder)
    try:
        previous = _read(fd)
        if previous and not _alive(previous.get("pid")):
            print(f"note: took over the lock of {folder} from {_describe(previous)}, which is no longer running",
                  file=sys.stderr)
        info = {"pid": os.getpid(), "command": shlex.join(["edgeft", *sys.argv[1:]]) if sys.argv else stage,
                "stage": stage, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a stage that failed before writing leaves nothing behind
