"""The ONNX Runtime training build, installed by edgeft into a side directory of its own.

onnxruntime-training 1.19.2 (the last release) and onnxruntime>=1.31 (which onnxruntime-genai needs)
both own the `onnxruntime` import package, so they cannot share a process. The main environment keeps
the inference build; the training build goes into `runtime_dir()` with `pip install --target --no-deps`,
together with onnx 1.17.0: onnx 1.23 stamps IR 14 on optimizer models (1.19.2 reads IR <= 10) and
refuses to overwrite external data when `generate_artifacts` re-saves past 2 GB. Code that needs it runs
in a subprocess through `edgeft.runtime.launcher`, with this directory first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError

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
    "cuda": Variant("cuda", "onnxruntime-training", "about 3 GB with its CUDA 11.8 and cuDNN 8.9 libraries; needs an "
                                                    "NVIDIA driver for CUDA 11 or later"),
}

# The CUDA build of onnxruntime-training 1.19.2 links CUDA 11.8 and cuDNN 8 (its provider library needs
# libcudart.so.11.0, libcublas(Lt).so.11, libcudnn.so.8, libcurand.so.10, libcufft.so.10; its
# build_and_package_info says cuda_version 11.8), which a CUDA 12 machine lacks. NVIDIA's wheels of those
# libraries go into the same side directory, and the child process finds them on LD_LIBRARY_PATH. Its kernels
# are built for sm_60 to sm_90, with PTX for newer GPUs.
CUDA_LIBRARIES = ("nvidia-cuda-runtime-cu11==11.8.89", "nvidia-cublas-cu11==11.11.3.6", "nvidia-curand-cu11==10.3.0.86",
                  "nvidia-cufft-cu11==10.9.0.58", "nvidia-cudnn-cu11==8.9.6.50")


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


def is_complete(variant: str = "cpu") -> bool:
    """Installed, and for CUDA with the libraries it links (installs before 2026-11-23 lack them)."""
    return is_installed(variant) and (variant != "cuda" or bool(stamp(variant).get("cuda_libraries")))


def library_dirs(path: Path) -> list[Path]:
    """The folders of the CUDA libraries installed with the CUDA build at `path` (none for the CPU build)."""
    return sorted((Path(path) / "nvidia").glob("*/lib"))


def cuda_problem() -> str | None:
    """Why this machine cannot run the CUDA build, or None. Asked of the NVIDIA driver directly, as the CUDA
    runtime will: without a driver, ONNX Runtime's CUDA provider aborts the process rather than raising."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if (rc := cuda.cuInit(0)) != 0:
        return f"the NVIDIA driver did not start (cuInit error {rc}; no GPU, or CUDA_VISIBLE_DEVICES hides them all)"
    cuda.cuDriverGetVersion(ctypes.byref(version))
    if version.value < 11000:
        return f"the NVIDIA driver supports CUDA {version.value // 1000}.{version.value % 1000 // 10}; the build needs 11 or later"
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    return None


def active_variant(ep: str = "cpu") -> str:
    """The variant a run with execution provider `ep` uses; CUDA needs the CUDA build, its libraries and a GPU."""
    if ep == "cuda":
        if not is_installed("cuda"):
            raise EdgeftError("--ep cuda needs the CUDA training build; run `edgeft runtime install --cuda`")
        if not is_complete("cuda"):
            raise EdgeftError("the CUDA training build was installed without the CUDA 11.8 libraries it links; run "
                              "`edgeft runtime install --cuda`")
        if problem := cuda_problem():
            raise EdgeftError(f"--ep cuda: {problem}. Train on the CPU with --ep cpu, or on a machine with an NVIDIA "
                              "GPU and its driver")
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
    if is_complete(variant.name) and not force:
        return target
    reason = unsupported_reason()
    if reason:
        raise EdgeftError(reason)
    packages = [f"{variant.package}=={ORT_TRAINING_VERSION}", f"onnx=={ONNX_VERSION}"]
    libraries = list(CUDA_LIBRARIES) if cuda else []
    with atomic_dir(target) as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--target", str(tmp), *packages, *libraries]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise EdgeftError(f"installing {' '.join(packages + libraries)} failed (pip exit {proc.returncode}):\n{tail}\n"
                              "check network access to the package index, then run "
                              "`edgeft runtime install` again")
        (tmp / STAMP).write_text(json.dumps(
            {"variant": variant.name, "packages": packages, "cuda_libraries": libraries,
             "python": platform.python_version()}, indent=2))
    return target
