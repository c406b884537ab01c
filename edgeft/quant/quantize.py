"""A quantized frozen base: the one quantization that export stores and every PyTorch reference applies.

int8: symmetric, per output channel (scale = max |w| / 127 over the input dimension, zero point 0).
int4: the int4 bundle's own blocks. onnxruntime's `DefaultWeightOnlyQuantizer` (MLAS), which the
onnxruntime-genai builder runs on every MatMul it quantizes, is called here on the same fp32 weight with
the same block size and symmetry, so the packed codes, scales and zero points that training sees are the
bytes `edgeft package --adapters` ships (package checks it).

Export stores each frozen Linear weight in its Hugging Face layout [out, in] in `base.data`: int8 codes
plus fp32 scales, or the packed int4 blocks ([out, blocks, block / 2] uint8), fp32 scales and uint8 zero
points, one per block. In the graph they reach MatMul through `DequantizeLinear` (int4: the nibbles are
unpacked with BitShift first, and the blocks dequantized per row). No gradient flows into frozen weights,
so ORT's gradient builder accepts it; frozen_base.dequantize_at_use then dequantizes each weight just
before each use. The PyTorch side (export's reference, merge's check, the torch backend) replaces the
same weights by the same dequantized values (`fake_quantize_`), computed with the same fp32 arithmetic,
(q - zero point) * scale, so ORT and PyTorch train the very same function.

The input embedding (a lookup, memory-mapped, only used rows resident) and weights tied to it stay fp32.
"""

from __future__ import annotations

from edgeft.core.errors import EdgeftError

TRAINED_PARTS = ("lora_", "modules_to_save", "trainable_tokens")  # PEFT's trainable modules: never quantized
CHOICES = ("fp32", "int8", "int4")  # what --base-precision accepts
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def check(precision: str) -> None:
    if precision not in CHOICES:
        raise EdgeftError(f"--base-precision {precision!r}: use one of {', '.join(CHOICES)}")


def settings(precision: str = "fp32", block_size: int = 32, symmetric: bool = True) -> dict:
    """A frozen base's quantization as every consumer takes it (fake_quantize_, frozen_base.externalize, the torch
    backend, the training runtime's arguments): precision, and for int4 the block size and symmetry."""
    check(precision)
    return {"precision": precision, "block_size": int(block_size), "symmetric": bool(symmetric)}


def unpack_nibbles(packed):
    """uint8 [..., n] -> uint8 [..., 2n]: the low nibble first, as MatMulNBits packs them."""
    import numpy as np

    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_nibbles(values):
    """uint8 [..., 2n] of values below 16 -> uint8 [..., n]: two to a byte, the low nibble first, as MatMulNBits
    packs them (the inverse of unpack_nibbles). An odd last axis is padded with a zero nibble."""
    import numpy as np

    values = np.asarray(values, dtype=np.uint8)
    if values.shape[-1] % 2:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, 1)])
    return values[..., 0::2] | (values[..., 1::2] << 4)


def nbits_blocks(w_in_out, block_size: int, symmetric: bool, bits: int = 4):
    """The int4 (or int8) bundle's blocks of a weight laid out [in, out] (MatMul's B, as the builder quantizes it):
    codes [out, blocks, block * bits / 8] uint8 (int4: two per byte, low nibble first), scales [out, blocks] fp32,
    zero points [out, blocks] uint8 (one per block, unpacked)."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          quant_format=QuantFormat.QOperator, bits=bits)
    packed, scales, zero = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(w_in_out, dtype=np.float32))
    out, blocks, _ = packed.shape
    # Symmetric blocks are stored offset by 2^(bits-1) (MatMulNBits' implied zero point); asymmetric ones carry
    # theirs, int4's two to a byte.
    if symmetric:
        zero = np.full((out, blocks), 1 << (bits - 1), np.uint8)
    elif bits == 4:
        zero = unpack_nibbles(zero)[:, :blocks]
    return packed, scales.astype(np.float32).reshape(out, blocks), np.ascontiguousarray(zero.reshape(out, blocks))


def int4_dequantize(packed, scales, zero, k: int):
    """[out, in] fp32 values of int4 blocks: (code - zero point) * scale, as DequantizeLinear computes it."""
    import numpy as np

    codes = unpack_nibbles(packed).astype(np.int32) - zero[..., None].astype(np.int32)
    return (codes.astype(np.float32) * scales[..., None]).reshape(packed.shape[0], -1)[:, :k]


def int8_per_channel(w_in_out):
    """(int8 values, fp32 scales per output column) of a weight laid out [in, out]."""
    import numpy as np

    w = np.asarray(w_in_out, dtype=np.float32)
    scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = np.float32(1)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def frozen_linears(model):
    """(name, module) of every Linear a quantized base stores quantized: all but PEFT's trained parts and an
    LM head tied to the input embedding (export keeps that fp32)."""
    import torch

    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and not any(k in name for k in TRAINED_PARTS)
                and (embed is None or module.weight is not embed)):
            yield name, module


def fake_quantize_(model, quant: dict) -> int:
    """Replace, in place, the frozen Linear weights export quantizes by their dequantized values.
    `quant` is `settings(...)` of the workspace. Returns how many weights were replaced."""
    import numpy as np
    import torch

    from edgeft.models import lazy

    precision = quant["precision"]
    if precision == "fp32":
        return 0
    check(precision)
    done = 0
    with torch.no_grad():
        for _, module in frozen_linears(model):
            if lazy.is_placeholder(module.weight):
                continue  # not loaded (models/lazy.py): quantized when it is
            w = module.weight.detach().float().numpy().T  # [in, out], MatMul's B
            if precision == "int8":
                q, scale = int8_per_channel(w)
                values = (q.astype(np.float32) * scale).T
            else:
                values = int4_dequantize(*nbits_blocks(w, quant["block_size"], quant["symmetric"]), w.shape[0])
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(values)))
            done += 1
    return done


def fake_quantizer(quant: dict):
    """`fake_quantize_` bound to a workspace's settings, for lazy.streamed to apply to each part it loads."""
    return lambda module: fake_quantize_(module, quant)
