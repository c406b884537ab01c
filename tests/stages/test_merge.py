"""merge: the PEFT adapter and the merged model reproduce the training runtime's eval logits."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edgeft.core.errors import EdgeftError
from edgeft.graph.trace import INPUT_NAMES, CausalLMLoss, probe_batch
from edgeft.models.lazy import load_base
from edgeft.runtime import jobs, launcher
from edgeft.stages.export import export
from edgeft.stages.merge import MergeConfig, merge
from edgeft.stages.prepare import PrepareConfig, prepare
from edgeft.stages.train import TrainConfig, train
from edgeft.tasks.home import DATA_DIR
from tests.helpers import stages

DATA = DATA_DIR / "train.jsonl"
TOL = 1e-4  # absolute, on logits


def trained_ws(tiny_model, root, family="phi3-mini-4k", backend="ort", **options):
    ws = root / f"ws-{family}-{backend}"
    prepare(PrepareConfig(model_dir=str(tiny_model(family)), lora_r=8, **options), ws)
    if backend == "ort":
        export(ws)
    train(ws, DATA, TrainConfig(max_steps=6, batch_size=4, seq_len=256, lr=1e-2, eval_every=3, backend=backend))
    return ws


def logits_of(model, batch):
    with torch.no_grad():
        return CausalLMLoss(model).eval()(*(torch.from_numpy(batch[k]) for k in INPUT_NAMES))[1].numpy()


def ort_eval_logits(ws, ckpt, batch, tmp_path):
    np.savez(tmp_path / "b.npz", **batch)
    launcher.run(jobs.Verify(artifacts=str(ws / "artifacts"), checkpoint=str(ckpt / "ort_checkpoint"),
                             batch=str(tmp_path / "b.npz"), logits_out=str(tmp_path / "l.npy")))
    return np.load(tmp_path / "l.npy")


@pytest.mark.parametrize("options", [{}, {"train_modules": ["lm_head"]},
                                     pytest.param({"dora": True}, marks=pytest.mark.slow)],  # dora: streamed below
                         ids=["lora", "lora+lm_head", "dora"])
def test_adapter_and_merged_model_reproduce_ort_eval_logits(tiny_model, tmp_path, options):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ws = trained_ws(tiny_model, tmp_path, **options)
    merge(ws)
    rec = stages(ws)["merge"]
    ckpt = ws / "train" / "checkpoints" / rec["checkpoint"]
    batch = probe_batch(320, seq_len=13, pad_id=3, seed=21)
    reference = ort_eval_logits(ws, ckpt, batch, tmp_path)
    model_dir = tiny_model("phi3-mini-4k")
    adapter = PeftModel.from_pretrained(load_base(model_dir), ws / "adapter")
    assert np.abs(logits_of(adapter, batch) - reference).max() < TOL
    merged = AutoModelForCausalLM.from_pretrained(ws / "merged", attn_implementation="eager")
    assert np.abs(logits_of(merged, batch) - reference).max() < TOL
    # it really trained: the adapter moved away from its initialisation
    init = load_file(ws / "adapter_init" / "adapter_model.safetensors")
    done = load_file(ws / "adapter" / "adapter_model.safetensors")
    assert init.keys() == done.keys()
    assert max(float(np.abs(init[k] - done[k]).max()) for k in init) > 1e-3
    if options.get("train_modules"):
        assert any("lm_head" in k for k in done)
    assert {p.name for p in (ws / "merged").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    if not options:  # the adapter names its base portably and carries a card, not PEFT's template
        config = json.loads((ws / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == model_dir.name
        card = (ws / "adapter" / "README.md").read_text()
        assert f"base_model: {model_dir.name}\n" in card and str(model_dir) not in card
        assert hashlib.sha256(DATA.read_bytes()).hexdigest() in card and "Model Card for Model ID" not in card
        assert f"step {stages(ws)['merge']['step']}" in card and "PeftModel.from_pretrained" in card


def test_the_base_is_named_by_its_hub_id_where_its_folder_says_it(tmp_path):
    from edgeft.stages.card import portable_base_name

    cached = tmp_path / "hub" / "models--microsoft--Phi-3-mini-4k-instruct" / "snapshots" / "0a67737c"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert portable_base_name(cached) == "microsoft/Phi-3-mini-4k-instruct"
    saved = tmp_path / "phi4"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "microsoft/Phi-4-mini-instruct"}))
    assert portable_base_name(saved) == "microsoft/Phi-4-mini-instruct"
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/phi4"}))
    assert portable_base_name(saved) == "phi4"


def test_torch_backend_merges_too(tiny_model, tmp_path):
    from peft import PeftModel

    ws = trained_ws(tiny_model, tmp_path, backend="torch")
    merge(ws, MergeConfig(checkpoint="last"))
    rec = stages(ws)["merge"]
    assert rec["backend"] == "torch" and rec["step"] == 6
    trained = load_file(ws / "train" / "checkpoints" / "step-000006" / "adapter.safetensors")
    adapter = PeftModel.from_pretrained(load_base(tiny_model("phi3-mini-4k")), ws / "adapter")
    params = dict(CausalLMLoss(adapter).named_parameters())
    for name, value in trained.items():
        np.testing.assert_array_equal(params[name].detach().numpy(), value)


def test_bad_input(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8), ws)
    with pytest.raises(EdgeftError, match="train it first"):
        merge(ws)
    export(ws)
    train(ws, DATA, TrainConfig(max_steps=4, batch_size=4, seq_len=256, save_every=2, val_fraction=0.0))
    with pytest.raises(EdgeftError, match="no best checkpoint.*--checkpoint last"):
        merge(ws)
    with pytest.raises(EdgeftError, match=r"not one of: best, last, or a kept step \(2, 4\)"):
        merge(ws, MergeConfig(checkpoint="7"))
    with pytest.raises(EdgeftError, match=r"PEFT logits differ from the training runtime's by \S+, \S+ of the largest "
                                          r"logit .*tolerance 1e-12\); nothing was written"):
        merge(ws, MergeConfig(checkpoint="2", tolerance=1e-12))
    assert not (ws / "adapter").exists() and not (ws / "merged").exists()
    merge(ws, MergeConfig(checkpoint="2"))
    rec = stages(ws)["merge"]
    v = rec["verification"]
    assert rec["step"] == 2 and v["logit_scale"] > 0
    for check in ("peft_vs_ort_eval", "merged_vs_peft"):  # the tolerance is relative to the largest logit
        assert v[f"{check}_relative"] == pytest.approx(v[f"{check}_max_abs"] / v["logit_scale"])
        assert v[f"{check}_relative"] <= v["tolerance"]
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    state_file = other / "train" / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config_hash"] = "0" * 16
    state_file.write_text(json.dumps(state))
    with pytest.raises(EdgeftError, match="written by another training run"):
        merge(other, MergeConfig(checkpoint="last"))


def merged_tensors(folder):
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family,backend,options", [
    ("phi3-mini-4k", "ort", {"base_precision": "int4"}),
    ("phi3-mini-4k", "ort", {"dora": True}),
    pytest.param("qwen2.5", "ort", {"train_modules": ["lm_head"]}, marks=pytest.mark.slow),  # tied, head trained whole
    ("llama3.2", "torch", {"trainable_token_indices": [5, 7]}),
], ids=["int4-base", "dora", "qwen-tied-lm_head", "llama-trainable-tokens"])
def test_streamed_merge_writes_what_the_loaded_merge_writes(tiny_model, tmp_path, monkeypatch, family, backend,
                                                            options):
    """One decoder layer at a time (models/lazy.py), the merge writes the very tensors PEFT's merge_and_unload of the
    whole model writes, and its merged model passes the same logits check."""
    from edgeft.stages import merge as merge_module

    ws = trained_ws(tiny_model, tmp_path, family=family, backend=backend, **options)
    merge(ws, MergeConfig(weights="load"))
    shutil.copytree(ws / "merged", tmp_path / "loaded")
    shutil.copytree(ws / "adapter", tmp_path / "adapter-loaded")
    monkeypatch.setattr(merge_module, "SHARD_BYTES", 2**16)  # several shards and their index
    merge(ws, MergeConfig(weights="stream"))
    rec = stages(ws)["merge"]
    assert rec["verification"]["weights"] == "streamed" and rec["verification"]["merged_vs_peft_max_abs"] < TOL
    ours, theirs = merged_tensors(ws / "merged"), merged_tensors(tmp_path / "loaded")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert len(list((ws / "merged").glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((ws / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (ws / "adapter" / name).read_bytes() == (tmp_path / "adapter-loaded" / name).read_bytes()
    config, reference = (json.loads((d / "config.json").read_text()) for d in (ws / "merged", tmp_path / "loaded"))
    assert config == reference
