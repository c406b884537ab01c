"""merge: the trained adapter back out as a PEFT adapter, and merged into the base model.

Writes `WS/adapter/` (adapter_model.safetensors + adapter_config.json, loadable by
`PeftModel.from_pretrained`) and `WS/merged/` (a Hugging Face model folder with its tokenizer). Before
writing, the PEFT model's logits on a probe batch must equal the training runtime's eval model at the
same checkpoint, and the merged model's must equal the PEFT model's, within `tolerance` (the largest
difference over the largest logit).

Past 4 GiB of fp32 weights (or with `weights="stream"`) nothing holds the whole model, as in export
(models/lazy.py): the PEFT logits are computed one decoder layer at a time, and the merged model is written one
layer at a time. Each layer is loaded, fake-quantized as it was trained, merged by PEFT's own `merge()`
(LoRA, DoRA, trainable token rows) and written to a safetensors shard before the next one is loaded. Its
logits are then computed from the written files the same way. Both routes write the same tensors
(tests/stages/test_merge.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from edgeft.core import compare, progress, rss
from edgeft.core.atomic import atomic_dir, scratch_dir
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, checkpoint_dir, key_of
from edgeft.models import lazy
from edgeft.quant import quantize
from edgeft.runtime import jobs, launcher
from edgeft.stages import card
from edgeft.stages.export import Exported, check_artifacts
from edgeft.stages.prepare import Prepared
from edgeft.stages.train import Trained
from edgeft.trainer import checkpoints
from edgeft.trainer.ort_engine import CHECKPOINT


@dataclass(frozen=True)
class MergeConfig:
    checkpoint: str = spec("best, last, or a step number", "best")
    tolerance: float = spec("largest accepted logit difference, relative to the largest logit", 1e-4, gt=0)
    weights: str = spec("how the base weights are read: 'load' holds the fp32 model; 'stream' one decoder layer at "
                        "a time; 'auto' streams past 4 GiB of fp32 weights", "auto", choices=("auto", "load", "stream"))


def resolve(root: Path, which: str) -> Path:
    """The checkpoint folder `which` names (best, last or a step) among the run's complete ones."""
    available = checkpoints.complete(root)
    if not available:
        raise EdgeftError(f"{root} has no checkpoints; run `edgeft train` first")
    if which == "last":
        return available[-1]
    if which == "best":
        best = checkpoints.best(root)
        if best is None:
            raise EdgeftError("this run has no best checkpoint (it had no validation data); use --checkpoint last")
        return best
    if which.isdigit():
        path = checkpoint_dir(root, int(which))
        if path in available:
            return path
    steps = ", ".join(str(checkpoints.read_state(p)["position"]["step"]) for p in available)
    raise EdgeftError(f"--checkpoint {which!r} is not one of: best, last, or a kept step ({steps})")


def trained_tensors(ckpt: Path, backend: str, work: Path) -> dict[str, np.ndarray]:
    """The trained tensors of a checkpoint (an ORT one is read in the training runtime)."""
    if backend == "ort":
        out = work / "trained.npz"
        launcher.run(jobs.ReadTrained(checkpoint=str(ckpt / CHECKPOINT), out=str(out)))
        return dict(np.load(out))
    from safetensors.numpy import load_file

    return load_file(ckpt / "adapter.safetensors")


def _logits(wrapper, batch) -> np.ndarray:
    import torch

    from edgeft.graph.trace import INPUT_NAMES

    wrapper.eval()
    with torch.no_grad():
        return wrapper(*(torch.from_numpy(batch[k]) for k in INPUT_NAMES))[1].numpy()


SHARD_BYTES = 2 * 2**30  # a streamed merge writes safetensors shards of about this size


class _Shards:
    """Safetensors shards written in turn, named and indexed as transformers names them at the end."""

    def __init__(self, out: Path):
        self.out, self.pending, self.pending_bytes, self.files, self.total = out, {}, 0, [], 0

    def add(self, key: str, value) -> None:
        self.pending[key] = value.detach().contiguous().clone()
        self.pending_bytes += self.pending[key].numel() * self.pending[key].element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f".shard-{len(self.files)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        import json

        self.flush()
        n, weight_map = len(self.files), {}
        for i, (path, keys) in enumerate(self.files, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")


def _write_merged_streamed(peft_model, shards: lazy.Shards, quant: dict, out: Path) -> int:
    """Write the merged model's weights into `out`, holding one decoder layer (and the parts outside the layers)
    at a time. PEFT merges each loaded part itself; a module trained whole (modules_to_save) replaces its
    original, untied from the embedding if it was tied to it. Returns how many tensors were written."""
    layers = lazy.decoder_layers(peft_model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    merging = _StreamedMerge(peft_model, shards, quant, out)
    with torch.no_grad():
        merging.write(peft_model, [m for m in peft_model.modules() if id(m) not in in_layers])
        for layer in layers:
            merging.write(layer, list(layer.modules()))
    merging.writer.close()
    if merging.untied:  # as merge_and_unload leaves it: the trained module has its own weight now
        peft_model.get_base_model().config.tie_word_embeddings = False
    return len(merging.written)


class _StreamedMerge:
    """The merged weights, written part by part into safetensors shards."""

    def __init__(self, peft_model, shards: lazy.Shards, quant: dict, out: Path):
        self.shards, self.quant = shards, quant
        self.paths = {id(m): name for name, m in peft_model.get_base_model().named_modules()}
        self.writer, self.written, self.untied = _Shards(out), set(), set()

    @staticmethod
    def key_of(p) -> str | None:
        """The safetensors key a loaded parameter was read from (None for one edgeft made, such as LoRA's)."""
        return getattr(getattr(p, lazy.PLACEHOLDER), lazy.KEY) if hasattr(p, lazy.PLACEHOLDER) else None

    def write(self, part: torch.nn.Module, modules: list) -> None:
        """Load `modules`' own weights, merge them with PEFT, write them, and let them go."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        lazy.load_(part, self.shards, only={id(p) for m in modules for p in m._parameters.values() if p is not None})
        try:
            quantize.fake_quantize_(part, self.quant)  # what was trained against; the rest are placeholders, skipped
            for m in modules:
                if isinstance(m, BaseTunerLayer):
                    m.merge()
            self._trained_whole(modules)
            for m in modules:
                for p in m._parameters.values():
                    key = self.key_of(p) if p is not None else None
                    if key is not None and key not in self.written:
                        self._add(key, p)
        finally:
            lazy.unload_(part)

    def _trained_whole(self, modules: list) -> None:
        """A module trained whole (modules_to_save): its trained copy, under the module's own names."""
        from peft.utils import ModulesToSaveWrapper

        for m in modules:
            if isinstance(m, ModulesToSaveWrapper):
                trained = m.modules_to_save[m.active_adapters[0]]
                for name, p in m.original_module.named_parameters():
                    key = f"{self.paths[id(m)]}.{name}"
                    if self.key_of(p) != key:  # it was tied to another weight (an LM head to the embedding)
                        self.untied.add(key)
                    self._add(key, trained.get_parameter(name))

    def _add(self, key: str, value) -> None:
        self.writer.add(key, value)
        self.written.add(key)


@dataclass(frozen=True)
class Merged(Record):
    """What merge recorded: the checkpoint merged, the adapter and merged model it wrote, and their checks."""

    STAGE: ClassVar[str] = "merge"
    config: MergeConfig = spec("the options")
    checkpoint: str = spec("the checkpoint merged (its folder's name)")
    step: int = spec("its step")
    backend: str = spec("the backend that trained it")
    trained_at: str = spec("when that run finished")
    verification: dict = spec("logit differences: PEFT against the training runtime, merged against PEFT")
    outputs: dict[str, dict[str, str]] = spec("sha256 of the files of adapter/ and merged/")
    seconds: float = spec("wall time", 0.0)
    peak_rss_mb: float = spec("peak memory", 0.0)

    @property
    def files(self) -> dict[str, str]:
        return {**self.outputs["adapter"], **self.outputs["merged"]}


def key(cfg: MergeConfig, trained: Trained, checkpoint: Path) -> str:
    """The merge stage's key: its options, the training run's key and the checkpoint it picks."""
    return key_of("merge", dataclasses.asdict(cfg), trained.key, checkpoint.name)


def unchanged(ws: Workspace, cfg: MergeConfig = MergeConfig()) -> Merged | None:
    """The merge record if merging again would merge the same checkpoint, and what it wrote is intact."""
    trained = ws.read(Trained)
    if trained is None or not checkpoints.complete(ws.checkpoints):
        return None
    return ws.unchanged(Merged, key(cfg, trained, resolve(ws.checkpoints, cfg.checkpoint)))


def merge(ws_path: Path, cfg: MergeConfig = MergeConfig()) -> Path:
    """Write `WS/adapter/` and `WS/merged/` from a training checkpoint, both verified (holding the workspace's
    lock); returns the workspace."""
    ws = Workspace.existing(ws_path)
    with ws.lock("merge"):
        trained = ws.require(Trained, f"train it first: `edgeft train {ws.root} --data FILE.jsonl`")
        ckpt = _checkpoint(ws, trained, cfg)
        started = time.time()
        rss.reset_peak()
        with scratch_dir(ws.root, "merge-work") as work:
            verification = _merge(ws, ckpt, trained.config.backend, cfg, work)
        state = checkpoints.read_state(ckpt)
        prep = ws.read(Prepared)
        card.describe_adapter(ws.adapter, ws.root.name, prep.model_dir, prep, trained, state["position"]["step"],
                              ckpt.name)  # its base named portably, and a model card instead of PEFT's template
        ws.write(Merged(
            config=cfg, checkpoint=ckpt.name, step=state["position"]["step"], backend=trained.config.backend,
            trained_at=trained.finished_at, verification=verification, key=key(cfg, trained, ckpt),
            outputs={name: outputs(ws, name) for name in ("adapter", "merged")},
            seconds=round(time.time() - started, 1), peak_rss_mb=round(rss.peak_mb(), 1)))
    return ws.root


def outputs(ws: Workspace, name: str) -> dict[str, str]:
    """sha256 of the files merge wrote to WS/NAME, but the adapter's card (README.md): eval adds its results to it."""
    return {k: v for k, v in ws.hashes.folder(ws.root / name, ws.root).items() if k != f"{name}/{card.CARD}"}


def _checkpoint(ws: Workspace, trained: Trained, cfg: MergeConfig) -> Path:
    """The checkpoint `cfg.checkpoint` names, intact and written by the recorded run (and, for ORT, its artifacts
    intact)."""
    ckpt = resolve(ws.checkpoints, cfg.checkpoint)
    state = checkpoints.read_state(ckpt)
    checkpoints.verify(ckpt, ws.hashes)
    if trained.config.backend == "ort":
        check_artifacts(ws, ws.require(Exported, f"export it first: `edgeft export {ws.root}`"))
    if state["identity"] != trained.identity or state["config_hash"] != trained.config_hash:
        raise EdgeftError(f"checkpoint {ckpt.name} was written by another training run than the one the manifest "
                          f"records; train again, or merge a checkpoint of the recorded run")
    return ckpt


def _merge(ws: Workspace, ckpt: Path, backend: str, cfg: MergeConfig, work: Path) -> dict:
    """Load the base with the checkpoint's adapter, check its logits against the training runtime's, write the
    adapter and the merged model, and check the merged model's logits; the verification figures."""
    import contextlib

    from edgeft.graph import trace

    prep = ws.read(Prepared)
    quant, trust = prep.config.base_quant, prep.config.trust_remote_code
    base, shards = lazy.base_model(prep.model_dir, trust, cfg.weights)
    stream = shards is not None
    peft_model = _with_checkpoint(ws, base, ckpt, backend, quant, stream, work)
    config = base.config
    batch = trace.probe_batch(config.vocab_size, 24, config.pad_token_id if isinstance(
        config.pad_token_id, int) else 0, seed=11)
    steps = progress.Steps("merge", 4 if backend == "ort" else 3)
    n_layers = len(lazy.decoder_layers(peft_model))
    streaming = ", one decoder layer at a time" if stream else ""
    with steps.step(f"the adapter's logits (PEFT){streaming}", n_layers if stream else None) as tick, \
            lazy.streamed(peft_model, shards, quantize.fake_quantizer(quant), tick) if stream else contextlib.nullcontext():
        peft_logits = _logits(trace.CausalLMLoss(peft_model), batch)
    check = _LogitCheck(peft_logits, cfg.tolerance, ckpt, prep.model_dir)
    if backend == "ort":
        np.savez(work / "probe.npz", **batch)
        with steps.step("the training runtime's logits (eval model, trained checkpoint)"):
            launcher.run(jobs.Verify(artifacts=str(ws.artifacts), checkpoint=str(ckpt / CHECKPOINT),
                                     batch=str(work / "probe.npz"), logits_out=str(work / "ort_logits.npy")))
        check("peft_vs_ort_eval", np.load(work / "ort_logits.npy"), "PEFT logits differ from the training runtime's",
              "nothing was written")
    with atomic_dir(ws.adapter) as tmp:
        peft_model.save_pretrained(tmp)
    with atomic_dir(ws.merged) as tmp:
        with steps.step(f"the PEFT adapter and the merged model, written{streaming}"):
            if stream:
                _write_merged_streamed(peft_model, shards, quant, tmp)
                config.architectures = [type(base).__name__]  # as save_pretrained records it
                config.save_pretrained(tmp)
                merged, merged_shards = lazy.empty_model(tmp, trust)  # checked from the files just written
            else:
                merged, merged_shards = peft_model.merge_and_unload(), None
                merged.save_pretrained(tmp)
        with steps.step(f"the merged model's logits{streaming}", n_layers if stream else None) as tick, \
                lazy.streamed(merged, merged_shards, on_layer=tick) if stream else contextlib.nullcontext():
            check("merged_vs_peft", _logits(trace.CausalLMLoss(merged), batch),
                  "the merged model's logits differ from the adapter's", "the adapter was written, the merged model was not")
        _copy_tokenizer(prep.model_dir, tmp)
    return check.figures | {"batch": list(batch["input_ids"].shape), "weights": "streamed" if stream else "loaded"}


def _with_checkpoint(ws: Workspace, base, ckpt: Path, backend: str, quant: dict, stream: bool, work: Path):
    """PEFT on `base` with the checkpoint's trained tensors (finite, and of the adapter's names and shapes), the
    base fake-quantized as it was trained (when loaded whole; streamed, as each layer loads)."""
    from peft import PeftModel

    from edgeft.graph import trace

    tensors = trained_tensors(ckpt, backend, work)
    peft_model = PeftModel.from_pretrained(base, ws.adapter_init, is_trainable=False)
    if not stream:
        quantize.fake_quantize_(peft_model, quant)  # what was trained against
    params = dict(trace.CausalLMLoss(peft_model).named_parameters())
    if unknown := sorted(set(tensors) - set(params)):
        raise EdgeftError(f"checkpoint {ckpt} holds tensors this workspace's adapter lacks ({unknown[:3]}); "
                          "it belongs to another model or adapter configuration")
    if bad := sorted(name for name, value in tensors.items() if not compare.finite(value)):
        raise EdgeftError(f"checkpoint {ckpt.name} holds NaN or infinite values ({len(bad)} tensors, first "
                          f"{bad[0]}): the run diverged before it was saved. Merge an earlier checkpoint "
                          "(--checkpoint STEP), or train again with a lower --lr")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(params[name].shape) != value.shape:
                raise EdgeftError(f"checkpoint tensor {name} has shape {value.shape}, the adapter expects "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(torch.from_numpy(np.asarray(value)))
    return peft_model


class _LogitCheck:
    """Logits compared with the adapter's (PEFT's): the largest difference, absolute and relative to the largest
    PEFT logit, refused past the tolerance (relative: float32 rounding grows with the logits' scale, which a real
    checkpoint's are many times a random one's). `figures` collects what each comparison measured."""

    def __init__(self, peft_logits: np.ndarray, tolerance: float, ckpt: Path, model_dir: Path):
        if not compare.finite(peft_logits):
            raise EdgeftError(f"merge verification failed: the adapter's logits are not finite (NaN or infinity) at "
                              f"{ckpt.name}; the base weights in {model_dir} or the checkpoint hold non-finite values. "
                              "Nothing was written")
        self.peft, self.tolerance = peft_logits, tolerance
        self.scale = float(np.abs(peft_logits).max())
        self.figures = {"tolerance": tolerance, "logit_scale": self.scale}

    def __call__(self, name: str, logits: np.ndarray, differs: str, written: str) -> None:
        diff = compare.max_abs_diff(logits, self.peft)
        rel = diff / max(self.scale, float(np.finfo(np.float32).tiny))
        self.figures |= {f"{name}_max_abs": diff, f"{name}_relative": rel}
        if not compare.within(rel, self.tolerance):
            raise EdgeftError(f"merge verification failed: {differs} by {compare.describe(diff)}, "
                              f"{compare.describe(rel)} of the largest logit ({self.scale:.3g}; tolerance "
                              f"{self.tolerance:g}); {written}")


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    """The base's tokenizer (and generation config) beside the merged weights: a complete model folder."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(out)
    if (model_dir / "generation_config.json").is_file() and not (out / "generation_config.json").exists():
        shutil.copy(model_dir / "generation_config.json", out / "generation_config.json")
