"""A workspace folder and its manifest: what each stage wrote, from what, with which libraries.

`WS/manifest.json` holds one record per stage: config, inputs and outputs with content hashes, library
versions, timings and metrics. A stage reads what the previous stage wrote; rerun on unchanged inputs it
does nothing and says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform
import time
from pathlib import Path

from edgeft import atomic
from edgeft.errors import EdgeftError

MANIFEST = "manifest.json"
LIBRARIES = ("edgeft", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai",
             "safetensors", "numpy")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: list[Path], root: Path) -> dict[str, str]:
    return {str(Path(p).relative_to(root)): sha256_file(p) for p in sorted(paths)}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()  # the training runtime runs elsewhere: never hand it a relative path

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text())

    def stage(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def require(self, stage: str, hint: str) -> dict:
        record = self.stage(stage)
        if record is None:
            raise EdgeftError(f"{self.root} has no completed '{stage}' stage; {hint}")
        return record

    def record(self, name: str, record: dict) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {})[name] = {
            **record, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions()}
        atomic.write_json(self.manifest_path, manifest)

    def drop(self, *names: str) -> None:
        """Forget stages whose outputs a rerun of an earlier stage made stale."""
        manifest = self.manifest()
        for name in names:
            manifest.get("stages", {}).pop(name, None)
        if self.manifest_path.exists():
            atomic.write_json(self.manifest_path, manifest)
