"""A workspace folder: its layout, its manifest of typed stage records, its lock and its hash cache.

`WS/manifest.json` holds one record per stage: its options, its inputs and outputs with content hashes, library
versions, timings and metrics. Each stage's record is a dataclass (`Record`), read back through the workspace
(`ws.read(Prepared).model_dir`) and written by it, which drops the records a rewritten stage made stale: the
stage order lives here (`PIPELINE`, `REPORTS`). A stage's record carries its `key`, a hash of its options, the
content of its inputs and the key of the stage it read; "unchanged" means the same key and outputs that still
hash as recorded (`unchanged`), one test for a stage deciding whether to run again and for `edgeft run`.
Hashes are remembered by size, modification time and inode (`Workspace.hashes`), so checking costs a stat per
file. A stage that writes holds the workspace's lock (lock.py). The folder layout is the workspace's too: stages
ask it for `ws.artifacts` or `ws.checkpoint(step)` instead of spelling paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata as md
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from edgeft.core import atomic, fingerprint, lock, schema, state
from edgeft.core.errors import ConfigError, EdgeftError

MANIFEST = "manifest.json"
HASH_CACHE = ".hashes.json"
MANIFEST_FIX = ("it records what every stage wrote and from what, so edgeft cannot trust this workspace without it: "
                "restore it from a backup, or start a new workspace (`edgeft prepare MODEL_DIR --out NEW_WS`)")
LIBRARIES = ("edgeft", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai",
             "safetensors", "numpy")
PIPELINE = ("prepare", "export", "train", "merge", "package")  # each reads what the one before it wrote
REPORTS = ("eval", "bench")  # read the pipeline's outputs; a rewritten pipeline stage makes them stale
STAGES = PIPELINE + REPORTS  # the order `edgeft run` runs them in


@dataclass(frozen=True, kw_only=True)
class Record:
    """What a stage recorded. Subclasses name their stage (`STAGE`) and add their fields."""

    STAGE: ClassVar[str] = ""
    key: str = schema.spec("hash of the options, the inputs' content and the upstream stage's key", "")
    finished_at: str = schema.spec("when the stage finished (set by the workspace)", "")
    versions: dict = schema.spec("library versions it ran with (set by the workspace)", default_factory=dict)


R = TypeVar("R", bound=Record)


def key_of(*parts) -> str:
    """A stage key: the hash of whatever JSON-able parts decide the stage's output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def checkpoint_dir(root: Path, step: int) -> Path:
    """A training checkpoint's folder in the checkpoints folder `root` (named here for both sides of the training
    runtime: the workspace and the trainer)."""
    return Path(root) / f"step-{step:06d}"


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

    @classmethod
    def existing(cls, root: Path) -> Workspace:
        """The workspace at `root`, which a stage after prepare needs to exist."""
        ws = cls(root)
        if not ws.root.is_dir():
            raise EdgeftError(f"workspace {ws.root} does not exist; run `edgeft prepare MODEL_DIR --out {ws.root}` "
                              "first")
        return ws

    # -- the folder layout --------------------------------------------------------------------------------------
    manifest_path = property(lambda self: self.root / MANIFEST)
    adapter_init = property(lambda self: self.root / "adapter_init", doc="the freshly initialised adapter (PEFT)")
    artifacts = property(lambda self: self.root / "artifacts", doc="ONNX Runtime training artifacts")
    data = property(lambda self: self.root / "data", doc="tokenized datasets, one folder per cache key")
    training = property(lambda self: self.root / "train", doc="the training run: metrics, plot, checkpoints")
    previous_training = property(lambda self: self.root / "train.previous", doc="a finished run put aside")
    checkpoints = property(lambda self: self.root / "train" / "checkpoints")
    metrics = property(lambda self: self.root / "train" / "metrics.jsonl")
    adapter = property(lambda self: self.root / "adapter", doc="the trained adapter, PEFT format")
    merged = property(lambda self: self.root / "merged", doc="the merged Hugging Face model")
    bundle = property(lambda self: self.root / "bundle", doc="the onnxruntime-genai bundle")
    eval_reports = property(lambda self: self.root / "eval", doc="edgeft eval's report")
    bench_reports = property(lambda self: self.root / "bench", doc="edgeft bench's report")
    builder_cache = property(lambda self: self.root / ".builder-cache")

    def checkpoint(self, step: int) -> Path:
        return checkpoint_dir(self.checkpoints, step)

    def log(self, name: str) -> Path:
        """A log file of the workspace (a subprocess's output): logs/NAME.log."""
        return self.root / "logs" / f"{name}.log"

    # -- lock and hashes ----------------------------------------------------------------------------------------
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

    # -- the manifest -------------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The manifest as JSON: every stage's record, as written."""
        if not self.manifest_path.exists():
            return {"stages": {}}
        manifest = state.read_json(self.manifest_path, "the workspace manifest", MANIFEST_FIX, keys=("stages",))
        if not isinstance(manifest["stages"], dict) or not all(isinstance(r, dict) for r in manifest["stages"].values()):
            raise EdgeftError(f"the workspace manifest {self.manifest_path} is damaged (its stages are not records); "
                              f"{MANIFEST_FIX}")
        return manifest

    def read(self, record_type: type[R]) -> R | None:
        """The record of `record_type`'s stage, or None if that stage has not completed."""
        data = self.manifest()["stages"].get(record_type.STAGE)
        if data is None:
            return None
        try:
            return schema.parse(record_type, data, f"the {record_type.STAGE} record", strict=False)
        except ConfigError as e:
            raise EdgeftError(f"the workspace manifest {self.manifest_path} holds a {record_type.STAGE} record this "
                              f"edgeft cannot read ({'; '.join(e.problems[:3])}); run `edgeft {record_type.STAGE}` "
                              "again, or start a new workspace") from None

    def require(self, record_type: type[R], hint: str) -> R:
        """The record of `record_type`'s stage; EdgeftError with `hint` (what to run) if it has not completed."""
        record = self.read(record_type)
        if record is None:
            raise EdgeftError(f"{self.root} has no completed '{record_type.STAGE}' stage; {hint}")
        return record

    def write(self, record: R) -> R:
        """Record a stage as finished (with the time and the library versions), and forget the stages its output
        made stale: the pipeline stages after it and the reports."""
        record = dataclasses.replace(record, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     versions=library_versions())
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        if record.STAGE in PIPELINE:
            for stale in PIPELINE[PIPELINE.index(record.STAGE) + 1:] + REPORTS:
                stages.pop(stale, None)
        stages[record.STAGE] = schema.to_dict(record, keep_none=True)
        atomic.write_json(self.manifest_path, manifest)
        return record

    def content(self, path: Path | None) -> str | None:
        """What a stage key holds of an input file: its content (sha256), so that a file edited in place runs the
        stage again; None for no file."""
        return self.hashes.of(path) if path is not None and Path(path).is_file() else None

    def unchanged(self, record_type: type[R], key: str) -> R | None:
        """The stage's record if it has this key and the files it wrote (`files`, when it records them) still hash
        as recorded; otherwise None: the stage must run."""
        record = self.read(record_type)
        if record is None or record.key != key:
            return None
        files = getattr(record, "files", None)
        return record if not files or not self.hashes.changed(files, self.root) else None

