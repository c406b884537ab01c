"""A workspace folder and its manifest: what each stage wrote, from what, with which libraries.

`WS/manifest.json` holds one record per stage: config, inputs and outputs with content hashes, library
versions, timings and metrics. A stage reads what the previous stage wrote; rerun on unchanged inputs it
does nothing and says so. "Unchanged" means the recorded files still hash as recorded (`Workspace.hashes`
remembers hashes by size, modification time and inode, so checking costs a stat per file). A stage that
writes holds the workspace's lock (lock.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from edgeft.core import atomic, fingerprint, lock, state
from edgeft.core.errors import EdgeftError

MANIFEST = "manifest.json"
HASH_CACHE = ".hashes.json"
MANIFEST_FIX = ("it records what every stage wrote and from what, so edgeft cannot trust this workspace without it: "
                "restore it from a backup, or start a new workspace (`edgeft prepare MODEL_DIR --out NEW_WS`)")
LIBRARIES = ("edgeft", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai",
             "safetensors", "numpy")


_HASHES: dict[str, fingerprint.Hashes] = {}


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
        self._hashes: fingerprint.Hashes | None = None

    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[Workspace]:
        """Hold the workspace's lock while `stage` writes to it; the hash cache is saved on the way out."""
        with lock.hold(self.root, stage):
            try:
                yield self
            finally:
                if self._hashes is not None and self.manifest_path.is_file():  # not for a prepare that failed
                    self._hashes.save()

    @property
    def hashes(self) -> fingerprint.Hashes:
        """The workspace's hash cache, one per folder in a process (`run` and the stages it calls share it)."""
        if self._hashes is None:
            self._hashes = _HASHES.setdefault(str(self.root), fingerprint.Hashes(self.root / HASH_CACHE))
        return self._hashes

    def check_files(self, recorded: dict[str, str], what: str, fix: str) -> None:
        """Refuse, naming the files and `fix`, when files a stage recorded (relative to the workspace) are missing
        or no longer hash as recorded."""
        if changed := self.hashes.changed(recorded, self.root):
            raise EdgeftError(f"{what} in {self.root} were changed or damaged after they were written: "
                              f"{fingerprint.describe(changed, self.root)}; {fix}")

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        manifest = state.read_json(self.manifest_path, "the workspace manifest", MANIFEST_FIX, keys=("stages",))
        if not isinstance(manifest["stages"], dict) or not all(isinstance(r, dict) for r in manifest["stages"].values()):
            raise EdgeftError(f"the workspace manifest {self.manifest_path} is damaged (its stages are not records); "
                              f"{MANIFEST_FIX}")
        return manifest

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
