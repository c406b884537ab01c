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
from typing import ClassVar

import numpy as np
import onnx

from edgeft.core import atomic, compare, progress, rss
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError, command
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.graph import detach, frozen_base
from edgeft.models import lazy
from edgeft.models.shapes import TILE_BYTES
from edgeft.quant import quantize
from edgeft.runtime import jobs, launcher
from edgeft.stages.prepare import Prepared
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
    tile_mb: float = spec("largest fp32 copy of a quantized base weight the training graphs make at once, in MiB: a "
                          "bigger weight is used a tile of its rows at a time (the runtime's arena reuses a freed "
                          "tile's memory for the next one)", TILE_BYTES / 2**20, gt=0)


class VerificationError(EdgeftError):
    """The exported artifacts do not reproduce the PyTorch model."""


@dataclass(frozen=True)
class Exported(Record):
    """What export recorded: the artifacts, their files' hashes, and how they were verified."""

    STAGE: ClassVar[str] = "export"
    config: ExportConfig = spec("the options")
    format: int = spec("ARTIFACTS_FORMAT of the artifacts")
    outputs: list[str] = spec("the files and folders in WS/artifacts")
    files: dict[str, str] = spec("sha256 of every file written, relative to the workspace")
    trainable_tensors: int = spec("tensors the checkpoint trains")
    trainable_params: int = spec("values the checkpoint trains")
    frozen_tensors: int = spec("frozen tensors, in base.data")
    base_weights: dict = spec("how base.data stores the frozen base")
    max_seq_len: int = spec("longest sequence the graphs are exact for")
    opset: int = spec("ONNX opset")
    verification: dict = spec("the training runtime's loss and gradients against PyTorch's")
    weights: str = spec("how the base was read: load or stream")
    detached_inputs: int = spec("detached DoRA norm inputs")
    recompute: dict | None = spec("what recomputation copied, when activations are recomputed", None)
    timing_s: dict = spec("seconds per step", default_factory=dict)
    memory_mb: dict = spec("peak memory per step", default_factory=dict)

    @property
    def recomputes(self) -> bool:
        return bool(self.config.recompute or self.recompute)


def check_artifacts(ws: Workspace, record: Exported) -> None:
    """Refuse artifacts that are not what export wrote (a file damaged, deleted or edited since), naming the file
    and the command that rebuilds them."""
    ws.check_files(record.files, "the training artifacts", f"`{command('edgeft', 'export', ws.root, '--force')}` "
                                                           "rebuilds them")


def key(ws: Workspace, cfg: ExportConfig, prep: Prepared) -> str:
    """The export stage's key: its options, the artifacts' format and the prepared workspace's key."""
    return key_of("export", dataclasses.asdict(cfg), ARTIFACTS_FORMAT, prep.key)


def unchanged(ws: Workspace, cfg: ExportConfig = ExportConfig()) -> Exported | None:
    """The export record if exporting again would write the same artifacts, and they are intact."""
    prep = ws.read(Prepared)
    return ws.unchanged(Exported, key(ws, cfg, prep)) if prep else None


def export(ws_path: Path, cfg: ExportConfig = ExportConfig(), on_event=None, force: bool = False) -> Path:
    """Write and verify `WS/artifacts/`; nothing to do when the artifacts of these options are intact, unless
    `force` (which also rebuilds damaged ones)."""
    ws = Workspace.existing(ws_path)
    from edgeft.graph import trace

    with ws.lock("export"):
        prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
        stage_key = key(ws, cfg, prep)
        if not force and (previous := ws.read(Exported)) and previous.key == stage_key:
            check_artifacts(ws, previous)  # the same export, damaged since: say so rather than redo it quietly
            print(f"export: workspace unchanged since {previous.finished_at}; nothing to do")
            return ws.artifacts
        started = time.time()
        steps = progress.Steps("export", 5)
        ref = _reference(prep, ws.adapter_init, cfg, steps)
        recompute = cfg.recompute if cfg.recompute is not None else prep.recompute
        with atomic_dir(ws.artifacts) as tmp:
            built = _build(ws, ref, cfg, tmp, steps, recompute, on_event)
            verification = _verify(ws, ref, cfg, tmp, steps, on_event, prep)
        ws.write(Exported(
            config=cfg, format=ARTIFACTS_FORMAT, outputs=sorted(p.name for p in ws.artifacts.iterdir()),
            files=ws.hashes.folder(ws.artifacts, ws.root), trainable_tensors=len(ref.trainable),
            trainable_params=ref.n_trainable, frozen_tensors=len(ref.frozen),
            base_weights={"file": frozen_base.BASE_DATA, **built["stored"]}, max_seq_len=prep.max_seq_len,
            opset=trace.OPSET, verification=verification, weights="stream" if ref.stream else "load",
            detached_inputs=built["detached"], recompute=built["generated"].get("recompute"), key=stage_key,
            timing_s={"total": round(time.time() - started, 2), "reference": ref.seconds, **built["seconds"],
                      "verify": verification.pop("seconds")},
            memory_mb={"fp32_weights": round(ref.weight_bytes / 2**20, 1), **built["memory_mb"],
                       "verify_peak_rss": verification.pop("peak_rss_mb")}))
    return ws.artifacts


@dataclass
class _Reference:
    """PyTorch's loss and LoRA gradients on the probe batch, and the model that computed them (until it is traced
    and let go: at full size it is most of the process's memory)."""

    wrapper: object
    shards: lazy.Shards | None
    quant: dict
    batch: dict
    loss: float
    grads: dict
    trainable: list[str]
    frozen: list[str]
    n_trainable: int
    weight_bytes: int
    seconds: float

    @property
    def stream(self) -> bool:
        return self.shards is not None


def _reference(prep: Prepared, adapter_init: Path, cfg: ExportConfig, steps: progress.Steps) -> _Reference:
    """The PyTorch model (PEFT on the base, quantized as it will be trained), its loss and LoRA gradients on a
    padded probe batch; loaded whole, or one decoder layer at a time (`weights`)."""
    from peft import PeftModel

    from edgeft.graph import trace

    t0 = time.time()
    rss.reset_peak()
    base, shards = lazy.base_model(prep.model_dir, prep.config.trust_remote_code, cfg.weights)
    stream = shards is not None
    peft_model = PeftModel.from_pretrained(base, adapter_init, is_trainable=True)
    quant = prep.config.base_quant
    wrapper = trace.CausalLMLoss(peft_model)
    config = base.config
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    batch = trace.probe_batch(config.vocab_size, cfg.probe_seq_len, pad_id)
    n_layers = len(lazy.decoder_layers(peft_model))
    with steps.step("PyTorch reference: loss and LoRA gradients" + (", one decoder layer at a time" if stream else ""),
                    2 * n_layers if stream else None) as tick, \
            lazy.streamed(peft_model, shards, quantize.fake_quantizer(quant), tick) if stream else contextlib.nullcontext():
        if not stream:
            quantize.fake_quantize_(peft_model, quant)
        loss, grads = trace.torch_loss_and_grads(wrapper, batch)
    if not compare.finite(loss):
        raise VerificationError(
            f"export verification failed: PyTorch's loss on the probe batch is {loss} (not finite): the weights "
            f"in {prep.model_dir} hold NaN or infinite values; nothing was written. Use an intact checkpoint")
    trainable, frozen = trace.parameter_names(wrapper)
    return _Reference(
        wrapper, shards, quant, batch, loss, grads, trainable, frozen,
        n_trainable=sum(p.numel() for p in wrapper.parameters() if p.requires_grad),
        weight_bytes=sum(p.numel() * p.element_size() for p in {id(p): p for p in wrapper.parameters()}.values()),
        seconds=round(time.time() - t0, 2))


def _from_shards(shards: lazy.Shards, keys: dict[str, str], traced_dir: Path, init) -> np.ndarray:
    """An initializer of a model traced without weights: a placeholder's values come from the shards."""
    if init.name in keys:
        return shards.read(keys[init.name]).numpy()
    return frozen_base.initializer_array(init, traced_dir)


def _build(ws: Workspace, ref: _Reference, cfg: ExportConfig, tmp: Path, steps: progress.Steps, recompute: bool,
           on_event) -> dict:
    """Trace the reference model (then let it go), move its frozen weights into base.data, and have the training
    runtime generate the training, eval and optimizer models in `tmp`."""
    from edgeft.graph import trace

    work = tmp / ".export"
    traced = work / "traced" / "model.onnx"  # with its weights as files beside it, past 2 GB
    traced.parent.mkdir(parents=True)
    t0 = time.time()
    with steps.step("ONNX trace" + (" (placeholder weights)" if ref.stream else "")):
        keys = trace.export(ref.wrapper, ref.batch, traced, weights=not ref.stream)
    trace_seconds, torch_peak = round(time.time() - t0, 2), rss.peak_mb()
    ref.wrapper = None  # the model's last reference: its weights go before base.data is written
    gc.collect()
    np.savez(work / "probe.npz", **ref.batch)
    t0 = time.time()
    rss.reset_peak()
    read = functools.partial(_from_shards, ref.shards, keys, traced.parent) if ref.stream else None
    with steps.step(f"frozen weights into {frozen_base.BASE_DATA} ({ref.quant['precision']})"):
        slim, stored = frozen_base.externalize(traced, tmp, set(ref.frozen), ref.quant, read)
    shutil.rmtree(traced.parent)  # its weights now live in base.data
    detached = detach.detach_norms(slim, set(ref.trainable))
    trace.rows_by_gathernd(slim)
    atomic.write_json(tmp / INPUTS_FILE, {"inputs": list(trace.INPUT_NAMES), "detached": detached,
                                          "base_inputs": stored.pop("inputs"),
                                          "quantized_weights": stored.pop("quantized_weights")})
    onnx.save(slim, str(tmp / "slim_model.onnx"))
    del slim
    externalize_s, externalize_peak = round(time.time() - t0, 2), round(rss.peak_mb(), 1)
    with steps.step("training, eval and optimizer models (generate_artifacts" +
                    (", recomputation)" if recompute else ")")):
        generated = launcher.run(jobs.GenerateArtifacts(
            model=str(tmp / "slim_model.onnx"), out=str(tmp), requires_grad=ref.trainable, recompute=recompute,
            data_inputs=list(trace.INPUT_NAMES), nominal_checkpoint=cfg.nominal_checkpoint, ort_format=cfg.ort_format,
            tile_bytes=max(1, int(cfg.tile_mb * 2**20))),
            on_event=on_event, log_path=ws.log("export-runtime"), cwd=tmp)
    (tmp / "slim_model.onnx").unlink()
    return {"stored": stored, "detached": len(detached), "generated": generated,
            "seconds": {"trace": trace_seconds, "externalize": externalize_s, "generate_artifacts": generated["seconds"]},
            "memory_mb": {"torch_export_peak_rss": round(torch_peak, 1), "externalize_peak_rss": externalize_peak,
                          "generate_artifacts_peak_rss": generated["peak_rss_mb"]}}


def _verify(ws: Workspace, ref: _Reference, cfg: ExportConfig, tmp: Path, steps: progress.Steps, on_event,
            prep: Prepared) -> dict:
    """A training step in the training runtime on the probe batch, against the reference: the loss within
    `tolerance` (relative), the gradients within `grad_tolerance` (not with LoRA dropout, which is random), and the
    same trainable tensors. Refuses otherwise; the record's verification figures."""
    from edgeft.graph import trace

    work = tmp / ".export"
    with steps.step("verify: a training step in ONNX Runtime against the reference"):
        verified = launcher.run(jobs.Verify(artifacts=str(tmp), batch=str(work / "probe.npz"),
                                            grads_out=str(work / "ort_grads.npz")),
                                on_event=on_event, log_path=ws.log("export-runtime"))
    grad_error = trace.gradient_error(ref.grads, dict(np.load(work / "ort_grads.npz")))
    dropout = prep.config.lora_dropout > 0
    shutil.rmtree(work)
    rel = compare.max_abs_diff(verified["eval_loss"], ref.loss) / max(abs(ref.loss), 1e-12)
    if not compare.within(rel, cfg.tolerance):
        raise VerificationError(
            f"export verification failed: ONNX Runtime loss {verified['eval_loss']:.6f} vs PyTorch "
            f"{ref.loss:.6f} (relative difference {compare.describe(rel)}, tolerance {cfg.tolerance:g}); nothing "
            "was written. Report this with the model's config.json")
    if not dropout and not compare.within(grad_error, cfg.grad_tolerance):
        raise VerificationError(
            f"export verification failed: ONNX Runtime gradients differ from PyTorch's by "
            f"{compare.describe(grad_error)} (relative, tolerance {cfg.grad_tolerance:g}); nothing was written. "
            "Report this with the model's config.json")
    if sorted(verified["trainable"]) != sorted(ref.trainable) or verified["trainable_count"] != ref.n_trainable:
        raise VerificationError(
            f"export verification failed: the checkpoint trains {verified['trainable_count']} values in "
            f"{len(verified['trainable'])} tensors, PEFT {ref.n_trainable} in {len(ref.trainable)}")
    return {"torch_loss": ref.loss, "ort_eval_loss": verified["eval_loss"], "ort_train_loss": verified["train_loss"],
            "relative_difference": rel, "tolerance": cfg.tolerance, "batch": list(ref.batch["input_ids"].shape),
            "padded_rows": 1, "gradient_relative_error": None if dropout else grad_error,
            "gradient_tolerance": cfg.grad_tolerance,
            "gradient_note": "not compared: LoRA dropout is random in training mode" if dropout else None,
            "seconds": verified["seconds"], "peak_rss_mb": verified["peak_rss_mb"]}
