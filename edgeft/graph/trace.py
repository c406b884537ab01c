"""The torch side of export: a causal-LM loss wrapper traced to ONNX with parameter names intact.

Settings measured to work (DESIGN.md): the TorchScript exporter (`dynamo=False`), opset 17, no constant
folding, TrainingMode.TRAINING, traced with a padded batch so the masking branches are in the graph.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INPUT_NAMES = ("input_ids", "attention_mask", "labels")
OPSET = 17
IGNORE_INDEX = -100


# Causal LMs whose logits are their LM head applied to the decoder's output, nothing more (no scaling or
# soft-capping): for these the loss runs the head on the labelled positions only.
HEAD_ON_DECODER = ("Phi3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


class CausalLMLoss(torch.nn.Module):
    """forward(input_ids, attention_mask, labels) -> (mean next-token cross-entropy over labelled tokens, logits).

    The loss comes first: ORT's gradient builder differentiates the first graph output. The logits are the
    second output so that later stages (merge, package) can check their outputs against the training
    runtime's eval model; with `logits=False` there is no second output.

    The loss runs the LM head on the labelled positions alone: in chat data with the prompt masked that is
    a third of the tokens or so, and the head is the widest matmul of a small model (Phi-4-mini: 200k
    vocabulary). The full logits are computed apart, for the second output only; training drops that
    output (trainer/artifacts.py, torch_engine.py), so a training step never holds logits for the
    unlabelled positions. The loss equals cross-entropy over all positions with the unlabelled ignored."""

    def __init__(self, model: torch.nn.Module, logits: bool = True):
        super().__init__()
        self.model = model
        self.logits = logits

    def _causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, attention_mask, labels):
        target = labels[:, 1:].reshape(-1)
        lm = self._causal_lm()
        if type(lm).__name__ not in HEAD_ON_DECODER:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), target,
                                   ignore_index=IGNORE_INDEX)
            return (loss, logits) if self.logits else (loss,)
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        labelled = torch.nonzero(target != IGNORE_INDEX).squeeze(-1)
        shifted = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        loss = F.cross_entropy(head(shifted.index_select(0, labelled)).float(), target.index_select(0, labelled))
        return (loss, head(hidden)) if self.logits else (loss,)


@contextlib.contextmanager
def static_long_rope(model: torch.nn.Module) -> Iterator[int]:
    """Pin long-rope rotary modules to their short-factor frequencies while tracing.

    transformers 5 switches `inv_freq` between short and long factors in place (`copy_`) at every forward,
    which the TorchScript exporter cannot express (aten::copy, opset 17). With the short factors pinned the
    graph equals the model for sequences up to original_max_position_embeddings, which export records as
    the longest trainable sequence. Only these module instances change, and only inside this block.
    """
    changed = []
    for module in model.modules():
        if getattr(module, "rope_type", None) == "longrope" and hasattr(module, "original_inv_freq"):
            changed.append(module)
            with torch.no_grad():
                module.inv_freq.copy_(module.original_inv_freq)
            module.rope_type = "longrope-pinned-short"
    try:
        yield len(changed)
    finally:
        for module in changed:
            module.rope_type = "longrope"


def probe_batch(vocab_size: int, seq_len: int = 24, pad_id: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows; the second is right-padded, so the graph is traced and verified with masking in play."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab_size, size=(2, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    cut = seq_len * 2 // 3
    ids[1, cut:] = pad_id
    mask[1, cut:] = 0
    labels = ids.copy()
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def torch_loss(wrapper: CausalLMLoss, batch: dict[str, np.ndarray]) -> float:
    wrapper.eval()
    with torch.no_grad(), static_long_rope(wrapper):
        return float(wrapper(*(torch.from_numpy(batch[k]) for k in INPUT_NAMES))[0])


def torch_loss_and_grads(wrapper: CausalLMLoss, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and trainable-parameter gradients in eval mode (no dropout), the reference for export."""
    wrapper.eval()
    wrapper.zero_grad(set_to_none=True)
    with static_long_rope(wrapper):
        loss = wrapper(*(torch.from_numpy(batch[k]) for k in INPUT_NAMES))[0]
        loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in wrapper.named_parameters()
             if p.requires_grad and p.grad is not None}
    wrapper.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def gradient_error(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    """||g_other - g_ref|| / ||g_ref|| over all trainable tensors together (LoRA B = 0 zeroes A's grads)."""
    missing = sorted(set(reference) ^ set(other))
    if missing:
        raise KeyError(f"gradients differ in which tensors they cover: {missing[:5]}")
    diff = sum(float(np.sum((other[n].reshape(reference[n].shape) - reference[n]) ** 2)) for n in reference)
    norm = sum(float(np.sum(reference[n] ** 2)) for n in reference)
    error = (diff / max(norm, 1e-30)) ** 0.5
    return error if math.isfinite(error) and math.isfinite(norm) else math.inf


def export(wrapper: CausalLMLoss, batch: dict[str, np.ndarray], path: Path, weights: bool = True) -> dict[str, str]:
    """Trace `wrapper` to `path` (external data beside it when the weights pass 2 GB).

    With `weights=False` (a model of lazy.py placeholders) the tracer sees shapes only. The placeholders
    become initializers without data, and the returned map gives each one's key in the model's safetensors
    files, for frozen_base.externalize to read it from there. Every other parameter keeps its value."""
    args = tuple(torch.from_numpy(batch[k]) for k in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "logits")}
    wrapper.train()
    with static_long_rope(wrapper), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapper, args, str(path), input_names=list(INPUT_NAMES), output_names=["loss", "logits"], dynamic_axes=axes,
            opset_version=OPSET, do_constant_folding=False, training=torch.onnx.TrainingMode.TRAINING,
            dynamo=False, export_params=weights)
    return {} if weights else _declare_parameters(wrapper, path)


def rows_by_gathernd(model) -> int:
    """Make the loss's row selections (Gather on axis 0 with NonZero's indices) GatherND ops; returns how many.

    The two compute the same rows, but ONNX Runtime's gradient of Gather (GatherGrad) is slow on CPU: for
    the labelled rows of an 8 x 512 batch of a 3072-wide model (1500 of 4096 rows), 495 ms against 51 ms
    for GatherND's (GatherNDGrad), measured with onnxruntime-training 1.19.2 on the dev machine."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}

    def from_nonzero(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Squeeze", "Transpose", "Reshape", "Cast"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "NonZero"

    nodes, changed = [], 0
    for n in graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and axis == 0 and from_nonzero(n.input[1]):
            rows = f"{n.output[0]}/rows"
            last = helper.make_tensor(f"{rows}/axis", TensorProto.INT64, [1], [-1])
            nodes += [helper.make_node("Constant", [], [f"{rows}/axis"], value=last, name=f"{n.name}/Axis"),
                      helper.make_node("Unsqueeze", [n.input[1], f"{rows}/axis"], [rows], name=f"{n.name}/Unsqueeze"),
                      helper.make_node("GatherND", [n.input[0], rows], list(n.output), name=f"{n.name}/GatherND")]
            changed += 1
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def _declare_parameters(wrapper: CausalLMLoss, path: Path) -> dict[str, str]:
    """Turn the parameters the tracer left as graph inputs into initializers: placeholders as shapes only,
    the rest with their values. Returns {initializer: safetensors key} for the placeholders."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from edgeft.models import lazy

    model = onnx.load(str(path))
    params = dict(wrapper.named_parameters()) | dict(wrapper.named_buffers())  # persistent buffers: inputs too
    keys, kept = {}, []
    for value in model.graph.input:
        if value.name in INPUT_NAMES:
            kept.append(value)
            continue
        p = params[value.name]
        if lazy.is_placeholder(p):
            keys[value.name] = getattr(p, lazy.KEY)
            model.graph.initializer.append(stub := TensorProto(name=value.name, data_type=TensorProto.FLOAT))
            stub.dims.extend(p.shape)
        else:
            model.graph.initializer.append(numpy_helper.from_array(p.detach().numpy(), value.name))
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(path))
    return keys


def parameter_names(wrapper: CausalLMLoss) -> tuple[list[str], list[str]]:
    """(trainable, frozen) parameter names as the exporter names the initializers."""
    trainable, frozen, seen = [], [], set()
    for name, p in wrapper.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        (trainable if p.requires_grad else frozen).append(name)
    return trainable, frozen
