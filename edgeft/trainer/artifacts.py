"""Inside the training runtime: build the training/eval/optimizer models and checkpoint, then verify them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgeft.core import rss
from edgeft.core.errors import EdgeftError
from edgeft.graph import detach, frozen_base, recompute
from edgeft.runtime import jobs
from edgeft.trainer import events
from edgeft.trainer.ort_engine import adamw_as_trained
from edgeft.trainer.session import INPUTS_FILE, open_module


def generate(job: jobs.GenerateArtifacts) -> dict:
    """generate_artifacts on the slim model: frozen weights stay initializers in base.data, never loaded."""
    import onnx
    from onnxruntime.training import artifacts

    started = time.time()
    out = Path(job.out)
    model = onnx.load(job.model, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    missing = sorted(set(job.requires_grad) - inits)
    if missing:
        raise EdgeftError(f"trainable parameters missing from the exported graph: {missing[:5]}")
    inputs_file = out / INPUTS_FILE
    quantized = json.loads(inputs_file.read_text()).get("quantized_weights", {}) if inputs_file.exists() else {}
    events.log(f"generating artifacts: {len(job.requires_grad)} trainable tensors")
    artifacts.generate_artifacts(
        model, requires_grad=list(job.requires_grad), frozen_params=[], loss=None,
        optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out),
        ort_format=False, nominal_checkpoint=job.nominal_checkpoint)
    onnx.save(adamw_as_trained(onnx.load(str(out / "optimizer_model.onnx")), job.weight_decay, job.max_grad_norm),
              str(out / "optimizer_model.onnx"))
    recomputed, dequantizers = None, 0
    # Rewrite each graph once: the training graph loses its logits output, then recomputation, then dequantize_at_use.
    graphs = {name: onnx.load(str(out / name), load_external_data=False)
              for name in ("training_model.onnx", "eval_model.onnx")}
    dropped = drop_outputs(graphs["training_model.onnx"], {"logits"})
    events.log(f"training graph: logits output dropped with the {dropped} nodes that only it needed")
    if job.recompute:
        kept = {o.name for o in graphs["training_model.onnx"].graph.output}
        forward = tuple(o.name for o in graphs["eval_model.onnx"].graph.output if o.name in kept)
        recomputed = recompute.recompute_layers(graphs["training_model.onnx"], forward, tuple(job.data_inputs))
        events.log(f"recomputation: {recomputed['copied_nodes']} nodes copied in {recomputed['layers']} layers")
    if quantized:
        dequantizers = sum(frozen_base.dequantize_at_use(graph, quantized, job.tile_bytes)
                           for graph in graphs.values())
    for name, graph in graphs.items():
        onnx.save(graph, str(out / name))
    if job.ort_format:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            convert_onnx_models_to_ort(out / name, output_dir=out, optimization_styles=[OptimizationStyle.Fixed])
    return {"seconds": round(time.time() - started, 2), "peak_rss_mb": round(rss.peak_mb(), 1),
            "dequantizers": dequantizers, "dropped_nodes": dropped, "recompute": recomputed}


def drop_outputs(model, names: set[str]) -> int:
    """Remove the graph outputs `names` and every node that only they needed; returns how many nodes went.

    The training graph's logits output (CausalLMLoss's second output, kept in the eval graph for later
    stages' checks) would otherwise run the LM head on every position of every training step."""
    graph = model.graph
    outputs = [o for o in graph.output if o.name not in names]
    if len(outputs) == len(graph.output):
        return 0
    del graph.output[:]
    graph.output.extend(outputs)
    nodes = list(graph.node)
    kept = detach.without_dead(nodes, {o.name for o in outputs})
    del graph.node[:]
    graph.node.extend(kept)
    return len(nodes) - len(kept)


def verify(job: jobs.Verify) -> dict:
    """The training runtime's loss on a batch, in eval and in training mode (no update); optionally the
    eval logits and the gradients, written to .npz files. `checkpoint` picks a trained state."""
    started = time.time()
    opened = open_module(Path(job.artifacts), Path(job.checkpoint) if job.checkpoint else None)
    batch = dict(np.load(job.batch))
    module = opened.module
    module.eval()
    eval_loss, logits = opened(batch)
    if job.logits_out:
        np.save(job.logits_out, logits)
    module.train()
    train_loss = float(opened(batch)[0])
    eval_loss = float(eval_loss)
    params = dict(iter(opened.state.parameters))
    trainable = sorted(name for name, p in params.items() if p.requires_grad)
    if job.grads_out:
        np.savez(job.grads_out, **{name: np.asarray(params[name].grad) for name in trainable})
    return {"eval_loss": eval_loss, "train_loss": train_loss, "trainable": trainable,
            "checkpoint_tensors": len(params),
            "trainable_count": int(sum(params[n].data.size for n in trainable)),
            "seconds": round(time.time() - started, 2), "peak_rss_mb": round(rss.peak_mb(), 1)}


def prompt_logits(job: jobs.PromptLogits) -> dict:
    """The eval model's logits at the last position of each prompt (`prompts`: token id lists), with a trained
    `checkpoint`, written to `out` (.npy, one row per prompt)."""
    opened = open_module(Path(job.artifacts), Path(job.checkpoint))
    opened.module.eval()
    rows = []
    for prompt in job.prompts:
        ids = np.asarray([prompt], dtype=np.int64)
        rows.append(opened({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids})[1][0, -1])
    np.save(job.out, np.stack(rows))
    return {"prompts": len(rows), "peak_rss_mb": round(rss.peak_mb(), 1)}


def steps(job: jobs.Steps) -> dict:
    """Run `steps` updates on one batch with the shipped optimizer_model.onnx (a smoke test of the artifacts as
    an app would load them; `edgeft train` is the real loop)."""
    from edgeft.trainer.ort_engine import OrtEngine

    artifacts = Path(job.artifacts)
    engine = OrtEngine(artifacts, artifacts / "optimizer_model.onnx")
    batch = dict(np.load(job.batch))
    losses, times = [], []
    for _ in range(job.steps):
        t = time.time()
        losses.append(engine.forward_backward(batch))
        engine.step(job.lr)
        times.append(time.time() - t)
        events.progress(step=len(losses), loss=losses[-1], seconds=times[-1])
    return {"losses": losses, "step_seconds": times, "peak_rss_mb": round(rss.peak_mb(), 1)}
