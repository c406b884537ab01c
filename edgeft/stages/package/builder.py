"""The ONNX Runtime GenAI builder, through its command line: the build of a merged model (int4/int8 from a copy
quantized one weight at a time, quant/prequantize.py), the base with swappable adapters, the bundle's threads, and
reading its MatMulNBits blocks back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.atomic import scratch_dir
from edgeft.core.errors import FREE_SPACE, EdgeftError, disk_full
from edgeft.devices.profiles import Quantization
from edgeft.quant import prequantize, quantize

BUILDER_EPS = ("cpu", "cuda", "dml", "webgpu")

BUILDER_PRECISIONS = ("int4", "int8", "fp16", "fp32")



class BuilderError(EdgeftError):
    pass



def run_builder(src: Path, out: Path, cache: Path, precision: str, ep: str, quant: Quantization,
                extra: dict[str, str] | None = None) -> float:
    """The GenAI builder's command line on `src` into `out`; its seconds. Failures name the builder's reason."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", ep, "-c", str(cache)]
    options = dict(extra or {})
    if precision in ("int4", "int8"):
        options.update(block_size=quant.block_size, accuracy_level=quant.accuracy_level,
                       is_symmetric=str(quant.symmetric).lower())
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        hint = ("the builder needs a tokenizer in the merged folder and a supported architecture; check "
                f"{src}/config.json, or try another --precision")
        if disk_full(proc.stderr + proc.stdout):
            raise BuilderError(f"no space left on the device of {out.parent} while the GenAI builder wrote the model. "
                               f"{FREE_SPACE}: the builder wrote into a temporary that was removed")
        raise BuilderError(f"the ONNX Runtime GenAI builder failed (exit {proc.returncode}):\n{tail}\nhint: {hint}")
    return time.time() - started



def build(merged: Path, out: Path, cache: Path, precision: str, ep: str, quant: Quantization) -> dict:
    """Build the merged model into `out`. int4 and int8 for the CPU are built from a copy quantized one weight at
    a time (prequantize.py), so that no process holds the fp32 model; the builder quantizes the fp32 folder
    itself where that copy cannot be made (the reason is printed and recorded). GPU builds quantize fp16
    weights, so the builder quantizes those itself too."""
    why: dict[str, str] = {}
    if precision in ("int4", "int8"):
        reason = (prequantize.unsupported(merged, quant.block_size) if ep == "cpu" else
                  f"a {ep} build quantizes the weights in fp16, as only the builder does")
        if reason is None:
            with scratch_dir(out.parent, "prequantized") as work:
                started = time.time()
                info = prequantize.write(merged, work, 4 if precision == "int4" else 8, quant.block_size,
                                         quant.symmetric)
                info["seconds"] = round(time.time() - started, 1)
                seconds = run_builder(work, out, cache, precision, ep, quant)
            return {"builder_input": "prequantized", "prequantize": info, "builder_seconds": round(seconds, 1)}
        print(f"package: the builder quantizes the fp32 model itself: {reason}")
        why = {"why": reason}
    seconds = run_builder(merged, out, cache, precision, ep, quant)
    return {"builder_input": "fp32", **why, "builder_seconds": round(seconds, 1)}



def set_cpu_threads(bundle: Path, threads: int) -> int:
    """Run the bundle on every core of the target. The builder leaves `intra_op_num_threads` unset, and
    onnxruntime-genai then ran one thread here: on the 2-core dev box, int4 decode of the Phi-3-mini slice went
    from 22.7 to 42.5 tokens/s and time to first token from 1600 to 870 ms with both cores."""
    path = bundle / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(config, indent=4) + "\n")
    return int(threads)



def build_adapters(base_dir: Path, num_layers: int, adapters_of: dict[str, Path], tmp: Path, cache: Path,
                   precision: str, ep: str, quant: Quantization) -> tuple[float, dict[str, Path]]:
    """The base once, its LoRA branches as inputs, into `tmp`; then one .onnx_adapter per PEFT adapter folder of
    `adapters_of` (name -> folder), in tmp/adapters/. Returns the builder's seconds and the adapter files."""
    from edgeft.graph import adapters

    exclude = ",".join(adapters.lora_node_names(num_layers))
    files, build_s = {}, 0.0
    (tmp / "adapters").mkdir()
    for i, (name, adapter_dir) in enumerate(adapters_of.items()):
        out = tmp if i == 0 else tmp / f".build-{i}"
        build_s += run_builder(base_dir, out, cache, precision, ep, quant,
                               {"adapter_path": adapter_dir, "nodes_to_exclude": exclude})
        files[name] = adapters.write(adapters.extract(out / "model.onnx"), tmp / "adapters" / f"{name}.onnx_adapter")
        if i:
            shutil.rmtree(out)
    return build_s, files


@dataclass
class NBitsBlocks:
    """One MatMulNBits of a bundle as stored: codes [N, blocks, block * bits / 8] (int4: two per byte),
    scales [N, blocks] and zero points [N, blocks], one per byte (implied: 8 for int4, 128 for int8)."""
    name: str
    bits: int
    block_size: int
    K: int
    N: int
    accuracy_level: int
    packed: np.ndarray
    scales: np.ndarray
    zero: np.ndarray

    def dequantized(self) -> np.ndarray:
        """The [N, K] fp32 weight the blocks stand for."""
        codes = quantize.unpack_nibbles(self.packed) if self.bits == 4 else self.packed
        codes = codes.reshape(self.N, self.scales.shape[1], -1).astype(np.int32)
        values = (codes - self.zero[..., None].astype(np.int32)) * self.scales[..., None]
        return values.reshape(self.N, -1)[:, :self.K]



def matmul_nbits(bundle: Path) -> list[NBitsBlocks]:
    """Every MatMulNBits of `bundle`/model.onnx, in graph order, read from its initializers."""
    import onnx

    from edgeft.graph import frozen_base

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in node.attribute}
        n, bits = a["N"], a["bits"]
        packed = frozen_base.initializer_array(inits[node.input[1]], bundle)
        scales = frozen_base.initializer_array(inits[node.input[2]], bundle).reshape(n, -1).astype(np.float32)
        blocks = scales.shape[1]
        if len(node.input) > 3 and node.input[3]:
            zero = frozen_base.initializer_array(inits[node.input[3]], bundle).reshape(n, -1)
            zero = (quantize.unpack_nibbles(zero) if bits == 4 else zero)[:, :blocks]
        else:
            zero = np.full((n, blocks), 1 << (bits - 1), np.uint8)
        out.append(NBitsBlocks(node.name, bits, a["block_size"], a["K"], n, a.get("accuracy_level", 0),
                               packed.reshape(n, blocks, -1), scales, zero))
    return out

