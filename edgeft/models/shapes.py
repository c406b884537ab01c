"""What a model folder's weights are, read from its safetensors headers alone (no tensor data), or for a folder
with config.json only, from the architecture built on the meta device: names, shapes, parameter counts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from edgeft.models import families

# The largest fp32 copy of a quantized base weight ONNX Runtime's training graphs make at once, in a dequantized
# tile or in MatMulNBits' own buffer (graph/frozen_base.py: bigger weights are used a tile of rows at a time; the
# planner counts one tile in flight). The training sessions' CPU arena hands a freed tile's block to the next one
# (trainer/session.py), where whole weights made buffers as big as the weight (the LM head alone two 376 MB
# buffers): a real-width Phi-3 slice, int4 base, 1 x 256 tokens stepped in 3.7 s with tiles against 5.1 s with
# whole weights (arena off then, glibc reusing freed memory under its 32 MB mmap threshold), and peaked lower.
TILE_BYTES = 24 << 20


@functools.lru_cache(maxsize=16)
def _shapes(model_dir: str, mtime: float) -> tuple[tuple[str, tuple[int, ...]], ...]:
    path = Path(model_dir)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if not has_weights and (path / "config.json").is_file() and not any(path.glob("*.bin")):
        return _meta_shapes(path)
    out = []
    for file in families.weight_files(path):
        out += [(name, tuple(info["shape"])) for name, info in families.safetensors_header(file).items()]
    return tuple(out)


def _meta_shapes(model_dir: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A config-only folder (plan before downloading): the model built on the meta device, no memory used."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def weight_shapes(model_dir: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every weight: from the safetensors headers (no tensor data is read), or, for a folder
    with config.json alone, from the architecture."""
    model_dir = Path(model_dir).resolve()
    config = model_dir / "config.json"
    return _shapes(str(model_dir), config.stat().st_mtime if config.is_file() else 0.0)


def tensor_sizes(model_dir: Path):
    """(name, element count) of every weight."""
    for name, shape in weight_shapes(model_dir):
        n = 1
        for d in shape:
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


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (out_features, in_features) of every 2-D weight."""
    return {name[: -len(".weight")]: shape for name, shape in weight_shapes(model_dir)
            if name.endswith(".weight") and len(shape) == 2}
