"""Frozen base weights: one external file beside the artifacts, shared by every graph and session.

The checkpoint holds only what trains (adapters, modules_to_save, token rows). The frozen base stays in
the training and eval graphs as initializers whose data live in `base.data`; the trainer memory-maps that
file once and hands the same buffers to both sessions (`SessionOptions.add_initializer`). This is what
keeps memory near 1x the base weights, keeps checkpoints small (a Phi-3-mini checkpoint would otherwise
rewrite 15 GB), and sidesteps onnxblock 1.19.2's >2 GB path (its temp saves strip tensor data from the
parameters it then checkpoints). It is also where a quantized base (int8/int4 through DequantizeLinear)
slots in: int4 tensors cannot go in a 1.19.2 checkpoint.

The TorchScript exporter feeds each Linear weight to MatMul through a Transpose, which ORT would
constant-fold into a fresh copy per session; weights whose only consumers are such Transposes are stored
already transposed (name suffix `.T`) and the Transposes removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BASE_DATA = "base.data"
ALIGN = 4096
TRANSPOSED_SUFFIX = ".T"


def _external_info(init: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def _array(init: TensorProto, model_dir: Path) -> np.ndarray:
    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    info = _external_info(init)
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    count = int(np.prod(init.dims)) if init.dims else 1
    offset = int(info.get("offset", 0))
    data = np.fromfile(model_dir / info["location"], dtype=dtype, count=count, offset=offset)
    return data.reshape(tuple(init.dims))


def _set_inline(init: TensorProto, array: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))


def _set_external(init: TensorProto, name: str, array: np.ndarray, offset: int) -> None:
    init.Clear()
    init.name = name
    init.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    init.dims.extend(array.shape)
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", BASE_DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def _only_transposed(name: str, nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto] | None:
    """The plain 2-D Transposes that are `name`'s only consumers, or None."""
    users = [n for n in nodes if name in n.input]
    if not users or name in outputs:
        return None
    for n in users:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0])
        if n.op_type != "Transpose" or perm != [1, 0]:
            return None
    return users


def externalize(model_path: Path, out_dir: Path, frozen: set[str], precision: str = "fp32") -> tuple[onnx.ModelProto, dict]:
    """Move the frozen initializers of `model_path` into `out_dir/base.data`, streaming one tensor at a time.

    Everything else is made inline. With `precision="int8"` the frozen Linear weights are stored quantized
    (see quantize.py) behind a DequantizeLinear. Returns the slim model (its frozen initializers point at
    base.data, so save it in `out_dir`) and a summary of what was stored.
    """
    from edgeft import quantize

    model_dir = Path(model_path).parent
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    outputs = {o.name for o in graph.output}
    removed: list[onnx.NodeProto] = []
    renames: dict[str, str] = {}
    stored = transposed = quantized = 0
    offset = 0
    dequant_nodes: list[onnx.NodeProto] = []
    # Quantized weights are graph inputs fed from base.data, not initializers: generate_artifacts would
    # constant-fold a DequantizeLinear of initializers straight back to fp32.
    fed: list[tuple[str, np.ndarray, int]] = []
    dropped: set[str] = set()

    def append(f, array: np.ndarray) -> int:
        nonlocal offset
        pad = (-offset) % ALIGN
        f.write(b"\0" * pad)
        offset += pad
        at = offset
        f.write(array.tobytes())
        offset += array.nbytes
        return at

    with open(out_dir / BASE_DATA, "wb") as f:
        for init in graph.initializer:
            array = _array(init, model_dir)
            if init.name not in frozen:
                if init.data_location == TensorProto.EXTERNAL:
                    _set_inline(init, array)
                continue
            name = init.name
            users = _only_transposed(name, nodes, outputs) if array.ndim == 2 else None
            if users:
                array = np.ascontiguousarray(array.T)
                name = init.name + TRANSPOSED_SUFFIX
                for n in users:
                    renames[n.output[0]] = name
                    removed.append(n)
                transposed += 1
                if precision == "int8":
                    q, scale = quantize.int8_per_channel(array)
                    fed += [(name + ".q", q, append(f, q)), (name + ".scale", scale, append(f, scale))]
                    dropped.add(init.name)
                    dequant_nodes.append(helper.make_node("DequantizeLinear", [name + ".q", name + ".scale"], [name],
                                                          name=DEQUANTIZE_PREFIX + name, axis=1))
                    quantized += 1
                    stored += 1
                    continue
            _set_external(init, name, array, append(f, array))
            stored += 1
            del array
    keep = [n for n in nodes if not any(n is r for r in removed)]
    for n in keep:
        for i, inp in enumerate(n.input):
            if inp in renames:
                n.input[i] = renames[inp]
    del graph.node[:]
    graph.node.extend(dequant_nodes + keep)
    if dropped:
        kept = [i for i in graph.initializer if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    inputs = {}
    for name, array, at in fed:
        graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                         list(array.shape)))
        inputs[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": at}
    return model, {"tensors": stored, "transposed": transposed, "quantized": quantized, "precision": precision,
                   "bytes": offset, "inputs": inputs}


DEQUANTIZE_PREFIX = "edgeft_dequantize_"


def dequantize_at_use(model: onnx.ModelProto) -> int:
    """Give every consumer of a quantized base weight its own DequantizeLinear, run just before it.

    A DequantizeLinear whose inputs are all graph inputs is ready when the step starts, so ONNX Runtime
    dequantizes every weight up front and holds the fp32 copies through forward and backward: the
    quantized base then peaks above fp32 (measured: 3.0 vs 2.5 GB on a real-width slice). Making each
    copy's scale depend on the consumer's other input (times `Size(x) / Size(x)`, exactly 1) schedules it
    after that input exists, so only the weight in use is ever dequantized. Run on the training and eval
    graphs after generate_artifacts (the gradient graph is built by then, so this adds no gradient path).
    Returns the number of DequantizeLinear nodes written.
    """
    graph = model.graph
    nodes = list(graph.node)
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in nodes:
        for i, name in enumerate(n.input):
            users.setdefault(name, []).append((n, i))
    before: dict[int, list[onnx.NodeProto]] = {}
    dropped = set()
    for dq in (n for n in nodes if n.op_type == "DequantizeLinear" and n.name.startswith(DEQUANTIZE_PREFIX)):
        dropped.add(id(dq))
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        for k, (user, slot) in enumerate(users.get(dq.output[0], [])):
            anchor = next(x for j, x in enumerate(user.input) if j != slot and x)
            out = f"{dq.output[0]}.use{k}"
            before.setdefault(id(user), []).extend([
                helper.make_node("Size", [anchor], [out + ".size"], name=out + "/Size"),
                helper.make_node("Cast", [out + ".size"], [out + ".sizef"], name=out + "/Cast", to=TensorProto.FLOAT),
                helper.make_node("Div", [out + ".sizef", out + ".sizef"], [out + ".one"], name=out + "/One"),
                helper.make_node("Mul", [dq.input[1], out + ".one"], [out + ".scale"], name=out + "/Scale"),
                helper.make_node("DequantizeLinear", [dq.input[0], out + ".scale", *dq.input[2:]], [out],
                                 name=f"{DEQUANTIZE_PREFIX}{out}", **attrs)])
            user.input[slot] = out
    rewritten = []
    for n in nodes:
        if id(n) not in dropped:
            rewritten.extend(before.get(id(n), []))
            rewritten.append(n)
    del graph.node[:]
    graph.node.extend(rewritten)
    return sum(1 for n in rewritten if n.op_type == "DequantizeLinear")


def external_initializers(model: onnx.ModelProto) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, offset) of every initializer stored in base.data."""
    out = []
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = _external_info(init)
            if info.get("location") == BASE_DATA:
                out.append((init.name, helper.tensor_dtype_to_np_dtype(init.data_type), tuple(init.dims),
                            int(info.get("offset", 0))))
    return out
