"""`edgeft doctor`: everything a run needs, one line per item, with the fix for what is missing."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.runtime import jobs, training_build

MIN_ORT = (1, 31)
PYTHON_RANGE = ((3, 10), (3, 12))


@dataclass
class Check:
    name: str
    ok: bool
    version: str | None = None
    detail: str = ""
    fix: str = ""
    required: bool = True
    extra: dict = field(default_factory=dict)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _package(import_name: str, dist: str, minimum: tuple[int, ...] | None = None, fix: str = "") -> Check:
    fix = fix or "run `make setup` (or `pip install -e .`)"
    try:
        module = importlib.import_module(import_name)
    except Exception as e:  # noqa: BLE001 - any import failure is what doctor reports
        return Check(dist, False, detail=f"cannot import {import_name}: {type(e).__name__}: {e}", fix=fix)
    version = getattr(module, "__version__", None) or md.version(dist)
    if minimum and _version_tuple(version) < minimum:
        need = ".".join(map(str, minimum))
        return Check(dist, False, version, f"{version} is older than {need}", f"pip install '{dist}>={need}'")
    return Check(dist, True, version)


def check_python() -> Check:
    v = sys.version_info[:2]
    ok = PYTHON_RANGE[0] <= v <= PYTHON_RANGE[1]
    return Check("python", ok, platform.python_version(), sys.executable,
                 "" if ok else "use Python 3.10-3.12 (the training wheels stop at 3.12)")


def check_torch() -> Check:
    c = _package("torch", "torch", (2, 4))
    if c.ok:
        import torch

        c.extra["cuda"] = bool(torch.cuda.is_available())
        c.detail = "CUDA available" if c.extra["cuda"] else "CPU build" if "+cpu" in c.version else "no GPU in use"
    return c


def check_onnxruntime() -> Check:
    c = _package("onnxruntime", "onnxruntime", MIN_ORT)
    if c.ok:
        import onnxruntime

        c.extra["providers"] = onnxruntime.get_available_providers()
        c.detail = ", ".join(c.extra["providers"])
    return c


def check_genai() -> Check:
    c = _package("onnxruntime_genai", "onnxruntime-genai", (0, 18))
    return c


def check_training_runtime() -> Check:
    variant = "cuda" if training_build.is_installed("cuda") and not training_build.is_installed("cpu") else "cpu"
    path = training_build.runtime_dir(variant)
    reason = training_build.unsupported_reason()
    if not training_build.is_installed(variant):
        return Check("training_runtime", False, None, f"not installed at {path}",
                     reason or "run `edgeft runtime install` (CUDA: `edgeft runtime install --cuda`)",
                     required=reason is None, extra={"path": str(path)})
    from edgeft.runtime import launcher

    try:
        info = launcher.run(jobs.Info(), ep="cuda" if variant == "cuda" else "cpu")
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        return Check("training_runtime", False, None, f"installed at {path} but failed to start: {e}",
                     "run `edgeft runtime install --force`", extra={"path": str(path)})
    ok = info["onnxruntime_version"] == training_build.ORT_TRAINING_VERSION and info["training_importable"]
    return Check("training_runtime", ok, info["onnxruntime_version"],
                 f"{path} (onnx {info['onnx_version']}; {', '.join(info['providers'])})",
                 "" if ok else "run `edgeft runtime install --force`",
                 extra={"path": str(path), "providers": info["providers"], "onnx": info["onnx_version"]})


def check_cuda_training() -> list[Check]:
    """Whether `--ep cuda` can run here: only when the CUDA build is installed (it is optional)."""
    if not training_build.is_installed("cuda"):
        return []
    path = training_build.runtime_dir("cuda")
    if not training_build.is_complete("cuda"):
        return [Check("training_runtime_cuda", False, training_build.ORT_TRAINING_VERSION,
                      f"{path} lacks the CUDA 11.8 libraries it links", "run `edgeft runtime install --cuda`",
                      required=False)]
    problem = training_build.cuda_problem()
    detail = f"{path} with {len(training_build.library_dirs(path))} CUDA 11.8 library folders; "
    return [Check("training_runtime_cuda", problem is None, training_build.ORT_TRAINING_VERSION,
                  detail + (problem or "NVIDIA driver and GPU found"),
                  "" if problem is None else "--ep cuda needs an NVIDIA GPU and its driver", required=False)]


def check_distributed() -> Check:
    """What `train --nproc/--nnodes --strategy` can use here: torch.distributed's backends, FSDP2, DeepSpeed
    (found by its metadata: importing it takes seconds)."""
    import torch.distributed as dist

    backends = [b for b in ("gloo", "nccl") if getattr(dist, f"is_{b}_available")()]
    strategies = ["ddp"] + (["fsdp"] if importlib.util.find_spec("torch.distributed.fsdp") else [])
    try:
        deepspeed = md.version("deepspeed")
        strategies += ["zero2", "zero3"]
    except md.PackageNotFoundError:
        deepspeed = None
    import torch

    gpus = torch.cuda.device_count() if "nccl" in backends else 0  # NCCL ranks, one per GPU (train --ep cuda)
    ok = dist.is_available() and bool(backends)
    return Check("distributed", ok, deepspeed, f"backends {', '.join(backends) or 'none'}; strategies "
                 f"{', '.join(strategies)}" + ("" if deepspeed else " (zero2/zero3 need DeepSpeed)") +
                 f"; {gpus} GPU rank{'s' * (gpus != 1)} (--ep cuda)",
                 "" if deepspeed else "DS_BUILD_OPS=0 pip install 'edgeft[distributed]' (or `make setup`)",
                 required=False, extra={"backends": backends, "strategies": strategies, "gpus": gpus})


def check_disk(root: Path) -> Check:
    root = root if root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(root).free / 1e9
    ok = free_gb >= 5
    return Check("disk", ok, None, f"{free_gb:.1f} GB free at {root.resolve()}",
                 "" if ok else "free space: exports and checkpoints of real models need tens of GB",
                 required=False, extra={"free_gb": round(free_gb, 1)})


def run_checks(artifacts_root: Path = Path("artifacts")) -> list[Check]:
    return [
        check_python(),
        check_torch(),
        _package("transformers", "transformers", (5, 0)),
        _package("peft", "peft", (0, 17)),
        _package("onnx", "onnx", (1, 17)),
        _package("onnxscript", "onnxscript"),
        _package("safetensors", "safetensors"),
        check_onnxruntime(),
        check_genai(),
        check_training_runtime(),
        *check_cuda_training(),
        check_distributed(),
        check_disk(artifacts_root),
    ]


def as_json(checks: list[Check]) -> dict:
    by_name = {c.name: c for c in checks}
    out: dict = {"ok": all(c.ok for c in checks if c.required)}
    for c in checks:
        entry = {"version": c.version, "ok": c.ok, "detail": c.detail, "fix": c.fix or None}
        entry.update(c.extra)
        out[c.name.replace("-", "_")] = entry
    out["execution_providers"] = {
        "inference": by_name["onnxruntime"].extra.get("providers", []),
        "training": by_name["training_runtime"].extra.get("providers", []),
    }
    return out


