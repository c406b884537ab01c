"""The child side of the launcher's protocol: one JSON object per line on a pipe of its own.

Events: `progress` (any numeric fields), `log` (message), `result` (data), `error` (kind user|bug,
type, message, traceback). stdout and stderr stay free for the libraries' own chatter.

Under torchrun (whose ranks inherit no pipe) the channel is a file the launcher follows (EDGEFT_EVENT_PATH), and
each node's first rank reports; the other ranks send their errors alone, with their rank.
"""

from __future__ import annotations

import json
import os
import time

_stream = None
_reports = True  # this process sends every event, not only its errors


def open_channel() -> None:
    global _stream, _reports
    if path := os.environ.get("EDGEFT_EVENT_PATH"):
        _stream = open(path, "a", buffering=1, encoding="utf-8")
        _reports = os.environ.get("LOCAL_RANK", "0") == "0"
    else:
        _stream = os.fdopen(int(os.environ["EDGEFT_EVENT_FD"]), "w", buffering=1, encoding="utf-8")


def emit(event: str, **data) -> None:
    if _stream is None or not (_reports or event == "error"):
        return
    if "RANK" in os.environ:
        data["rank"] = int(os.environ["RANK"])
    _stream.write(json.dumps({"event": event, "time": time.time(), **data}, default=str) + "\n")
    _stream.flush()


def progress(**fields) -> None:
    emit("progress", **fields)


def log(message: str) -> None:
    emit("log", message=message)
