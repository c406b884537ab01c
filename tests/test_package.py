"""package: GenAI bundles built through the builder's CLI, verified against transformers, described by a manifest."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from edgeft import devices
from edgeft.errors import EdgeftError
from edgeft.export import export
from edgeft.merge import merge
from edgeft.package import PackageConfig, package
from edgeft.prepare import PrepareConfig, prepare
from edgeft.tasks.home import DATA_DIR
from edgeft.train import TrainConfig, train


@pytest.fixture(scope="module")
def merged_ws(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("pkg") / "ws"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8), ws)
    export(ws)
    train(ws, DATA_DIR / "train.jsonl", TrainConfig(max_steps=4, batch_size=4, seq_len=256, lr=1e-2))
    merge(ws)
    return ws


def copy(ws, tmp_path):
    dst = tmp_path / "ws"
    shutil.copytree(ws, dst, ignore=shutil.ignore_patterns("bundle", ".builder-cache"))
    return dst


def test_fp32_bundle_matches_transformers_token_for_token(merged_ws, tmp_path):
    ws = copy(merged_ws, tmp_path)
    out = package(ws, PackageConfig(precision="fp32"))
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["token_agreement"] == 1.0 and v["max_logit_error"] < 1e-3


def test_int4_bundle_with_profile_settings_and_manifest(merged_ws, tmp_path):
    ws = copy(merged_ws, tmp_path)
    out = package(ws, device=devices.load("raspberry-pi-5-8gb"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["device"] == "raspberry-pi-5-8gb"
    assert manifest["quantization"] == {"precision": "int4", "block_size": 32, "accuracy_level": 4, "symmetric": True}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "README.md"} <= set(manifest["files"])
    assert set(manifest["source"]["adapter_sha256"]) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                                         "adapter/README.md"}
    v = manifest["verification"]
    assert 0 <= v["token_agreement"] <= 1 and v["max_logit_error"] >= 0
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == "phi3"
    proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(out), "--prompt", "lock the front door",
                           "--max-new-tokens", "5"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_bad_input(merged_ws, tiny_model, tmp_path):
    ws = copy(merged_ws, tmp_path)
    package(ws, PackageConfig(precision="fp32"))
    with pytest.raises(EdgeftError, match="exists; pass --force"):
        package(ws, PackageConfig(precision="fp32"))
    with pytest.raises(EdgeftError, match="--ep cuda is not an inference provider of raspberry-pi-5-8gb"):
        package(ws, PackageConfig(ep="cuda", force=True), devices.load("raspberry-pi-5-8gb"))
    (ws / "merged" / "config.json").write_text((ws / "merged" / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(EdgeftError, match="no longer matches what merge wrote"):
        package(ws, PackageConfig(force=True))
    fresh = tmp_path / "fresh"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k"))), fresh)
    with pytest.raises(EdgeftError, match="merge it first"):
        package(fresh)
    proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not an ONNX Runtime GenAI bundle" in proc.stderr
