"""merge: the trained adapter back out as a PEFT adapter, and merged into the base model.

Writes `WS/adapter/` (adapter_model.safetensors + adapter_config.json, loadable by
`PeftModel.from_pretrained`) and `WS/merged/` (a Hugging Face model folder with its tokenizer). Before
writing, the PEFT model's logits on a probe batch must equal the training runtime's eval model at the
same checkpoint, and the merged model's must equal the PEFT model's, within `tolerance`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft import launcher, quantize
from edgeft.atomic import atomic_dir
from edgeft.errors import EdgeftError
from edgeft.schema import spec
from edgeft.trainer import checkpoints
from edgeft.workspace import Workspace, hash_files


@dataclass(frozen=True)
class MergeConfig:
    checkpoint: str = spec("best, last, or a step number", "best")
    tolerance: float = spec("largest accepted absolute logit difference", 1e-4, gt=0)


def resolve(root: Path, which: str) -> Path:
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
        path = checkpoints.step_dir(root, int(which))
        if path in available:
            return path
    steps = ", ".join(str(checkpoints.read_state(p)["position"]["step"]) for p in available)
    raise EdgeftError(f"--checkpoint {which!r} is not one of: best, last, or a kept step ({steps})")


def trained_tensors(ckpt: Path, backend: str, work: Path) -> dict[str, np.ndarray]:
    if backend == "ort":
        out = work / "trained.npz"
        launcher.run("edgeft.trainer.ort_engine:read_trained",
                     {"checkpoint": str(ckpt / "ort_checkpoint"), "out": str(out)})
        return dict(np.load(out))
    from safetensors.numpy import load_file

    return load_file(ckpt / "adapter.safetensors")


def _logits(wrapper, batch) -> np.ndarray:
    import torch

    from edgeft.onnx_export import INPUT_NAMES

    wrapper.eval()
    with torch.no_grad():
        return wrapper(*(torch.from_numpy(batch[k]) for k in INPUT_NAMES))[1].numpy()


def merge(ws_path: Path, cfg: MergeConfig = MergeConfig()) -> Path:
    import torch
    from peft import PeftModel

    from edgeft import onnx_export
    from edgeft.prepare import load_base

    ws = Workspace(ws_path)
    trained = ws.require("train", f"train it first: `edgeft train {ws.root} --data FILE.jsonl`")
    prep = ws.stage("prepare")
    backend = trained["config"]["backend"]
    ckpt = resolve(ws.root / "train" / "checkpoints", cfg.checkpoint)
    state = checkpoints.read_state(ckpt)
    if state["identity"] != trained["identity"] or state["config_hash"] != trained["config_hash"]:
        raise EdgeftError(f"checkpoint {ckpt.name} was written by another training run than the one the manifest "
                          f"records; train again, or merge a checkpoint of the recorded run")
    started = time.time()
    model_dir = Path(prep["config"]["model_dir"])
    with tempfile.TemporaryDirectory(dir=ws.root) as work:
        work = Path(work)
        tensors = trained_tensors(ckpt, backend, work)
        base = load_base(model_dir, prep["config"]["trust_remote_code"])
        peft_model = PeftModel.from_pretrained(base, ws.root / "adapter_init", is_trainable=False)
        quantize.fake_quantize_(peft_model, quantize.settings(prep["config"]))  # what was trained against
        wrapper = onnx_export.CausalLMLoss(peft_model)
        params = dict(wrapper.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise EdgeftError(f"checkpoint {ckpt} holds tensors this workspace's adapter lacks ({unknown[:3]}); "
                              "it belongs to another model or adapter configuration")
        with torch.no_grad():
            for name, value in tensors.items():
                if tuple(params[name].shape) != value.shape:
                    raise EdgeftError(f"checkpoint tensor {name} has shape {value.shape}, the adapter expects "
                                      f"{tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(np.asarray(value)))
        config = base.config
        batch = onnx_export.probe_batch(config.vocab_size, 24, config.pad_token_id if isinstance(
            config.pad_token_id, int) else 0, seed=11)
        peft_logits = _logits(wrapper, batch)
        verification = {"batch": list(batch["input_ids"].shape), "tolerance": cfg.tolerance}
        if backend == "ort":
            np.savez(work / "probe.npz", **batch)
            launcher.run("edgeft.trainer.artifacts:verify", {
                "artifacts": str(ws.root / "artifacts"), "checkpoint": str(ckpt / "ort_checkpoint"),
                "batch": str(work / "probe.npz"), "logits_out": str(work / "ort_logits.npy")})
            ort_logits = np.load(work / "ort_logits.npy")
            verification["peft_vs_ort_eval_max_abs"] = float(np.abs(peft_logits - ort_logits).max())
            if verification["peft_vs_ort_eval_max_abs"] > cfg.tolerance:
                raise EdgeftError(f"merge verification failed: PEFT logits differ from the training runtime's by "
                                  f"{verification['peft_vs_ort_eval_max_abs']:.2e} (> {cfg.tolerance:g}); nothing "
                                  "was written")
        with atomic_dir(ws.root / "adapter") as tmp:
            peft_model.save_pretrained(tmp)
        merged = peft_model.merge_and_unload()
        merged_logits = _logits(onnx_export.CausalLMLoss(merged), batch)
        verification["merged_vs_peft_max_abs"] = float(np.abs(merged_logits - peft_logits).max())
        if verification["merged_vs_peft_max_abs"] > cfg.tolerance:
            raise EdgeftError(f"merge verification failed: the merged model's logits differ from the adapter's by "
                              f"{verification['merged_vs_peft_max_abs']:.2e}; the adapter was written, the merged "
                              "model was not")
        with atomic_dir(ws.root / "merged") as tmp:
            merged.save_pretrained(tmp)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(tmp)
            if (model_dir / "generation_config.json").is_file() and not (tmp / "generation_config.json").exists():
                shutil.copy(model_dir / "generation_config.json", tmp / "generation_config.json")
    outputs = {name: hash_files([p for p in (ws.root / name).rglob("*") if p.is_file()], ws.root)
               for name in ("adapter", "merged")}
    ws.drop("package")
    ws.record("merge", {
        "config": dataclasses.asdict(cfg), "checkpoint": ckpt.name, "step": state["position"]["step"],
        "backend": backend, "trained_at": trained["finished_at"], "verification": verification,
        "outputs": outputs, "seconds": round(time.time() - started, 1),
    })
    return ws.root
