"""Non-finite numbers inside the pipeline: training that diverges stops, and no verification passes NaN."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeft.core import compare
from edgeft.core.fingerprint import sha256_file
from edgeft.graph.trace import gradient_error
from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, stages

DATA = DATA_DIR / "train.jsonl"


def test_a_difference_is_within_tolerance_only_when_finite():
    assert compare.within(1e-5, 1e-4) and not compare.within(1e-3, 1e-4)
    assert not compare.within(math.nan, 1e-4) and not compare.within(math.inf, 1e-4)
    assert compare.max_abs_diff([1.0, 2.0], [1.0, 2.5]) == 0.5
    assert compare.max_abs_diff([1.0, np.nan], [1.0, 2.0]) == math.inf
    assert compare.max_abs_diff([np.inf], [np.inf]) == math.inf
    grads = {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32)}
    assert gradient_error(grads, grads) == 0.0
    assert gradient_error(grads, {**grads, "b": grads["b"] * np.nan}) == math.inf


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_training_that_diverges_stops_and_keeps_the_last_finite_checkpoint(workspace, backend):
    ws = workspace("exported")
    result = cli("train", ws, "--data", DATA, "--backend", backend, "--lr", "1e30", "--max-grad-norm", "1e30",
                 "--max-steps", "6", "--batch-size", "4", "--seq-len", "128", "--save-every", "1")
    refused(result, "training stopped at step 2", "(not finite), so the run diverged",
            "the last checkpoint, step-000001, is intact", "Lower --lr (this run: 1e+30)")
    kept = sorted(p.name for p in (ws / "train" / "checkpoints").glob("step-*"))
    assert kept == ["step-000001"]
    assert "train" not in stages(ws)
    rows = [json.loads(line) for line in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "progress"] == [1]
    assert all(math.isfinite(r["grad_norm"]) for r in rows if r["event"] == "progress")


def inject(path, transform):
    """Rewrite a safetensors file's tensors with `transform`, as a faulty writer would have written them."""
    tensors = load_file(path)
    save_file({k: transform(k, v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def test_merge_refuses_a_checkpoint_that_holds_nan(workspace):
    """A checkpoint written with NaN in it (recorded as such, so its hashes match): merge says so."""
    ws = workspace("exported")
    assert cli("train", ws, "--data", DATA, "--backend", "torch", "--max-steps", "1", "--batch-size", "4",
               "--seq-len", "128", "--val-fraction", "0").code == 0
    [ckpt] = (ws / "train" / "checkpoints").glob("step-*")
    inject(ckpt / "adapter.safetensors", lambda name, t: t * float("nan"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"]["adapter.safetensors"] = sha256_file(ckpt / "adapter.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    refused(cli("merge", ws, "--checkpoint", "last"), "holds NaN or infinite values", "the run diverged",
            "Merge an earlier checkpoint")
    assert not (ws / "merged").exists() and not (ws / "adapter").exists()


def test_package_refuses_a_merged_model_that_holds_nan(workspace):
    """The merged weights turned NaN (recorded as merge's, so its hashes match): an fp32 bundle of NaN weights
    would agree with transformers token for token (every argmax is 0); package refuses it."""
    ws = workspace("packaged")
    inject(ws / "merged" / "model.safetensors", lambda name, t: t * float("nan") if t.dim() == 2 else t)
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["stages"]["merge"]["outputs"]["merged"]["merged/model.safetensors"] = sha256_file(
        ws / "merged" / "model.safetensors")
    (ws / "manifest.json").write_text(json.dumps(manifest))
    bundle = sorted(p.name for p in (ws / "bundle").rglob("*"))
    refused(cli("package", ws, "--force", "--precision", "fp32"), "package verification failed",
            "logits are not finite", "nothing was written")
    assert sorted(p.name for p in (ws / "bundle").rglob("*")) == bundle  # the previous bundle is untouched


def test_export_refuses_a_model_whose_weights_are_not_finite(model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    inject(folder / "model.safetensors", lambda name, t: t.index_fill(0, torch.tensor([0]), float("nan"))
           if "layers.0.mlp.down_proj" in name else t)
    ws = tmp_path / "ws"
    assert cli("prepare", folder, "--out", ws, "--lora-r", "4").code == 0
    refused(cli("export", ws), "PyTorch's loss on the probe batch is nan (not finite)", "nothing was written")
    assert not (ws / "artifacts").exists()
    assert "export" not in stages(ws)
