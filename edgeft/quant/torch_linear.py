"""The frozen base under the PyTorch backend: read from the safetensors files, kept quantized when asked.

The torch backend is what trains where the ONNX Runtime training build has no wheel (Raspberry Pi 5, Jetson).
With an int8 or int4 base each frozen Linear weight is held as quantize.py stores it for export (the same
codes, scales and zero points) and dequantized inside the matmul, once in the forward pass and once more
in the backward pass, so that no fp32 copy of the weight outlives the matmul: the base costs its quantized
size, as under ONNX Runtime. The values are those of `quantize.fake_quantize_` (the same fp32 arithmetic,
(code - zero point) * scale), so both backends train the very same function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeft.models import lazy
from edgeft.quant import quantize


class _Matmul(torch.autograd.Function):
    """x @ W.T + b with W dequantized on use; the backward pass dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(), layer.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(), None


class QuantizedLinear(torch.nn.Module):
    """A frozen Linear whose weight is stored int8 (per output channel) or int4 (blocks)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: dict):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.precision = quant["precision"]
        w = weight.detach().float().numpy().T  # [in, out], MatMul's B, as export quantizes it
        if self.precision == "int8":
            q, scale = quantize.int8_per_channel(w)
            stored = {"codes": q.T, "scale": scale[:, None]}
        else:
            packed, scales, zero = quantize.nbits_blocks(w, quant["block_size"], quant["symmetric"])
            stored = {"codes": packed, "scale": scales, "zero_point": zero}
        for name, value in stored.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)), persistent=False)
        # a buffer, so that it goes where the module goes (.to(device))
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def dequantized(self) -> torch.Tensor:
        if self.precision == "int8":
            return self.codes.float() * self.scale
        codes = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).flatten(-2).int()
        values = (codes - self.zero_point[..., None].int()).float() * self.scale[..., None]
        return values.reshape(self.out_features, -1)[:, : self.in_features]

    @property
    def weight(self) -> torch.Tensor:  # for code that reads it (DoRA's weight norm): a fresh fp32 copy
        return self.dequantized()

    def forward(self, x):
        return _Matmul.apply(x, self)


def load(model_dir: Path, adapter_init: Path, quant: dict, trust_remote_code: bool = False):
    """The PEFT model of `adapter_init` on the base in `model_dir`, its frozen Linear weights quantized as
    `quant` says (quantize.settings), everything else fp32. Reads one tensor at a time: a Phi-3-mini with an
    int4 base never holds its 15 GB of fp32 weights."""
    model, shards = load_lazily(model_dir, adapter_init, quant, trust_remote_code)
    lazy.load_(model, shards)  # the rest: embedding, norms (and everything, with an fp32 base)
    return model


def load_lazily(model_dir: Path, adapter_init: Path, quant: dict, trust_remote_code: bool = False):
    """`load`'s model with its fp32 weights left as placeholders (lazy.py), and the files they are in: for a
    caller that reads them one part at a time (a strategy sharding the base, torch_engine.py)."""
    from peft import PeftModel

    base, shards = lazy.empty_model(model_dir, trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_init, is_trainable=True)
    if quant["precision"] != "fp32":
        names = [name for name, module in quantize.frozen_linears(model) if lazy.is_placeholder(module.weight)]
        for name in names:  # by name: a list of the modules would keep each replaced fp32 Linear alive
            module = model.get_submodule(name)
            lazy.load_(module, shards)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear(module.weight, module.bias, quant))
            del module
    return model, shards
