"""The ONNX Runtime training build, installed by edgeft into a side directory of its own.

onnxruntime-training 1.19.2 (the last release) and onnxruntime>=1.31 (which onnxruntime-genai needs)
both own the `onnxruntime` import package, so they cannot share a process. The main environment keeps
the inference build; the training build goes into `runtime_dir()` with `pip install --target --no-deps`,
together with onnx 1.17.0: onnx 1.23 stamps IR 14 on optimizer models (1.19.2 reads IR <= 10) and
refuses to overwrite external data when `generate_artifacts` re-saves past 2 GB. Code that needs it runs
in a subprocess through `edgeft.launcher`, with this directory first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeft.atomic import atomic_dir
from edgeft.errors import EdgeftError

ORT_TRAINING_VERSION = "1.19.2"
ONNX_VERSION = "1.17.0"
STAMP = "edgeft-runtime.json"


@dataclass(frozen=True)
class Variant:
    name: str
    package: str
    size_note: str


VARIANTS = {
    "cpu": Variant("cpu", "onnxruntime-training-cpu", "9 MB wheel"),
    "cuda": Variant("cuda", "onnxruntime-training", "841 MB wheel, needs CUDA 12 and cuDNN 9"),
}


def root_dir() -> Path:
    """Where training runtimes live: EDGEFT_RUNTIME_DIR, else inside the active environment."""
    env = os.environ.get("EDGEFT_RUNTIME_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "edgeft" / "runtime"


def runtime_dir(variant: str = "cpu") -> Path:
    return root_dir() / f"ort-training-{variant}-{ORT_TRAINING_VERSION}"


def stamp(variant: str = "cpu") -> dict | None:
    """What `install` recorded, or None when that variant is not (completely) installed."""
    path = runtime_dir(variant) / STAMP
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_installed(variant: str = "cpu") -> bool:
    return stamp(variant) is not None


def active_variant(ep: str = "cpu") -> str:
    """The variant a run with execution provider `ep` uses; CUDA needs the CUDA build."""
    if ep == "cuda":
        if not is_installed("cuda"):
            raise EdgeftError("--ep cuda needs the CUDA training build; run `edgeft runtime install --cuda`")
        return "cuda"
    if is_installed("cpu"):
        return "cpu"
    if is_installed("cuda"):
        return "cuda"
    raise EdgeftError("the ONNX Runtime training build is not installed; run `edgeft runtime install` "
                      "(or `make setup`)")


def unsupported_reason() -> str | None:
    """Why no 1.19.2 training wheel exists for this interpreter, or None when one does."""
    machine = platform.machine().lower()
    if sys.version_info >= (3, 13):
        return (f"onnxruntime-training {ORT_TRAINING_VERSION} has wheels for Python <= 3.12 only "
                f"(this is {platform.python_version()}); use Python 3.10-3.12 or --backend torch")
    if sys.platform.startswith("linux") and machine in ("aarch64", "arm64"):
        return (f"onnxruntime-training {ORT_TRAINING_VERSION} has no Linux aarch64 wheel; train with "
                "--backend torch, or build the training runtime from source")
    return None


def install(cuda: bool = False, force: bool = False) -> Path:
    """Install the training build (and onnx 1.17.0) into its side directory; a no-op when present."""
    variant = VARIANTS["cuda" if cuda else "cpu"]
    target = runtime_dir(variant.name)
    if is_installed(variant.name) and not force:
        return target
    reason = unsupported_reason()
    if reason:
        raise EdgeftError(reason)
    packages = [f"{variant.package}=={ORT_TRAINING_VERSION}", f"onnx=={ONNX_VERSION}"]
    with atomic_dir(target) as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--target", str(tmp), *packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise EdgeftError(f"installing {' '.join(packages)} failed (pip exit {proc.returncode}):\n{tail}\n"
                              "check network access to the package index, then run "
                              "`edgeft runtime install` again")
        (tmp / STAMP).write_text(json.dumps(
            {"variant": variant.name, "packages": packages, "python": platform.python_version()}, indent=2))
    return target
