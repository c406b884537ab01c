"""An int8 frozen base under ONNX Runtime training: stored quantized, dequantized per consumer, equal to PyTorch's."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgeft import quantize
from edgeft.errors import EdgeftError
from edgeft.export import export
from edgeft.merge import merge
from edgeft.prepare import PrepareConfig, prepare
from edgeft.tasks.home import DATA_DIR
from edgeft.train import TrainConfig, train


@pytest.fixture(scope="module")
def exported_int8(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    ws = prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8, base_precision="int8"), root / "q8")
    export(ws)
    fp = prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8), root / "fp32")
    export(fp)
    return ws, fp


def test_int8_round_trip_error_is_bounded():
    w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    q, scale = quantize.int8_per_channel(w)
    assert q.dtype == np.int8 and scale.shape == (64,)
    assert np.abs(q.astype(np.float32) * scale - w).max() <= scale.max() / 2 + 1e-7


def test_export_stores_int8_behind_dequantize_linear(exported_int8):
    ws, fp = exported_int8
    rec = json.loads((ws / "manifest.json").read_text())["stages"]["export"]
    assert rec["base_weights"]["precision"] == "int8" and rec["base_weights"]["quantized"] == 9  # 4 per layer + lm_head
    graph = onnx.load(str(ws / "artifacts" / "training_model.onnx"), load_external_data=False).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) >= 9  # ORT may add per-consumer copies; never folded back to fp32 initializers
    assert not [i for i in graph.initializer if i.name.endswith(".T") and i.data_type == onnx.TensorProto.FLOAT]
    base_int8 = (ws / "artifacts" / "base.data").stat().st_size
    base_fp32 = (fp / "artifacts" / "base.data").stat().st_size
    assert base_int8 < 0.6 * base_fp32  # only the embedding and norms stay fp32 in this tiny model
    # Exact against PyTorch on the same quantized base, and a real quantization (the loss moved).
    v8 = rec["verification"]
    v32 = json.loads((fp / "manifest.json").read_text())["stages"]["export"]["verification"]
    assert v8["relative_difference"] < 1e-6 and v8["gradient_relative_error"] < 1e-5
    assert v8["torch_loss"] != v32["torch_loss"] and abs(v8["torch_loss"] / v32["torch_loss"] - 1) < 0.01


def test_ort_and_torch_train_the_same_int8_base_and_merge_checks_it(exported_int8, tmp_path):
    import shutil

    ws, _ = exported_int8
    losses = {}
    for backend in ("ort", "torch"):
        copy = tmp_path / backend
        shutil.copytree(ws, copy)
        train(copy, DATA_DIR / "train.jsonl", TrainConfig(max_steps=8, batch_size=4, seq_len=256, lr=1e-2,
                                                           backend=backend, val_fraction=0.05, eval_every=100))
        rows = [json.loads(x) for x in (copy / "train" / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in rows if r["event"] == "progress"]
    assert losses["ort"][0] == pytest.approx(losses["torch"][0], rel=1e-5)
    assert np.allclose(losses["ort"], losses["torch"], rtol=1e-2)
    merge(tmp_path / "ort")  # PEFT on the same int8 base reproduces the ORT eval logits within 1e-4
    v = json.loads((tmp_path / "ort" / "manifest.json").read_text())["stages"]["merge"]["verification"]
    assert v["peft_vs_ort_eval_max_abs"] < 1e-4


def test_int4_base_is_refused_with_the_reason(tiny_model, tmp_path):
    with pytest.raises(EdgeftError, match="int4 base for ONNX Runtime training is not available yet"):
        prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), base_precision="int4"), tmp_path / "ws")
    proc = subprocess.run([sys.executable, "-m", "edgeft", "prepare", str(tiny_model("phi3-mini-4k")), "--out",
                           str(tmp_path / "ws2"), "--base-precision", "int4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "use int8 or fp32" in proc.stderr and "Traceback" not in proc.stderr
