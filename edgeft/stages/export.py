"""export: turn a prepared workspace into ONNX Runtime on-device training artifacts, and prove them.

Writes `WS/artifacts/` (training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint) with only
the adapter weights (and any --train-modules / trainable tokens) trainable. The export verifies itself:
the training runtime's loss on a padded probe batch must equal PEFT/torch's within `tolerance`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeft.core import atomic, compare, progress, rss
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError, command
from edgeft.core.schema import spec
from edgeft.core.workspace import Workspace
from edgeft.devices import plan
from edgeft.graph import detach, frozen_base
from edgeft.models import lazy
from edgeft.quant import quantize
from edgeft.runtime import launcher
from edgeft.trainer.session import INPUTS_FILE

# Bumped when the artifacts' layout changes (2: frozen base in base.data; 3: logits as second output).
ARTIFACTS_FORMAT = 3
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", frozen_base.BASE_DATA)


@dataclass(frozen=True)
class ExportConfig:
    nominal_checkpoint: bool = spec("also write nominal_checkpoint (shapes only, for apps that ship weights apart)",
                                    False)
    ort_format: bool = spec("also write the models in ORT format (.ort) for minimal runtime builds", False)
    probe_seq_len: int = spec("tokens per row of the verification batch", 24, min=4)
    tolerance: float = spec("largest accepted relative loss difference between ORT and torch", 1e-4, gt=0)
    grad_tolerance: float = spec("largest accepted relative gradient error (all trainable tensors together)",
                                 1e-3, gt=0)
    weights: str = spec("how the base weights are read: 'load' holds the fp32 model, as transformers loads it; "
                        "'stream' reads one tensor at a time from the safetensors files (the PyTorch reference then "
                        "holds one decoder layer at a time); 'auto' streams past 4 GiB of fp32 weights", "auto",
                        choices=("auto", "load", "stream"))
    recompute: bool | None = spec("recompute each layer's activations in the backward pass instead of holding them "
                                  "(about a third more compute per step, a fraction of the activation memory); "
                                  "default: as prepare's device plan chose (off without a device)", None)


class VerificationError(EdgeftError):
    """The exported artifacts do not reproduce the PyTorch model."""


def check_artifacts(ws: Workspace, record: dict) -> None:
    """Refuse artifacts that are not what export wrote (a file damaged, deleted or edited since), naming the file
    and the command that rebuilds them. Records from before content hashes were kept are checked for presence."""
    fix = f"`{command('edgeft', 'export', ws.root, '--force')}` rebuilds them"
    if "files" in record:
        ws.check_files(record["files"], "the training artifacts", fix)
    elif missing := [f for f in ARTIFACT_FILES if not (ws.root / "artifacts" / f).exists()]:
        raise EdgeftError(f"the training artifacts in {ws.root} are incomplete: artifacts/{missing[0]} is missing; {fix}")


def _unchanged(ws: Workspace, cfg: ExportConfig) -> dict | None:
    """The export record, if the artifacts it describes are the ones this export would write; an error if they
    were written for these options and inputs but changed since."""
    record = ws.stage("export")
    prep = ws.stage("prepare")
    if not record or record.get("config") != dataclasses.asdict(cfg):
        return None
    if record.get("format") != ARTIFACTS_FORMAT:
        return None
    if record.get("prepared_at") != prep["finished_at"]:
        return None
    check_artifacts(ws, record)
    return record


def _from_shards(shards: lazy.Shards, keys: dict[str, str], traced_dir: Path, init) -> np.ndarray:
    """An initializer of a model traced without weights: a placeholder's values come from the shards."""
    if init.name in keys:
        return shards.read(keys[init.name]).numpy()
    return frozen_base.initializer_array(init, traced_dir)


def export(ws_path: Path, cfg: ExportConfig = ExportConfig(), on_event=None, force: bool = False) -> Path:
    """Write and verify `WS/artifacts/`; nothing to do when the artifacts of these options are intact, unless
    `force` (which also rebuilds damaged ones)."""
    ws = Workspace(ws_path)
    if not ws.root.is_dir():
        raise EdgeftError(f"workspace {ws.root} does not exist; run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    with ws.lock("export"):
        return _export(ws, cfg, on_event, force)


def _export(ws: Workspace, cfg: ExportConfig, on_event, force: bool) -> Path:
    from peft import PeftModel

    from edgeft.graph import trace

    prep = ws.require("prepare", f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    out = ws.root / "artifacts"
    if not force and (previous := _unchanged(ws, cfg)) is not None:
        print(f"export: workspace unchanged since {previous['finished_at']}; nothing to do")
        return out
    started = time.time()
    rss.reset_peak()
    model_dir = Path(prep["config"]["model_dir"])
    trust = prep["config"]["trust_remote_code"]
    base, shards = lazy.base_model(model_dir, trust, cfg.weights)
    stream = shards is not None
    peft_model = PeftModel.from_pretrained(base, ws.root / "adapter_init", is_trainable=True)
    quant = quantize.settings(prep["config"])
    wrapper = trace.CausalLMLoss(peft_model)
    config = base.config
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    batch = trace.probe_batch(config.vocab_size, cfg.probe_seq_len, pad_id)
    # The reference trains against the same quantized base, loaded whole or one layer at a time.
    steps = progress.Steps("export", 5)
    t0 = time.time()
    n_layers = len(lazy.decoder_layers(peft_model))
    with steps.step("PyTorch reference: loss and LoRA gradients" + (", one decoder layer at a time" if stream else ""),
                    2 * n_layers if stream else None) as tick, \
            lazy.streamed(peft_model, shards, quantize.fake_quantizer(quant), tick) if stream else contextlib.nullcontext():
        if not stream:
            quantize.fake_quantize_(peft_model, quant)
        reference, torch_grads = trace.torch_loss_and_grads(wrapper, batch)
    reference_seconds = time.time() - t0
    if not compare.finite(reference):
        raise VerificationError(
            f"export verification failed: PyTorch's loss on the probe batch is {reference} (not finite): the weights "
            f"in {model_dir} hold NaN or infinite values; nothing was written. Use an intact checkpoint")
    trainable, frozen = trace.parameter_names(wrapper)
    recompute = cfg.recompute if cfg.recompute is not None else plan.prepared_recompute(prep)
    n_trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in wrapper.parameters()}.values())

    with atomic_dir(out) as tmp:
        work = tmp / ".export"
        traced = work / "traced" / "model.onnx"  # with its weights as files beside it, past 2 GB
        traced.parent.mkdir(parents=True)
        t0 = time.time()
        with steps.step("ONNX trace" + (" (placeholder weights)" if stream else "")):
            keys = trace.export(wrapper, batch, traced, weights=not stream)
        trace_seconds = time.time() - t0
        torch_peak = rss.peak_mb()
        del wrapper, peft_model, base
        gc.collect()
        np.savez(work / "probe.npz", **batch)
        t0 = time.time()
        rss.reset_peak()
        read = functools.partial(_from_shards, shards, keys, traced.parent) if stream else None
        with steps.step(f"frozen weights into {frozen_base.BASE_DATA} ({quant['precision']})"):
            slim, stored = frozen_base.externalize(traced, tmp, set(frozen), quant, read)
        shutil.rmtree(traced.parent)  # its weights now live in base.data
        detached = detach.detach_norms(slim, set(trainable))
        trace.rows_by_gathernd(slim)
        atomic.write_json(tmp / INPUTS_FILE, {"inputs": list(trace.INPUT_NAMES), "detached": detached,
                                              "base_inputs": stored.pop("inputs"),
                                              "quantized_weights": stored.pop("quantized_weights")})
        onnx.save(slim, str(tmp / "slim_model.onnx"))
        del slim
        externalize = {"seconds": round(time.time() - t0, 2), "peak_rss_mb": round(rss.peak_mb(), 1)}
        log = ws.root / "logs" / "export-runtime.log"
        with steps.step("training, eval and optimizer models (generate_artifacts" +
                        (", recomputation)" if recompute else ")")):
            generated = launcher.run("edgeft.trainer.artifacts:generate", {
                "model": str(tmp / "slim_model.onnx"), "out": str(tmp), "requires_grad": trainable,
                "recompute": recompute, "data_inputs": list(trace.INPUT_NAMES),
                "nominal_checkpoint": cfg.nominal_checkpoint, "ort_format": cfg.ort_format},
                on_event=on_event, log_path=log, cwd=tmp)
        (tmp / "slim_model.onnx").unlink()
        with steps.step("verify: a training step in ONNX Runtime against the reference"):
            verified = launcher.run("edgeft.trainer.artifacts:verify",
                                    {"artifacts": str(tmp), "batch": str(work / "probe.npz"),
                                     "grads_out": str(work / "ort_grads.npz")},
                                    on_event=on_event, log_path=log)
        grad_error = trace.gradient_error(torch_grads, dict(np.load(work / "ort_grads.npz")))
        dropout = prep["config"]["lora_dropout"] > 0
        shutil.rmtree(work)
        rel = compare.max_abs_diff(verified["eval_loss"], reference) / max(abs(reference), 1e-12)
        if not compare.within(rel, cfg.tolerance):
            raise VerificationError(
                f"export verification failed: ONNX Runtime loss {verified['eval_loss']:.6f} vs PyTorch "
                f"{reference:.6f} (relative difference {compare.describe(rel)}, tolerance {cfg.tolerance:g}); nothing "
                "was written. Report this with the model's config.json")
        if not dropout and not compare.within(grad_error, cfg.grad_tolerance):
            raise VerificationError(
                f"export verification failed: ONNX Runtime gradients differ from PyTorch's by "
                f"{compare.describe(grad_error)} (relative, tolerance {cfg.grad_tolerance:g}); nothing was written. "
                "Report this with the model's config.json")
        if sorted(verified["trainable"]) != sorted(trainable) or verified["trainable_count"] != n_trainable:
            raise VerificationError(
                f"export verification failed: the checkpoint trains {verified['trainable_count']} values in "
                f"{len(verified['trainable'])} tensors, PEFT {n_trainable} in {len(trainable)}")

    ws.drop("train", "merge", "package")
    ws.record("export", {
        "config": dataclasses.asdict(cfg), "format": ARTIFACTS_FORMAT, "prepared_at": prep["finished_at"],
        "outputs": sorted(p.name for p in out.iterdir()), "files": ws.hashes.folder(out, ws.root),
        "trainable_tensors": len(trainable), "trainable_params": n_trainable, "frozen_tensors": len(frozen),
        "base_weights": {"file": frozen_base.BASE_DATA, **stored},
        "max_seq_len": prep["max_seq_len"], "opset": trace.OPSET,
        "verification": {"torch_loss": reference, "ort_eval_loss": verified["eval_loss"],
                         "ort_train_loss": verified["train_loss"], "relative_difference": rel,
                         "tolerance": cfg.tolerance, "batch": list(batch["input_ids"].shape), "padded_rows": 1,
                         "gradient_relative_error": None if dropout else grad_error,
                         "gradient_tolerance": cfg.grad_tolerance,
                         "gradient_note": "not compared: LoRA dropout is random in training mode" if dropout else None},
        "weights": "stream" if stream else "load",
        "detached_inputs": len(detached),
        "recompute": generated.get("recompute"),
        "timing_s": {"total": round(time.time() - started, 2), "reference": round(reference_seconds, 2), "trace": round(trace_seconds, 2),
                     "externalize": externalize["seconds"], "generate_artifacts": generated["seconds"],
                     "verify": verified["seconds"]},
        "memory_mb": {"fp32_weights": round(weight_bytes / 2**20, 1), "torch_export_peak_rss": round(torch_peak, 1),
                      "externalize_peak_rss": externalize["peak_rss_mb"],
                      "generate_artifacts_peak_rss": generated["peak_rss_mb"],
                      "verify_peak_rss": verified["peak_rss_mb"]},
    })
    return out
