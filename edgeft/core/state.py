"""State files edgeft wrote and reads back: manifests, a checkpoint's trainer state, pointers, metrics logs.

They are written atomically, so edgeft itself never leaves one half-written; a damaged one was damaged from
outside (a disk error, an editor, a copy cut short). Reading one is the one place where that becomes a user
error that names the file and how to recover, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError


def read_json(path: Path, what: str, fix: str, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in `path` (`what` names it in messages), with `keys` present; otherwise an EdgeftError
    that says what is wrong with the file and ends with `fix`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeftError(f"{what} {path} is missing; {fix}") from None
    except IsADirectoryError:
        raise EdgeftError(f"{what} {path} is a folder, not a file; {fix}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise EdgeftError(f"{what} {path} is damaged (not valid JSON: {str(e)[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise EdgeftError(f"{what} {path} is damaged (it holds a JSON {type(data).__name__}, not an object); {fix}")
    if missing := [k for k in keys if k not in data]:
        raise EdgeftError(f"{what} {path} is damaged (no {', '.join(repr(k) for k in missing)}); {fix}")
    return data


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The objects of a JSON-lines log, and how many lines were skipped because they do not parse: a process killed
    while appending leaves its last line cut short, and the log stays usable without it."""
    rows, skipped = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped
