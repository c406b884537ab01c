"""An int4 or int8 copy of the merged model for the GenAI builder, written one weight at a time.

Given an fp32 folder, the builder loads the whole model into PyTorch, builds an fp32 ONNX graph beside it
and then quantizes a protobuf copy of that graph: 2.7x the fp32 weights at its peak on the Phi-3-mini slice
(benchmarks/results/package.md), past 40 GB for a full-size Phi-3-mini. The builder also reads
pre-quantized checkpoints through its public input path. In the Olive layout each MatMul weight is stored as
`qweight` [out, in * bits / 8] uint8, `scales` [out, blocks] and `qzeros` [out, packed blocks] uint8, and
the builder emits those blocks as MatMulNBits without touching them.

So `package` quantizes each decoder Linear here, one tensor at a time, with the same MLAS quantizer and
settings the builder runs (`quantize.nbits_blocks`), and gives the builder that folder. The bundle computes
the same function (tests/stages/test_package.py checks that the dequantized weights are identical and that logits
agree), and no process holds the fp32 model. The embeddings and the LM head stay as they are, and the
builder quantizes the LM head itself, as it always did.

Two things the builder's loader needs (onnxruntime-genai 0.18, `models/loaders/base.py`):
- Every block carries an explicit zero point, because the loader's q/k/v packing concatenates them.
  Symmetric blocks get the zero point MatMulNBits implies anyway (8 for int4, 128 for int8).
- A fused `gate_up_proj` is written as `gate_proj` and `up_proj`. The loader splits a fused Olive `qzeros`
  tensor at row intermediate_size / 2 instead of intermediate_size, and ORT then refuses the model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from edgeft.models import families
from edgeft.quant import quantize

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def unsupported(folder: Path, block_size: int) -> str | None:
    """Why this folder cannot take the quantized route (the builder then quantizes the fp32 model), or None."""
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        return "the model is already quantized"
    for path in families.weight_files(folder):
        for name, info in sorted(families.safetensors_header(path).items()):
            shape = info["shape"]
            if name.startswith("model.layers.") and len(shape) == 2 and not LINEAR.match(name):
                return f"{name} is a decoder weight the builder's quantized loader does not name"
            if LINEAR.match(name) and shape[1] % block_size:
                return f"{name} has {shape[1]} inputs, not a multiple of the block size {block_size}"
    return None


def write(folder: Path, dst: Path, bits: int, block_size: int, symmetric: bool) -> dict:
    """Write the quantized copy of `folder` (a Hugging Face model folder) into `dst`."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from edgeft.models import lazy

    dst.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dst / path.name)
    shards = lazy.Shards(folder)
    tensors: dict[str, torch.Tensor] = {}
    quantized = 0
    for name in shards.files:
        if not LINEAR.match(name):
            tensors[name] = shards.tensor(name)
            continue
        weight = shards.read(name)
        parts = [(name, weight)]
        if name.endswith(".gate_up_proj.weight"):  # written apart: see the module docstring
            half = weight.shape[0] // 2
            parts = [(name.replace("gate_up_proj", "gate_proj"), weight[:half]),
                     (name.replace("gate_up_proj", "up_proj"), weight[half:])]
        for part, w in parts:
            codes, scales, zero = quantize.nbits_blocks(w.numpy().T, block_size, symmetric, bits)
            stem = part[: -len(".weight")]
            tensors[stem + ".qweight"] = torch.from_numpy(codes.reshape(codes.shape[0], -1))
            tensors[stem + ".scales"] = torch.from_numpy(scales)
            if bits == 4:
                zero = quantize.pack_nibbles(zero)
            tensors[stem + ".qzeros"] = torch.from_numpy(np.ascontiguousarray(zero, dtype=np.uint8))
            quantized += 1
        del weight, parts
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "olive", "bits": bits, "group_size": block_size,
                                     "symmetric": symmetric, "quantized_by": "edgeft (MLAS DefaultWeightOnlyQuantizer)"}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"quantized_linears": quantized, "bits": bits, "block_size": block_size, "symmetric": symmetric}
