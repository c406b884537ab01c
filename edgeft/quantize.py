"""A quantized frozen base: the one quantization that export stores and every PyTorch reference applies.

int8: symmetric, per output channel (scale = max |w| / 127 over the input dimension, zero point 0). Export
stores each frozen Linear weight (pre-transposed, [in, out]) as int8 plus its fp32 scales in `base.data`,
and a `DequantizeLinear` (axis 1) feeds the MatMul: no gradient flows into frozen weights, so ORT's
gradient builder accepts it, and ORT re-dequantizes per consumer instead of holding every dequantized
weight from forward to backward. The PyTorch side (export's reference, merge's check, the torch backend)
replaces the same weights by the same dequantized values (`fake_quantize_`), computed with the same fp32
arithmetic, so ORT and PyTorch train the very same function.

The input embedding (a lookup, memory-mapped, only used rows resident) and weights tied to it stay fp32.
"""

from __future__ import annotations

from edgeft.errors import EdgeftError

PRECISIONS = ("fp32", "int8")
TRAINED_PARTS = ("lora_", "modules_to_save", "trainable_tokens")  # PEFT's trainable modules: never quantized
CHOICES = ("fp32", "int8", "int4")  # what --base-precision accepts; check() says which work today
PLANNED = {"int4": "an int4 base for ONNX Runtime training is not available yet (blocked int4 needs "
                   "DequantizeLinear at opset 21 and the int4 bundle's exact blocks); use int8 or fp32"}


def check(precision: str) -> None:
    if precision in PLANNED:
        raise EdgeftError(f"--base-precision {precision}: {PLANNED[precision]}")
    if precision not in PRECISIONS:
        raise EdgeftError(f"--base-precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def int8_per_channel(w_in_out):
    """(int8 values, fp32 scales per output column) of a weight laid out [in, out]."""
    import numpy as np

    w = np.asarray(w_in_out, dtype=np.float32)
    scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = np.float32(1)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def fake_quantize_(model, precision: str) -> int:
    """Replace, in place, the frozen Linear weights export quantizes by their dequantized values.
    Returns how many weights were replaced."""
    import numpy as np
    import torch

    if precision == "fp32":
        return 0
    check(precision)
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    done = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(k in name for k in TRAINED_PARTS):
                continue
            if embed is not None and module.weight is embed:
                continue  # tied to the embedding: export keeps it fp32
            w = module.weight.detach().float().numpy().T  # [in, out], as export stores it
            q, scale = int8_per_channel(w)
            module.weight.copy_(torch.from_numpy((q.astype(np.float32) * scale).T.copy()))
            done += 1
    return done
