"""Where every benchmark leaves its figures: `results/<name>.json` (the rows) and `results/<name>.md` (a table)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def save(out: Path, name: str, result: dict, markdown: Callable[[dict], str]) -> None:
    """Write `out/name.json` and `out/name.md`, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
