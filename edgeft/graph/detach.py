"""Stop-gradient for ONNX Runtime training graphs, where PyTorch had `.detach()`.

The TorchScript trace drops `.detach()` and ONNX has no stop-gradient op, so ORT's gradient builder would
differentiate through values PyTorch treats as constants. DoRA is the case here: PEFT detaches the weight
norm ||W + s*B*A|| (DoRA paper, section 4.3). The fix clones the subgraph that feeds each such norm and
makes the clone read *detached aliases* of the trainable tensors: extra graph inputs the trainer feeds
with the current parameter values every step. No gradient reaches the aliases, exactly as in PEFT.
(It also avoids ORT 1.19.2's ReduceL2 gradient, which emits an opset-12 Unsqueeze into opset-17 graphs.)
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

SUFFIX = "__detached"
DETACHED_OPS = ("ReduceL2",)


def detach_norms(model: onnx.ModelProto, trainable: set[str]) -> dict[str, str]:
    """Rewrite `model` in place; return {alias input: parameter name} for the trainer to feed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    roots = [n for n in graph.node if n.op_type in DETACHED_OPS]
    cone = _cone(roots, producer)
    if not roots or not any(i in trainable for n in graph.node if id(n) in cone for i in n.input):
        return {}
    aliases: dict[str, str] = {}

    def renamed(name: str) -> str:
        if name in producer and id(producer[name]) in cone:
            return name + SUFFIX
        if name in trainable:
            aliases[name + SUFFIX] = name
            return name + SUFFIX
        return name

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if any(node is r for r in roots):
            node.input[:] = [renamed(i) for i in node.input]
        nodes.append(node)
        if id(node) in cone:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = (node.name or node.output[0]) + SUFFIX
            clone.input[:] = [renamed(i) for i in node.input]
            clone.output[:] = [o + SUFFIX for o in node.output]
            nodes.append(clone)
    del graph.node[:]
    graph.node.extend(without_dead(nodes, {o.name for o in graph.output}))
    shapes = {i.name: (i.data_type, list(i.dims)) for i in graph.initializer}
    for alias, param in sorted(aliases.items()):
        dtype, dims = shapes.get(param, (TensorProto.FLOAT, None))
        graph.input.append(helper.make_tensor_value_info(alias, dtype, dims))
    return aliases


def _cone(roots: list[onnx.NodeProto], producer: dict[str, onnx.NodeProto]) -> set[int]:
    """The ids of the nodes the detached ops read from, all the way up."""
    cone: set[int] = set()
    stack = [i for r in roots for i in r.input]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in cone:
            cone.add(id(node))
            stack.extend(node.input)
    return cone


def without_dead(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is used, until none is left (detach: the originals the clones
    replaced; trainer/artifacts.drop_outputs: what only a dropped graph output needed)."""
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive
