"""The one base class for mistakes a user can fix.

The CLI prints `error: <message>` and exits 2 for these, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno
import shlex


class EdgeftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def command(*words) -> str:
    """A command line to print for the user to paste back: every word shell-quoted (paths with spaces)."""
    return shlex.join(str(w) for w in words)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`), handled as Ctrl-C is: the stage stops where it can save, and the
    training runtime is asked to do the same (launcher.py)."""


terminated = False  # whether this process received SIGTERM


def terminate_like_interrupt() -> None:
    """From now on SIGTERM raises Terminated in the main thread (the CLI and the training runtime call this)."""
    import signal

    def handler(signum, frame):
        global terminated
        terminated = True
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


class ConfigError(EdgeftError):
    """One or more invalid fields, collected and reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


FREE_SPACE = "Free some space, or put the workspace on a bigger disk, and run the command again"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)


def disk_full(error: BaseException | str) -> bool:
    """Whether `error` (or a failed program's output) is a write that ran out of disk space. Libraries with C++
    writers (ONNX Runtime's checkpoint, safetensors, protobuf) raise another type carrying the OS message."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def disk_full_message(error: BaseException) -> str:
    where = f" writing {error.filename}" if isinstance(error, OSError) and error.filename else ""
    return (f"no space left on the device{where} ({error}). {FREE_SPACE}: the stage wrote into a temporary that "
            "was removed, so no output was left half-written")


def storage_problem(error: BaseException | str) -> str | None:
    """The message for an error that is the file system's refusal (full, read-only, permission denied), or None
    for any other error. These are the user's to fix, wherever they surface: in this process, in the training
    runtime's, or in a C++ writer that only passes the OS message on."""
    if disk_full(error):
        return disk_full_message(error) if isinstance(error, BaseException) else (
            f"no space left on the device. {FREE_SPACE}")
    code = error.errno if isinstance(error, OSError) else None
    name = f" {error.filename}" if isinstance(error, OSError) and error.filename else ""
    text = str(error)
    if code in _READ_ONLY or "Read-only file system" in text:
        return (f"cannot write{name}: the file system is read-only ({text}). Put the workspace on a writable disk "
                "(prepare --out, or a recipe's workspace:) and run the command again; nothing was written")
    if code in _DENIED or (code is None and "Permission denied" in text):
        return (f"permission denied{' on' + name if name else ''} ({text}). Check the permissions of that path, or "
                "run as a user who may read and write it; the stage stopped before writing its output")
    return None
