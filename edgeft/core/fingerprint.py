"""Content hashes of files, and a cache that makes checking them again cheap.

A stage records the sha256 of what it read and wrote; "unchanged" means the files still hash to that. Hashing a
Phi-3-mini's 7.6 GB again on every run would take a minute, so `Hashes` remembers each file's hash with its size,
modification time and inode, and hashes again only when one of those changed. A file damaged in place changes
them (a truncated or rewritten file always changes its size or its modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgeft.core import atomic


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Hashes:
    """sha256 of files, remembered in `cache` (a JSON file) by path, size, modification time and inode."""

    def __init__(self, cache: Path | None = None):
        self.cache = Path(cache) if cache else None
        self.known: dict[str, dict] = {}
        self.dirty = False
        if self.cache and self.cache.is_file():
            try:
                known = json.loads(self.cache.read_text(encoding="utf-8"))
                self.known = known if isinstance(known, dict) else {}
            except (ValueError, UnicodeDecodeError):  # a cache: a damaged one is only forgotten
                self.known = {}

    def of(self, path: Path) -> str:
        path = Path(path).absolute()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.known.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = sha256_file(path)
        self.known[str(path)] = {"stamp": stamp, "sha256": digest}
        self.dirty = True
        return digest

    def files(self, paths: list[Path], root: Path) -> dict[str, str]:
        """{path relative to root: sha256} of `paths`, sorted."""
        return {Path(p).relative_to(root).as_posix(): self.of(p) for p in sorted(paths)}

    def folder(self, folder: Path, root: Path) -> dict[str, str]:
        """Every file under `folder` (hidden ones too), relative to `root`."""
        return self.files([p for p in Path(folder).rglob("*") if p.is_file()], root)

    def changed(self, recorded: dict[str, str], root: Path) -> list[str]:
        """The recorded files (relative to `root`) that are missing or no longer hash as recorded."""
        out = []
        for rel, digest in recorded.items():
            path = Path(root) / rel
            if not path.is_file() or self.of(path) != digest:
                out.append(rel)
        return out

    def save(self) -> None:
        if self.cache and self.dirty:
            live = {k: v for k, v in self.known.items() if os.path.exists(k)}
            atomic.write_json(self.cache, live)
            self.dirty = False


def describe(changed: list[str], root: Path) -> str:
    """'training_model.onnx (changed), base.data (missing)': what `changed` found, for a message."""
    return ", ".join(f"{rel} ({'changed' if (Path(root) / rel).is_file() else 'missing'})" for rel in changed[:3]) + (
        f" and {len(changed) - 3} more" if len(changed) > 3 else "")
