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


def tensor_sizes(model_dir: Path):
    """(name, element count) of every weight, read from the safetensors headers (no tensor data is loaded)."""
    for path in families.weight_files(model_dir):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                yield name, n


def safetensors_params(model_dir: Path) -> int:
    return sum(n for _, n in tensor_sizes(model_dir))


def matmul_params(model_dir: Path) -> int:
    """Parameters that take part in matrix products: all but the input embedding table, which is a
    lookup (unless tied, when the same table is also the LM head's matrix)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    sizes = list(tensor_sizes(model_dir))
    total = sum(n for _, n in sizes)
    embed = sum(n for name, n in sizes if name.endswith("embed_tokens.weight"))
    return total if config.get("tie_word_embeddings") else total - embed


def training_flops_per_token(matmul: int, trainable_params: int = 0) -> float:
    """Forward 2M, backward to the activations 2M (M: matmul parameters), weight gradients only for
    what trains (2T). Attention's own products are left out (under 2 % at the lengths edge runs use)."""
    return 4.0 * matmul + 2.0 * trainable_params


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
    flops = tokens * training_flops_per_token(base_params, trainable_params)  # base_params: matmul parameters
    peak, compute = peak_gflops(profile)
    return TimeEstimate(tokens, flops, peak, efficiency, flops / (peak * 1e9 * efficiency), compute)
