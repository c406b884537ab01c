"""Device profiles: one schema, one loader, for every file in `devices/` and every probed machine.

A profile describes a target: its CPU, memory, accelerators and their execution providers, peak compute,
the quantization to package with, and the budgets that `plan` and `bench` judge against. Every figure
carries its source (datasheet, measured, derived, target) so a reader can tell a spec from a guess.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgeft.core import schema
from edgeft.core.errors import ConfigError, EdgeftError
from edgeft.core.schema import spec

SOURCES = ("datasheet", "measured", "derived", "target")
TRAINING_EPS = ("cpu", "cuda")
INFERENCE_EPS = ("cpu", "cuda", "dml", "webgpu", "qnn", "coreml", "tensorrt")
ARCHES = ("x86_64", "aarch64")
PRECISIONS = ("int4", "int8", "fp16", "fp32")

DEVICES_DIR = Path(__file__).resolve().parents[2] / "devices"


@dataclass(frozen=True)
class Figure:
    """A number with where it came from."""

    value: float = spec("the figure, in the unit its field name states", gt=0)
    source: str = spec("where it came from", choices=SOURCES)
    ref: str = spec("document, formula or command it came from")
    date: str | None = spec("YYYY-MM or YYYY-MM-DD; required for measured figures", None)

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, self.source != "measured" or bool(self.date),
                     "date: missing; a measured figure needs the date it was measured (YYYY-MM-DD)")
        schema.raise_if(problems)


@dataclass(frozen=True)
class CPU:
    arch: str = spec("instruction set architecture", choices=ARCHES)
    model: str = spec("CPU model name")
    cores: int = spec("physical cores", min=1)
    isa: list[str] = spec("ISA extensions that matter for kernels (avx512f, neon, dotprod, i8mm...)")
    max_freq_ghz: Figure = spec("highest sustained all-core clock")
    peak_fp32_gflops: Figure = spec("fp32 peak across all cores (FMA = 2 FLOPs)")
    peak_int8_gops: Figure | None = spec("int8 MatMul peak across all cores (u8 x s8 -> s32, 2 ops a multiply-add; "
                                         "VNNI, dot-product and i8mm units), as `devices probe` measures it", None)


@dataclass(frozen=True)
class Memory:
    total_gb: Figure = spec("installed memory (GB = 1e9 bytes)")
    budget_gb: Figure = spec("what fine-tuning may use, leaving room for the OS and the app")
    bandwidth_gbs: Figure = spec("peak DRAM bandwidth, GB/s")
    shared_with_accelerator: bool = spec("accelerator and CPU share this memory (Jetson, laptop SoCs)", False)


@dataclass(frozen=True)
class Accelerator:
    name: str = spec("accelerator name")
    kind: str = spec("kind of accelerator", choices=("gpu", "npu"))
    memory_gb: Figure | None = spec("dedicated memory; leave out when shared with the CPU", None)
    bandwidth_gbs: Figure | None = spec("dedicated memory bandwidth, GB/s", None)
    fp32_tflops: Figure | None = spec("fp32 peak", None)
    fp16_tflops: Figure | None = spec("fp16 peak (dense tensor cores where present)", None)
    int8_tops: Figure | None = spec("int8 peak (dense unless the ref says otherwise)", None)


@dataclass(frozen=True)
class ExecutionProviders:
    training: list[str] = spec("providers the training runtime can use, best first", choices=TRAINING_EPS)
    inference: list[str] = spec("providers for the packaged model, best first", choices=INFERENCE_EPS)
    training_backend: str = spec(
        "ort: ONNX Runtime training build; torch: PyTorch, where no 1.19.2 training wheel exists "
        "(Linux aarch64)", "ort", choices=("ort", "torch"))


@dataclass(frozen=True)
class Quantization:
    precision: str = spec("precision to package with", "int4", choices=PRECISIONS)
    block_size: int = spec("int4 block size along the input dimension", 32, choices=(16, 32, 64, 128, 256))
    accuracy_level: int = spec("MatMulNBits accuracy level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8", 4,
                               choices=(0, 1, 2, 3, 4))
    symmetric: bool = spec("symmetric int4 (no zero points)", True)


@dataclass(frozen=True)
class Budgets:
    basis: str = spec("the model and settings the throughput budgets are set for")
    train_tokens_per_s: Figure | None = spec("fine-tuning throughput to reach", None)
    peak_memory_gb: Figure | None = spec("peak resident memory of any stage on the device", None)
    decode_tokens_per_s: Figure | None = spec("generation speed of the packaged model", None)
    ttft_ms: Figure | None = spec("time to first token for a 128-token prompt", None)


@dataclass(frozen=True)
class Profile:
    name: str = spec("profile name; equals the file name without .yaml")
    description: str = spec("one line a person reads")
    cpu: CPU = spec("host CPU")
    memory: Memory = spec("host memory")
    execution_providers: ExecutionProviders = spec("execution providers for training and inference")
    quantization: Quantization = spec("packaging quantization", default_factory=Quantization)
    accelerators: list[Accelerator] = spec("GPUs and NPUs", default_factory=list)
    budgets: Budgets | None = spec("targets that plan and bench judge against", None)
    notes: list[str] = spec("caveats a user of this profile should know", default_factory=list)

    def __post_init__(self):
        problems: list[str] = []
        if self.memory.budget_gb.value > self.memory.total_gb.value:
            problems.append(f"memory.budget_gb: {self.memory.budget_gb.value} exceeds memory.total_gb "
                            f"{self.memory.total_gb.value}; a budget must fit in the installed memory")
        gpus = [a for a in self.accelerators if a.kind == "gpu"]
        for ep in ("cuda", "dml", "webgpu", "tensorrt"):
            if (ep in self.execution_providers.training or ep in self.execution_providers.inference) and not gpus:
                problems.append(f"execution_providers: {ep!r} needs a GPU in accelerators; add one or drop {ep!r}")
        if self.budgets and self.budgets.peak_memory_gb:
            if self.budgets.peak_memory_gb.value > self.memory.total_gb.value:
                problems.append(f"budgets.peak_memory_gb: {self.budgets.peak_memory_gb.value} exceeds "
                                f"memory.total_gb {self.memory.total_gb.value}")
        schema.raise_if(problems)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory.budget_gb.value * 1e9)


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGEFT_DEVICES_PATH", "").split(os.pathsep) if p]
    return [*extra, DEVICES_DIR]


def available() -> dict[str, Path]:
    """Profile name -> file, earlier search dirs first."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def load_file(path: Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"device profile {path} does not exist or is not a file")
    data = schema.load_yaml(path, "device profile")
    profile = schema.parse(Profile, data, f"device profile {path}")
    if profile.name != path.stem:
        raise ConfigError(f"device profile {path}",
                          [f"name: {profile.name!r} differs from the file name; use {path.stem!r}"])
    return profile


def load(name_or_path: str | os.PathLike) -> Profile:
    """A profile by name (from `devices/` or EDGEFT_DEVICES_PATH) or by the path of a YAML file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
        return load_file(Path(text))
    names = available()
    if text not in names:
        close = difflib.get_close_matches(text, names, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise EdgeftError(f"unknown device {text!r}; {hint}`edgeft devices list` shows all "
                          f"({len(names)} known), or pass the path of a profile file")
    return load_file(names[text])


def to_yaml(profile: Profile) -> str:
    return yaml.safe_dump(schema.to_dict(profile), sort_keys=False, width=110, allow_unicode=True)


def figures(profile: Profile) -> list[tuple[str, Figure]]:
    """Every figure in the profile with its dotted path, for display and for tests."""
    out: list[tuple[str, Figure]] = []

    def walk(obj, path):
        if isinstance(obj, Figure):
            out.append((path, obj))
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")

    walk(profile, "")
    return out


def over_ssh(profile: Profile) -> list[str]:
    """What runs on this device from a workstation (`--on`), and how: the device needs Python 3.10+ with venv, and
    gets a runtime of only what each command needs (targets/)."""
    return ["devices probe --on: numpy, psutil and onnxruntime there",
            "bench --on: the bundle under onnxruntime-genai there (" + ", ".join(profile.execution_providers.inference)
            + ")",
            ("train --on: the ONNX Runtime training build there (onnxruntime-training-cpu, onnx, numpy; x86-64, "
             "Python 3.8-3.12)" if profile.execution_providers.training_backend == "ort" else
             "train --on --backend torch: torch, numpy and safetensors there, and the model exported here with "
             "torch.export (no transformers; the ONNX Runtime training build has no wheel for this device)")]
