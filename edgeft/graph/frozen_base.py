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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BASE_DATA = "base.data"
INPUTS_FILE = "edgeft_inputs.json"  # beside it: the model inputs it feeds, and how each quantized weight is stored
ALIGN = 4096
TRANSPOSED_SUFFIX = ".T"
DEQUANTIZE_PREFIX = "edgeft_dequantize_"  # the nodes that dequantize base weights: edgeft_dequantize_<weight>/...


def _external_info(init: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def initializer_array(init: TensorProto, model_dir: Path) -> np.ndarray:
    """An initializer's values, read from its external data file (in `model_dir`) when it has one."""
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


def externalize(model_path: Path, out_dir: Path, frozen: set[str], quant: dict | None = None,
                read: Callable[[TensorProto], np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Move the frozen initializers of `model_path` into `out_dir/base.data`, streaming one tensor at a time.

    Everything else is made inline. `read` gives an initializer's values (default: its own data, or its
    external file beside `model_path`; a traced model without weights reads them from the model's files). With an
    int8 or int4 `quant` (quantize.settings) the frozen Linear weights are stored quantized (see quantize.py) and
    dequantized in the graph. Returns the slim model (its frozen initializers point at base.data, so save it in
    `out_dir`) and a summary of what was stored.
    """
    quant = quant or {"precision": "fp32"}
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    moves = _Moves(list(graph.node), {o.name for o in graph.output}, quant)
    with open(out_dir / BASE_DATA, "wb") as f:
        data = _BaseData(f)
        for init in graph.initializer:
            array = read(init) if read else initializer_array(init, Path(model_path).parent)
            if init.name in frozen:
                moves.store(init, array, data)
            elif init.data_location == TensorProto.EXTERNAL:
                _set_inline(init, array)
            del array
    moves.apply(graph)
    return model, moves.summary(data.offset)


class _BaseData:
    """base.data as it is written: each array at an offset aligned to ALIGN."""

    def __init__(self, f):
        self.f, self.offset = f, 0

    def append(self, array: np.ndarray) -> int:
        pad = (-self.offset) % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        at = self.offset
        self.f.write(array.tobytes())
        self.offset += array.nbytes
        return at


class _Moves:
    """What externalize does to the graph, gathered while base.data is written and applied after: Transposes
    folded into stored weights, quantized weights turned into graph inputs with their dequantizing nodes."""

    def __init__(self, nodes: list[onnx.NodeProto], outputs: set[str], quant: dict):
        self.nodes, self.outputs, self.quant = nodes, outputs, quant
        self.removed: list[onnx.NodeProto] = []
        self.renames: dict[str, str] = {}
        self.dequant_nodes: list[onnx.NodeProto] = []
        # Quantized weights are graph inputs fed from base.data, not initializers: generate_artifacts would
        # constant-fold a DequantizeLinear of initializers straight back to fp32.
        self.fed: list[tuple[str, np.dtype, tuple[int, ...], int]] = []  # (input, dtype, shape, offset)
        self.dropped: set[str] = set()
        self.specs: dict[str, dict] = {}
        self.stored = self.transposed = self.quantized = 0

    def store(self, init: TensorProto, array: np.ndarray, data: _BaseData) -> None:
        """One frozen initializer into base.data: transposed if its only consumers transpose it, then quantized
        (as graph inputs) or kept an initializer whose data are external."""
        name = init.name
        users = _only_transposed(name, self.nodes, self.outputs) if array.ndim == 2 else None
        self.stored += 1
        if users:
            array = np.ascontiguousarray(array.T)
            name = init.name + TRANSPOSED_SUFFIX
            for n in users:
                self.renames[n.output[0]] = name
                self.removed.append(n)
            self.transposed += 1
            if self.quant["precision"] != "fp32":
                self._quantized(init.name, name, array, data)
                return
        _set_external(init, name, array, data.append(array))

    def _quantized(self, original: str, name: str, array: np.ndarray, data: _BaseData) -> None:
        spec, tensors = _quantize(name, array, self.quant)
        self.fed += [(tensor, value.dtype, value.shape, data.append(value)) for tensor, value in tensors.items()]
        self.specs[name] = spec
        self.dropped.add(original)
        one = f"{name}/one"
        self.dequant_nodes += [
            helper.make_node("Constant", [], [one], name=f"{DEQUANTIZE_PREFIX}{name}/one",
                             value=numpy_helper.from_array(np.array(1, np.int64))),
            *dequantize_nodes(spec, f"{name}/nk", one),
            helper.make_node("Transpose", [f"{name}/nk"], [name], perm=[1, 0], name=f"{DEQUANTIZE_PREFIX}{name}/Transpose")]
        self.quantized += 1

    def apply(self, graph: onnx.GraphProto) -> None:
        keep = [n for n in self.nodes if not any(n is r for r in self.removed)]
        for n in keep:
            for i, inp in enumerate(n.input):
                if inp in self.renames:
                    n.input[i] = self.renames[inp]
        del graph.node[:]
        graph.node.extend(self.dequant_nodes + keep)
        if self.dropped:
            kept = [i for i in graph.initializer if i.name not in self.dropped]
            del graph.initializer[:]
            graph.initializer.extend(kept)
        for name, dtype, shape, _ in self.fed:
            graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), list(shape)))

    def summary(self, size: int) -> dict:
        inputs = {name: {"dtype": dtype.name, "shape": list(shape), "offset": at} for name, dtype, shape, at in self.fed}
        return {"tensors": self.stored, "transposed": self.transposed, "quantized": self.quantized,
                "precision": self.quant["precision"], "bytes": size, "inputs": inputs,
                "quantized_weights": self.specs}


def _quantize(name: str, w_in_out: np.ndarray, quant: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The stored tensors of one quantized weight (graph input name -> array, [out, in] layout) and the
    spec its dequantizing nodes are built from."""
    from edgeft.quant import quantize

    k, n = w_in_out.shape
    spec = {"weight": name, "precision": quant["precision"], "out": n, "in": k,
            "q": f"{name}.q", "scale": f"{name}.scale"}
    if quant["precision"] == "int8":
        q, scale = quantize.int8_per_channel(w_in_out)
        return spec, {spec["q"]: np.ascontiguousarray(q.T), spec["scale"]: scale}
    packed, scales, zero = quantize.nbits_blocks(w_in_out, quant["block_size"], quant["symmetric"])
    spec |= {"block_size": quant["block_size"], "blocks": int(packed.shape[1]), "zero_point": f"{name}.zero_point",
             "symmetric": bool(quant["symmetric"])}
    return spec, {spec["q"]: packed, spec["scale"]: scales.reshape(-1), spec["zero_point"]: zero.reshape(-1)}


def dequantize_nodes(spec: dict, out: str, one: str) -> list[onnx.NodeProto]:
    """Nodes computing `out`, the [out, in] fp32 values of a quantized weight, from its graph inputs.

    `one` is an int64 scalar equal to 1 that every node depends on: whatever produces it decides when the
    weight is dequantized. int8: DequantizeLinear per row. int4: BitShift unpacks the nibbles (low first),
    the codes are laid out one block per row, DequantizeLinear per row with the block's scale and zero
    point, then reshaped to [out, blocks x block] and cut to `in` if the last block was padded. Opset 17.
    """
    p = DEQUANTIZE_PREFIX + out
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], tag: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{out}/{tag}"], name=f"{p}/{tag}", **attrs))
        return f"{out}/{tag}"

    def const(tag: str, value) -> str:
        return node("Constant", [], tag, value=numpy_helper.from_array(np.asarray(value)))

    def shape(tag: str, dims: list[int]) -> str:
        """A shape known only at run time. With static shapes ONNX Runtime's planner hands each copy of a
        weight the buffer of the previous copy of the same size, and such a chain keeps one buffer per weight
        shape alive for the whole step (measured: 1.3 GB on a real-width slice, more than its activations)."""
        return node("Mul", [const(f"{tag}_dims", np.array(dims, np.int64)), one], tag)

    scale = node("Mul", [spec["scale"], node("Cast", [one], "onef", to=TensorProto.FLOAT)], "scale")
    n = spec["out"]
    stored = [n, spec["in"]] if spec["precision"] == "int8" else [n, spec["blocks"], spec["block_size"] // 2]
    codes = node("Reshape", [spec["q"], shape("stored_shape", stored)], "stored")  # a view: nothing is copied
    if spec["precision"] == "int8":
        nodes.append(helper.make_node("DequantizeLinear", [codes, scale], [out], name=f"{p}/Dequantize", axis=0))
        return nodes
    blocks, block = spec["blocks"], spec["block_size"]
    four = node("Cast", [node("Mul", [one, const("four64", np.int64(4))], "four64x")], "four", to=TensorProto.UINT8)
    high = node("BitShift", [codes, four], "high", direction="RIGHT")
    low = node("BitShift", [node("BitShift", [codes, four], "shifted", direction="LEFT"), four], "low",
               direction="RIGHT")
    last = const("last", np.array([-1], np.int64))
    pairs = node("Concat", [node("Unsqueeze", [low, last], "low1"), node("Unsqueeze", [high, last], "high1")],
                 "pairs", axis=-1)
    codes = node("Reshape", [pairs, shape("rows", [n * blocks, block])], "codes")
    values = node("DequantizeLinear", [codes, scale, spec["zero_point"]], "values", axis=0)
    if blocks * block == spec["in"]:
        nodes.append(helper.make_node("Reshape", [values, shape("shape", [n, spec["in"]])], [out], name=f"{p}/Reshape"))
    else:
        padded = node("Reshape", [values, shape("shape", [n, blocks * block])], "padded")
        nodes.append(helper.make_node("Slice", [padded, const("start", np.array([0], np.int64)),
                                                const("end", np.array([spec["in"]], np.int64)),
                                                const("axis", np.array([1], np.int64))], [out], name=f"{p}/Slice"))
    return nodes


def dequantize_at_use(model: onnx.ModelProto, specs: dict[str, dict], tile_bytes: int) -> int:
    """Give every consumer of a quantized base weight its own dequantizing nodes, run just before it.

    Nodes fed only by graph inputs are ready when the step starts, so ONNX Runtime would dequantize every
    weight up front and hold the fp32 copies through forward and backward: the quantized base then peaks
    above fp32 (measured: 3.0 vs 2.5 GB on a real-width slice). Here each use gets its own copy, ordered by
    a `one` computed from the consumer's other input (`Size(x) / Size(x)`), so only the weights in use are
    ever dequantized. The copy stays [out, in] and the consumer reads it transposed (MatMul becomes
    FusedMatMul with transB, which MLAS runs as fast; Gemm flips its transB), so no Transpose copy is made either.
    A forward use of symmetric int4 blocks reads the blocks themselves instead (`_reads_blocks`: MatMulNBits).
    A weight bigger than `tile_bytes` in fp32 (export's --tile-mb) is used a tile of rows at a time.
    Run on the training and eval graphs after generate_artifacts (the gradient graph exists by then, so
    this adds no gradient path). `specs`: export's `quantized_weights`. Returns the number of copies.
    """
    graph = model.graph
    nodes = list(graph.node)
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in nodes:
        for i, name in enumerate(n.input):
            users.setdefault(name, []).append((n, i))
    before: dict[int, list[onnx.NodeProto]] = {}
    copies = 0
    for weight, spec in specs.items():
        for k, (user, slot) in enumerate(users.get(weight, [])):
            added, copied = _rewrite_use(user, slot, spec, f"{weight}/use{k}", tile_bytes)
            before.setdefault(id(user), []).extend(added)
            copies += copied
    prefixes = tuple(f"{DEQUANTIZE_PREFIX}{w}/" for w in specs)
    rewritten = []
    for n in nodes:
        if n.name.startswith(prefixes):
            continue  # the export-time nodes, now unused
        rewritten.extend(before.get(id(n), []))
        rewritten.append(n)
    del graph.node[:]
    graph.node.extend(rewritten)
    _declare_tile_inputs(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return copies


def _rewrite_use(user: onnx.NodeProto, slot: int, spec: dict, use: str, tile_bytes: int) -> tuple[list, bool]:
    """One use of a quantized weight: `user` rewritten to read the blocks or a copy dequantized just before it
    (whole, or a tile at a time). Returns the nodes to run before `user` and whether it dequantizes."""
    if _reads_blocks(user, slot, spec):
        return _output_tiles(user, spec, use, tile_bytes), False
    anchor = next(x for j, x in enumerate(user.input) if j != slot and x)
    if not _read_transposed(user, slot):
        user.input[slot] = use
        return [*_dequantize_after(anchor, spec, use), helper.make_node(
            "Transpose", [f"{use}/nk"], [use], perm=[1, 0], name=f"{DEQUANTIZE_PREFIX}{use}/Transpose")], True
    how = _tiled_use(user, slot)
    if how and len(tiles(spec, tile_bytes)) > 1:
        return _row_tiles(user, spec, use, tile_bytes, how), True
    user.input[slot] = f"{use}/nk"
    return _dequantize_after(anchor, spec, use), True


def _dequantize_after(anchor: str, spec: dict, use: str) -> list[onnx.NodeProto]:
    """The nodes computing `{use}/nk`, ready only once `anchor` is (`one` = Size(anchor) / Size(anchor))."""
    return [helper.make_node("Size", [anchor], [f"{use}/size"], name=f"{DEQUANTIZE_PREFIX}{use}/Size"),
            helper.make_node("Div", [f"{use}/size", f"{use}/size"], [f"{use}/one"],
                             name=f"{DEQUANTIZE_PREFIX}{use}/One"),
            *dequantize_nodes(spec, f"{use}/nk", f"{use}/one")]


def tiles(spec: dict, tile_bytes: int) -> list[tuple[int, int]]:
    """The weight's rows (outputs) cut into about equal tiles of at most `tile_bytes` in fp32: [(first, end), ...]."""
    n = spec["out"]
    count = max(1, -(-n * spec["in"] * 4 // tile_bytes))
    rows = -(-n // count)
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


def tile_input(name: str, first: int, end: int) -> str:
    """The graph input holding rows first:end (first axis) of base input `name`: a view of the same bytes."""
    return f"{name}@{first}:{end}"


def parse_tile_input(name: str) -> tuple[str, int, int] | None:
    """(base input, first, end) of a tile input's name; None for any other name."""
    base, at, rows = name.rpartition("@")
    first, colon, end = rows.partition(":")
    if not (at and colon and first.isdigit() and end.isdigit()):
        return None
    return base, int(first), int(end)


def _tile_spec(spec: dict, first: int, end: int) -> dict:
    """The spec of rows first:end of a quantized weight, stored in tile inputs (the scales and zero points are
    flat: `blocks` of them per row)."""
    per = spec.get("blocks", 1)
    tile = dict(spec, out=end - first, q=tile_input(spec["q"], first, end),
                scale=tile_input(spec["scale"], first * per, end * per))
    if "zero_point" in spec:
        tile["zero_point"] = tile_input(spec["zero_point"], first * per, end * per)
    return tile


def _output_tiles(user: onnx.NodeProto, spec: dict, use: str, tile_bytes: int) -> list[onnx.NodeProto]:
    """A MatMulNBits over a weight bigger than `tile_bytes` split into one per tile of outputs, concatenated by
    `user` itself (unpacked, MLAS dequantizes B whole into a buffer of its own). Returns the nodes to run first."""
    cut = tiles(spec, tile_bytes)
    if len(cut) == 1:
        return []
    added, parts = [], []
    for i, (first, end) in enumerate(cut):
        tile = _tile_spec(spec, first, end)
        part = f"{use}/tile{i}"
        node = onnx.NodeProto()
        node.CopyFrom(user)
        node.name, node.output[:] = f"{DEQUANTIZE_PREFIX}{part}/MatMulNBits", [part]
        node.input[1:3] = [tile["q"], tile["scale"]]
        next(a for a in node.attribute if a.name == "N").i = end - first
        added.append(node)
        parts.append(part)
    _become(user, "Concat", parts, axis=-1)
    return added


def _tiled_use(user: onnx.NodeProto, slot: int) -> str | None:
    """How `user` (MatMul-like, reading the [out, in] copy at `slot`) can take the weight a tile of rows at a
    time: "outputs" for x W (reads it transposed: each tile makes some of the outputs), "sum" for dY W^T (a sum
    over the rows). None for anything but a 2-input A x B with A untransposed."""
    flags = {a.name: a.i for a in user.attribute if a.type == onnx.AttributeProto.INT}
    if (slot != 1 or len(user.input) != 2 or user.op_type not in ("Gemm", "FusedMatMul")
            or any(flags.get(f, 0) for f in ("transA", "transBatchA", "transBatchB"))):
        return None
    return "outputs" if flags.get("transB", 0) else "sum"


def _row_tiles(user: onnx.NodeProto, spec: dict, use: str, tile_bytes: int, how: str) -> list[onnx.NodeProto]:
    """`user` over tiles of the weight's rows, one tile dequantized at a time, each only once the previous
    tile's product exists (its anchor). "outputs": x W[tile]^T per tile, concatenated by `user` itself; "sum":
    dY[..., tile] W[tile] per tile, summed by `user` itself. Returns the nodes to run first."""
    a = user.input[0]
    added, products, total = [], [], None
    cut = tiles(spec, tile_bytes)
    for i, (first, end) in enumerate(cut):
        part = f"{use}/tile{i}"
        x = a
        if how == "sum":
            bounds = [f"{part}/{tag}" for tag in ("first", "end", "axis")]
            added += [helper.make_node("Constant", [], [name], name=DEQUANTIZE_PREFIX + name,
                                       value=numpy_helper.from_array(np.array([value], np.int64)))
                      for name, value in zip(bounds, (first, end, -1), strict=True)]
            x = f"{part}/dy"
            added.append(helper.make_node("Slice", [a, *bounds], [x], name=f"{DEQUANTIZE_PREFIX}{part}/Slice"))
        added += _dequantize_after(total or x, _tile_spec(spec, first, end), part)
        product = onnx.NodeProto()
        product.CopyFrom(user)
        product.name, product.input[:], product.output[:] = (
            f"{DEQUANTIZE_PREFIX}{part}/{user.op_type}", [x, f"{part}/nk"], [f"{part}/product"])
        added.append(product)
        products.append(product.output[0])
        if how == "outputs" or total is None:
            total = product.output[0]
        elif i < len(cut) - 1:
            added.append(helper.make_node("Add", [total, product.output[0]], [f"{part}/sum"],
                                          name=f"{DEQUANTIZE_PREFIX}{part}/Add"))
            total = f"{part}/sum"
    if how == "outputs":
        _become(user, "Concat", products, axis=-1)
    else:
        _become(user, "Add", [total, products[-1]])
    return added


def _become(node: onnx.NodeProto, op: str, inputs: list[str], **attrs) -> None:
    """Turn `node` into `op` (default domain) over `inputs`, keeping its name, place and outputs."""
    node.op_type, node.domain = op, ""
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    node.input[:] = inputs


def _declare_tile_inputs(graph: onnx.GraphProto) -> None:
    """Declare each tile input the nodes read (type of its base input, first dimension its rows); drop base
    inputs that only tiles read now."""
    read = {name for n in graph.node for name in n.input}
    declared = {i.name: i for i in graph.input}
    for name in sorted(read - declared.keys()):
        parsed = parse_tile_input(name)
        if parsed is None or parsed[0] not in declared:
            continue
        base, first, end = parsed
        value = onnx.ValueInfoProto()
        value.CopyFrom(declared[base])
        value.name = name
        value.type.tensor_type.shape.dim[0].dim_value = end - first
        graph.input.append(value)
    tiled = {parsed[0] for parsed in map(parse_tile_input, read) if parsed}
    for value in [i for i in graph.input if i.name in tiled and i.name not in read]:
        graph.input.remove(value)


def _reads_blocks(user: onnx.NodeProto, slot: int, spec: dict) -> bool:
    """Make a plain `x W` (a forward use, or its recomputation) a MatMulNBits on the weight's int4 blocks, the
    bundle's own layout: the kernel dequantizes with MLAS as it goes, faster than the dequantizing nodes and an fp32
    GEMM (gate_up at 256 tokens, benchmarks/results/dequant_kernels.md: 141 against 69 + 96 ms), the fp32 copy no
    longer a tensor of the graph. A backward use (dY W^T) reduces along the outputs, across the blocks: it keeps
    its dequantized copy. Only symmetric blocks that fill the input dimension: MatMulNBits implies their zero point
    (8), where asymmetric ones would need theirs packed two to a byte. False, changing nothing, for any other use."""
    if (user.op_type != "MatMul" or slot != 1 or spec["precision"] != "int4" or not spec.get("symmetric")
            or spec["blocks"] * spec["block_size"] != spec["in"]):
        return False
    user.op_type, user.domain = "MatMulNBits", "com.microsoft"
    user.input[1:] = [spec["q"], spec["scale"]]
    user.attribute.extend(helper.make_attribute(key, value) for key, value in (
        ("K", spec["in"]), ("N", spec["out"]), ("bits", 4), ("block_size", spec["block_size"]), ("accuracy_level", 0)))
    return True


def _read_transposed(user: onnx.NodeProto, slot: int) -> bool:
    """Make a MatMul / FusedMatMul / Gemm read input `slot` transposed; False for any other consumer. (The LM
    head's weight gradient is a Gemm: it runs on the labelled rows, a 2-D tensor.)"""
    if user.op_type not in ("MatMul", "FusedMatMul", "Gemm") or slot > 1:
        return False
    flag = "transA" if slot == 0 else "transB"
    if user.op_type == "MatMul":
        user.op_type, user.domain = "FusedMatMul", "com.microsoft"
    current = next((a for a in user.attribute if a.name == flag), None)
    if current is None:
        user.attribute.append(helper.make_attribute(flag, 1))
    else:
        current.i = 1 - current.i
    return True


def stored_int4(artifacts: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The int4 blocks export stored for each base weight: (packed codes, scales, zero points), as
    MatMulNBits lays them out ([out, blocks, block / 2], [out, blocks], [out, blocks])."""
    import json

    info = json.loads((Path(artifacts) / INPUTS_FILE).read_text())
    mapped = np.memmap(Path(artifacts) / BASE_DATA, dtype=np.uint8, mode="r")

    def read(name: str) -> np.ndarray:
        spec = info["base_inputs"][name]
        return view(mapped, spec["dtype"], spec["shape"], spec["offset"])

    out = {}
    for weight, spec in info.get("quantized_weights", {}).items():
        if spec["precision"] == "int4":
            shape = (spec["out"], spec["blocks"])
            out[weight] = (read(spec["q"]), read(spec["scale"]).reshape(shape), read(spec["zero_point"]).reshape(shape))
    return out


def view(mapped: np.ndarray, dtype, shape, offset: int) -> np.ndarray:
    """A tensor stored in the memory-mapped base.data, without a copy."""
    count = int(np.prod(shape)) if len(shape) else 1
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


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
