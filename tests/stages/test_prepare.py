import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from edgeft.core.errors import EdgeftError
from edgeft.stages.prepare import PrepareConfig, prepare
from tests.helpers import stages


def lora_params(r, layer_shapes, layers):
    """LoRA adds r * (in + out) per adapted Linear."""
    return layers * sum(r * (i + o) for i, o in layer_shapes)


# tiny phi3: hidden 64, 4 heads of 16, ffn 96 -> qkv 64->192, o 64->64, gate_up 64->192, down 96->64
PHI3_SHAPES = [(64, 192), (64, 64), (64, 192), (96, 64)]


@pytest.mark.parametrize("r", [4, 16])
def test_trainable_count_worked_out_by_hand(tiny_model, tmp_path, r):
    ws = prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=r), tmp_path / "ws")
    stage = stages(ws)["prepare"]
    assert stage["params"]["trainable"] == lora_params(r, PHI3_SHAPES, 2)
    assert stage["family"] == "phi3"
    assert stage["targets"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert set(stage["inputs"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                    "chat_template.jinja",
                                    "generation_config.json"}
    assert all(len(h) == 64 for h in stage["inputs"].values())
    assert stage["versions"]["peft"] and stage["versions"]["transformers"].startswith("5.")
    adapter = load_file(ws / "adapter_init" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 4 * 2
    assert json.loads((ws / "adapter_init" / "adapter_config.json").read_text())["r"] == r


def test_targets_and_dora_counts(tiny_model, tmp_path):
    ws = prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8, targets=["o_proj"], dora=True),
                 tmp_path / "ws")
    params = stages(ws)["prepare"]["params"]
    # LoRA 8 * (64 + 64) plus one magnitude per output feature (64), per layer
    assert params["trainable"] == 2 * (8 * 128 + 64)


def test_qwen_llama_use_split_projections(tiny_model, tmp_path):
    ws = prepare(PrepareConfig(model_dir=str(tiny_model("qwen2.5")), lora_r=2), tmp_path / "ws")
    stage = stages(ws)["prepare"]
    # hidden 64, 2 kv heads of 16: q 64->64, k,v 64->32, o 64->64, gate,up 64->96, down 96->64
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    assert stage["params"]["trainable"] == lora_params(2, shapes, 2)


def test_rerun_unchanged_does_nothing_and_changed_reruns(tiny_model, tmp_path, capsys):
    cfg = PrepareConfig(model_dir=str(tiny_model("llama3.2")), lora_r=4)
    prepare(cfg, tmp_path / "ws")
    first = stages(tmp_path / "ws")["prepare"]["finished_at"]
    prepare(cfg, tmp_path / "ws")
    assert "nothing to do" in capsys.readouterr().out
    prepare(PrepareConfig(model_dir=cfg.model_dir, lora_r=8), tmp_path / "ws")
    assert "options changed" in capsys.readouterr().out
    stage = stages(tmp_path / "ws")["prepare"]
    assert stage["config"]["lora_r"] == 8 and stage["finished_at"] >= first


def test_target_not_found_lists_linears(tiny_model, tmp_path):
    with pytest.raises(EdgeftError, match=r"target modules \['q_proj'\] not found.*Linear layers there: "
                                          r"down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"):
        prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), targets=["q_proj"]), tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(EdgeftError, match=r"unsupported architecture GPT2LMHeadModel.*supported: Phi3ForCausalLM"):
        prepare(PrepareConfig(model_dir=str(tmp_path / "gpt2")), tmp_path / "ws")


def edgeft(*argv):
    return subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)


def _truncate(path, cut: int) -> None:
    """A download cut short: the last `cut` bytes are missing."""
    os.truncate(path, path.stat().st_size - cut)


def _edit_config(model, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("setup, argv, message", [
    (lambda d: None, ["{missing}"], "does not exist"),
    (lambda d: (d / "config.json").unlink(), ["{model}"], "config.json is missing"),
    (lambda d: (d / "model.safetensors").unlink(), ["{model}"], "has no weights: model.safetensors"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), ["{model}"], "PyTorch .bin weights only"),
    (lambda d: _truncate(d / "model.safetensors", 100), ["{model}"], "model.safetensors is truncated or corrupt"),
    (lambda d: os.truncate(d / "model.safetensors", 20), ["{model}"],
     "model.safetensors is not a readable safetensors file"),
    (lambda d: _edit_config(d, hidden_size=128), ["{model}"],
     "config.json does not describe the weights in its safetensors files: model.embed_tokens.weight [320, 64] "
     "(config.json gives [320, 128])"),
    (lambda d: (d / "tokenizer.json").unlink(), ["{model}"], "cannot load the tokenizer of"),
    (lambda d: _edit_config(d, vocab_size=100), ["{model}"],
     "has 320 tokens but the model's embedding only 100 rows (config.json vocab_size)"),
    (lambda d: None, ["{model}", "--lora-r", "0"], "lora_r: 0 must be greater than 0"),
    (lambda d: None, ["{model}", "--lora-alpha", "-1"], "lora_alpha: -1.0 must be greater than 0"),
    (lambda d: None, ["{model}", "--train-modules", "head"], "try lm_head or embed_tokens"),
    (lambda d: None, ["{model}", "--trainable-tokens", "5000"], "outside the vocabulary (size 320)"),
])
def test_bad_input_exits_2_with_a_message(tiny_model, tmp_path, setup, argv, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model("phi3-mini-4k"), model)
    setup(model)
    argv = [a.format(model=model, missing=tmp_path / "nope") for a in argv]
    proc = edgeft("prepare", *argv, "--out", str(tmp_path / "ws"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws" / "manifest.json").exists()


def test_out_dir_with_other_content_is_refused(tiny_model, tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "notes.txt").write_text("mine")
    proc = edgeft("prepare", str(tiny_model("phi3-mini-4k")), "--out", str(tmp_path / "ws"))
    assert proc.returncode == 2 and "exists and holds other files" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "ws").iterdir()) == ["notes.txt"]
