"""Activation recomputation: the training graph keeps each decoder layer's inputs, not its activations.

Left as generate_artifacts builds it, the training graph holds every forward tensor that the backward pass
reads from the forward pass until the backward pass gets there: on Phi-3-mini at 1 x 256 tokens that is
about 70 values per token per layer per hidden unit, 7.9 GB over 32 layers, twice the int4 base. Here each
layer's backward pass is given its own copy of the part of that layer's forward pass it reads, computed
from what enters the layer (its hidden state, the rotary tables and the mask, held anyway) once the
gradient reaching the layer's output exists. So the forward tensors die with the forward pass, and at any
time only one layer's activations are alive: the price is a second forward pass (about a third more
compute per step).

How the copies are made to wait: their inputs from outside the layer pass through `Where(ready, x, x)`, with
`ready = Cast(Size(g) / Size(g), bool)` and `g` that gradient. ONNX Runtime orders nodes depth-first from
the graph's outputs, so a node runs only once everything it reads exists, and these copies can exist only
when the backward pass reaches the layer. Backward nodes that `g` depends on keep reading the originals
(reading a copy would close a cycle), and nodes that read nothing but weights and constants are shared, not copied.
Runs on the training graph after generate_artifacts and before dequantize_at_use (which then gives each
copied MatMul its own dequantized weight). Needs only onnx.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto, helper

SUFFIX = "/recompute"
LAYER = re.compile(r"/layers\.(\d+)/")
PREFIX = "edgeft_recompute_"
# Nodes whose outputs are random: a copy would draw a different mask, so their outputs are held, not recomputed.
RANDOM = {"Dropout", "BiasDropout", "BitmaskDropout", "BitmaskBiasDropout", "RandomNormal", "RandomUniform",
          "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def layer_of(node_name: str) -> int | None:
    found = LAYER.search(node_name)
    return int(found.group(1)) if found else None


def recompute_layers(model: onnx.ModelProto, forward_outputs: tuple[str, ...], data_inputs: tuple[str, ...]) -> dict:
    """Rewrite `model` (the training graph) so that each layer's backward pass recomputes the forward tensors
    it reads. `forward_outputs`: the forward pass's outputs (loss, logits): the nodes they depend on are the
    forward pass, the rest is the backward pass. `data_inputs`: the graph inputs that carry the batch.
    Returns what was done: layers rewritten, nodes copied, stashed tensors no longer held."""
    graph = model.graph
    _sort(graph)
    g = _Graph(list(graph.node), forward_outputs, data_inputs)
    added: list[onnx.NodeProto] = []
    rewired: dict[int, list[tuple[int, str]]] = {}
    report = {"layers": 0, "copied_nodes": 0, "released_tensors": 0}
    for layer, members in g.layers():
        own = {o for n in members for o in n.output if o}
        gradient = _output_gradient(own, members, g.readers, g.forward_ids, g.producer)
        if gradient is None:
            continue
        stashed = g.stashed(own, gradient)
        copies = _closure(stashed, g.producer, own, g.activations)
        if not copies:
            continue
        nodes, renamed = _copies(f"{PREFIX}{layer}", gradient, copies, g.activations)
        added += nodes
        for name, uses in stashed.items():
            if name in renamed:
                for user, slot in uses:
                    rewired.setdefault(id(user), []).append((slot, renamed[name]))
        report["layers"] += 1
        report["copied_nodes"] += len(copies)
        report["released_tensors"] += sum(1 for name in stashed if name in renamed)
    for n in g.nodes:
        for slot, name in rewired.get(id(n), []):
            n.input[slot] = name
    graph.node.extend(added)
    _sort(graph)
    return report


class _Graph:
    """The training graph's nodes (topologically sorted), split into the forward and the backward pass."""

    def __init__(self, nodes: list[onnx.NodeProto], forward_outputs: tuple[str, ...], data_inputs: tuple[str, ...]):
        self.nodes = nodes
        self.producer = {o: n for n in nodes for o in n.output if o}
        self.activations = _batch_dependent(nodes, data_inputs)
        self.forward_ids = _upstream(forward_outputs, self.producer)
        self.backward = [n for n in nodes if id(n) not in self.forward_ids]
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in nodes:
            for name in n.input:
                if name:
                    self.readers.setdefault(name, []).append(n)

    def layers(self) -> list[tuple[int, list[onnx.NodeProto]]]:
        """The forward nodes of each decoder layer, by layer."""
        by_layer: dict[int, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            if id(n) in self.forward_ids and (layer := layer_of(n.name)) is not None:
                by_layer.setdefault(layer, []).append(n)
        return sorted(by_layer.items())

    def stashed(self, own: set[str], gradient: str) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
        """The layer's forward tensors the backward pass reads (tensor -> (reader, input slot)), leaving out the
        readers the gradient `gradient` depends on: reading a copy would close a cycle."""
        before = _upstream([gradient], self.producer)
        stashed: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.backward:
            if id(n) not in before:
                for slot, name in enumerate(n.input):
                    if name in own:
                        stashed.setdefault(name, []).append((n, slot))
        return stashed


def _copies(tag: str, gradient: str, copies: list[onnx.NodeProto], activations: set[str]
            ) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """The nodes that recompute `copies` once `gradient` exists: a `ready` flag from it, a Where that waits on it
    for every activation read from outside the layer, and the copies themselves (outputs renamed)."""
    ready = f"{tag}/ready"
    added = [helper.make_node("Size", [gradient], [f"{tag}/size"], name=f"{tag}/Size"),
             helper.make_node("Div", [f"{tag}/size", f"{tag}/size"], [f"{tag}/one"], name=f"{tag}/One"),
             helper.make_node("Cast", [f"{tag}/one"], [ready], name=f"{tag}/Ready", to=TensorProto.BOOL)]
    held: dict[str, str] = {}
    renamed = {o: o + SUFFIX for n in copies for o in n.output if o}
    for n in copies:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = n.name + SUFFIX
        for i, name in enumerate(copy.input):
            if name in renamed:
                copy.input[i] = renamed[name]
            elif name in activations:
                if name not in held:
                    held[name] = f"{tag}/{len(held)}"
                    added.append(helper.make_node("Where", [ready, name, name], [held[name]],
                                                  name=f"{tag}/Wait{len(held)}"))
                copy.input[i] = held[name]
        for i, name in enumerate(copy.output):
            if name:
                copy.output[i] = renamed[name]
        added.append(copy)
    return added, renamed


def _batch_dependent(nodes, data_inputs: tuple[str, ...]) -> set[str]:
    """The tensors that depend on the batch (the rest are weights and constants). `nodes` in topological order."""
    activations = set(data_inputs)
    for n in nodes:
        if any(name in activations for name in n.input):
            activations.update(o for o in n.output if o)
    return activations


def _output_gradient(own: set[str], members, readers, forward_ids, producer) -> str | None:
    """The gradient of the layer's output (its forward tensor read by later forward nodes that has a
    gradient), where the layer's backward pass starts; of several, the one the most nodes depend on."""
    member_ids = {id(n) for n in members}
    found = [f"{out}_grad" for n in members for out in n.output
             if f"{out}_grad" in producer
             and any(id(r) in forward_ids and id(r) not in member_ids for r in readers.get(out, []))]
    return max(found, key=lambda g: len(_downstream(g, readers)), default=None)


def _upstream(names, producer) -> set[int]:
    """ids of every node that tensors `names` depend on."""
    seen: set[int] = set()
    todo = list(names)
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in seen:
            seen.add(id(n))
            todo.extend(i for i in n.input if i)
    return seen


def _downstream(name: str, readers) -> set[int]:
    """ids of every node that depends on tensor `name`."""
    seen: set[int] = set()
    todo = [name]
    while todo:
        for n in readers.get(todo.pop(), []):
            if id(n) not in seen:
                seen.add(id(n))
                todo.extend(o for o in n.output if o)
    return seen


def _closure(stashed: dict, producer, own: set[str], activations: set[str]) -> list[onnx.NodeProto]:
    """The layer's forward nodes needed to recompute `stashed` from what enters the layer. Nodes reading no
    activation (constants, weight transposes) are not copied: their outputs cost nothing to keep. Random
    nodes (dropout) are not copied either: the copies read their outputs."""
    needed: dict[int, onnx.NodeProto] = {}
    todo = [producer[name] for name in stashed if name in activations]
    while todo:
        n = todo.pop()
        if id(n) in needed or n.op_type in RANDOM:
            continue
        needed[id(n)] = n
        todo.extend(producer[name] for name in n.input if name in own and name in activations)
    return list(needed.values())


def _sort(graph: onnx.GraphProto) -> None:
    """Put the nodes in topological order (ONNX requires it; the copies were appended at the end)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    order: list[int] = []
    state = [0] * len(nodes)
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(i)
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            for name in nodes[i].input:
                j = producer.get(name)
                if j is not None and state[j] == 0:
                    stack.append((j, False))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def held_activations(model: onnx.ModelProto, forward_outputs: tuple[str, ...], data_inputs: tuple[str, ...]) -> set[str]:
    """The batch-dependent tensors of the forward pass that the backward pass reads: what a training step holds
    from its forward pass into its backward pass."""
    graph = model.graph
    _sort(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    forward = _upstream(forward_outputs, producer)
    activations = _batch_dependent(graph.node, data_inputs)
    return {name for n in graph.node if id(n) not in forward for name in n.input
            if name in activations and name in producer and id(producer[name]) in forward}
