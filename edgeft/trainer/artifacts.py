"""Inside the training runtime: build the training/eval/optimizer models and checkpoint, then verify them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeft import rss
from edgeft.errors import EdgeftError
from edgeft.trainer import events


def generate(args: dict) -> dict:
    import onnx
    from onnxruntime.training import artifacts

    started = time.time()
    model_path = Path(args["model"])
    out = Path(args["out"])
    graph_inits = {i.name for i in onnx.load(str(model_path), load_external_data=False).graph.initializer}
    requires_grad = [n for n in args["requires_grad"] if n in graph_inits]
    missing = sorted(set(args["requires_grad"]) - graph_inits)
    if missing:
        raise EdgeftError(f"trainable parameters missing from the exported graph: {missing[:5]}")
    frozen = [n for n in args["frozen"] if n in graph_inits]
    events.log(f"generating artifacts: {len(requires_grad)} trainable, {len(frozen)} frozen tensors")
    artifacts.generate_artifacts(
        str(model_path), requires_grad=requires_grad, frozen_params=frozen, loss=None,
        optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out),
        ort_format=bool(args.get("ort_format")), nominal_checkpoint=bool(args.get("nominal_checkpoint")))
    return {"seconds": round(time.time() - started, 2), "peak_rss_mb": round(rss.peak_mb(), 1),
            "trainable": requires_grad, "frozen_count": len(frozen)}


def verify(args: dict) -> dict:
    """The training runtime's loss on the probe batch, in eval and in training mode (no update)."""
    from onnxruntime.training.api import CheckpointState, Module

    started = time.time()
    out = Path(args["artifacts"])
    batch = dict(np.load(args["batch"]))
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu")
    inputs = [batch[k] for k in ("input_ids", "attention_mask", "labels")]
    module.eval()
    eval_loss = float(np.asarray(module(*inputs)))
    module.train()
    train_loss = float(np.asarray(module(*inputs)))
    params = dict(iter(state.parameters))
    trainable = sorted(name for name, p in params.items() if p.requires_grad)
    return {"eval_loss": eval_loss, "train_loss": train_loss, "trainable": trainable,
            "trainable_count": int(sum(params[n].data.size for n in trainable)),
            "seconds": round(time.time() - started, 2), "peak_rss_mb": round(rss.peak_mb(), 1)}
