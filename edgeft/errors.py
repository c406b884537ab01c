"""The one base class for mistakes a user can fix.

The CLI prints `error: <message>` and exits 2 for these, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno


class EdgeftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(EdgeftError):
    """One or more invalid fields, collected and reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


FREE_SPACE = "Free some space, or put the workspace on a bigger disk, and run the command again"


def disk_full(error: BaseException | str) -> bool:
    """Whether `error` (or a failed program's output) is a write that ran out of disk space. Libraries with C++
    writers (ONNX Runtime's checkpoint, safetensors, protobuf) raise another type carrying the OS message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def disk_full_message(error: BaseException) -> str:
    where = f" writing {error.filename}" if isinstance(error, OSError) and error.filename else ""
    return (f"no space left on the device{where} ({error}). {FREE_SPACE}: the stage wrote into a temporary that "
            "was removed, so no output was left half-written")
