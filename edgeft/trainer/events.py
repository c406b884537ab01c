"""The child side of the launcher's protocol: one JSON object per line on a pipe of its own.

Events: `progress` (any numeric fields), `log` (message), `result` (data), `error` (kind user|bug,
type, message, traceback). stdout and stderr stay free for the libraries' own chatter.
"""

from __future__ import annotations

import json
import os
import time

_stream = None


def open_channel() -> None:
    global _stream
    fd = int(os.environ["EDGEFT_EVENT_FD"])
    _stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def emit(event: str, **data) -> None:
    if _stream is None:
        return
    _stream.write(json.dumps({"event": event, "time": time.time(), **data}, default=str) + "\n")
    _stream.flush()


def progress(**fields) -> None:
    emit("progress", **fields)


def log(message: str) -> None:
    emit("log", message=message)
