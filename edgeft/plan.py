"""Predictions before anything heavy runs: model size from the safetensors headers, time from a profile.

Step time comes from FLOPs per token against the profile's peak at an assumed efficiency. The efficiency
is a stated assumption until the planner is calibrated against measurements (benchmarks/).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from edgeft import families
from edgeft.devices import Profile

# Fraction of the profile's fp32 peak a LoRA training step reaches; uncalibrated (see module doc).
ASSUMED_EFFICIENCY = 0.3


def safetensors_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers (no tensor data is loaded)."""
    total = 0
    for path in families.weight_files(model_dir):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def training_flops_per_token(base_params: int, trainable_params: int = 0) -> float:
    """Forward 2N, backward to the activations 2N, plus weight gradients only for what trains (2T)."""
    return 4.0 * base_params + 2.0 * trainable_params


@dataclass(frozen=True)
class TimeEstimate:
    tokens: int
    flops: float
    peak_gflops: float
    efficiency: float
    seconds: float
    compute: str


def peak_gflops(profile: Profile) -> tuple[float, str]:
    eps = profile.execution_providers.training
    gpus = [a for a in profile.accelerators if a.kind == "gpu" and a.fp32_tflops]
    if eps and eps[0] == "cuda" and gpus:
        return gpus[0].fp32_tflops.value * 1000, f"{gpus[0].name} fp32"
    return profile.cpu.peak_fp32_gflops.value, f"{profile.cpu.model} fp32"


def estimate_time(tokens: int, base_params: int, profile: Profile, trainable_params: int = 0,
                  efficiency: float = ASSUMED_EFFICIENCY) -> TimeEstimate:
    flops = tokens * training_flops_per_token(base_params, trainable_params)
    peak, compute = peak_gflops(profile)
    return TimeEstimate(tokens, flops, peak, efficiency, flops / (peak * 1e9 * efficiency), compute)
