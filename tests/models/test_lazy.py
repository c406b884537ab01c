"""A base model read from its safetensors files one tensor (or one layer) at a time must compute exactly what
transformers' from_pretrained model computes: same adapter initialisation, same loss and gradients, same
exported artifacts."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edgeft.core.errors import EdgeftError
from edgeft.graph import trace
from edgeft.models import lazy, shapes
from edgeft.models.lazy import load_base
from edgeft.quant import quantize
from edgeft.stages.prepare import PrepareConfig, lora_config, prepare
from tests.helpers import stages


@pytest.mark.parametrize("family,options", [
    ("phi3-mini-4k", {}),
    ("phi3-mini-4k", {"dora": True}),
    ("qwen2.5", {"train_modules": ["lm_head"]}),  # tied embeddings
    ("llama3.2", {"trainable_token_indices": [5, 7]}),
])
def test_prepare_initialises_the_adapter_peft_does_on_the_loaded_model(tiny_model, tmp_path, family, options):
    from peft import get_peft_model

    from edgeft.models import families

    model_dir = tiny_model(family)
    cfg = PrepareConfig(model_dir=str(model_dir), lora_r=4, **options)
    ws = prepare(cfg, tmp_path / "ws")
    torch.manual_seed(cfg.seed)
    reference = get_peft_model(load_base(model_dir), lora_config(cfg, families.detect(
        families.read_config(model_dir), model_dir)))
    reference.save_pretrained(tmp_path / "reference")
    ours = load_file(ws / "adapter_init" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    if options.get("dora"):
        assert any("magnitude" in n and np.abs(theirs[n]).min() > 0 for n in theirs)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_streamed_reference_equals_the_loaded_model(tiny_model, tmp_path, precision):
    """Loss and LoRA gradients with one decoder layer loaded at a time (recomputed in the backward pass) equal
    those of the whole model loaded by transformers, fake-quantized the same way."""
    from peft import PeftModel

    model_dir = tiny_model("phi3-mini-4k")
    ws = prepare(PrepareConfig(model_dir=str(model_dir), lora_r=4), tmp_path / "ws")
    quant = {"precision": precision, "block_size": 16, "symmetric": True}
    loaded = PeftModel.from_pretrained(load_base(model_dir), ws / "adapter_init", is_trainable=True)
    quantize.fake_quantize_(loaded, quant)
    batch = trace.probe_batch(loaded.config.vocab_size, 16, 0)
    loss, grads = trace.torch_loss_and_grads(trace.CausalLMLoss(loaded), batch)

    empty, shards = lazy.empty_model(model_dir)
    streamed = PeftModel.from_pretrained(empty, ws / "adapter_init", is_trainable=True)
    passes = []
    with lazy.streamed(streamed, shards, quantize.fake_quantizer(quant), on_layer=lambda: passes.append(1)):
        streamed_loss, streamed_grads = trace.torch_loss_and_grads(trace.CausalLMLoss(streamed), batch)
    assert len(passes) == 2 * len(lazy.decoder_layers(streamed))  # forward, then recomputed: export's progress total
    assert streamed_loss == pytest.approx(loss, rel=1e-6)
    assert trace.gradient_error(grads, streamed_grads) < 1e-6
    frozen = [p for n, p in streamed.named_parameters() if not p.requires_grad]
    assert frozen and all(lazy.is_placeholder(p) for p in frozen)  # nothing stays loaded


def test_sharded_folder_and_missing_weights(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("phi3-mini-4k"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    empty, shards = lazy.empty_model(tmp_path / "sharded")
    assert len({shards.files[k] for k in shards.files}) > 1
    assert shapes.safetensors_params(tmp_path / "sharded") == sum(p.numel() for p in model.parameters())  # export's size
    layer = lazy.decoder_layers(empty)[1]
    assert lazy.load_(layer, shards) == len(list(layer.parameters()))
    torch.testing.assert_close(layer.mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight, rtol=0, atol=0)
    lazy.unload_(layer)
    assert all(lazy.is_placeholder(p) for p in layer.parameters())

    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("phi3-mini-4k"), broken)
    tensors = load_torch(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgeftError, match=r"missing from its safetensors files: model.layers.1.mlp.down_proj.weight"):
        lazy.empty_model(broken)


@pytest.mark.parametrize("family", ["phi3-mini-4k", "qwen2.5"])  # qwen2.5: the LM head is the embedding
def test_streamed_export_writes_the_artifacts_loading_writes(tiny_model, tmp_path, family):
    """export --weights stream (never holding the fp32 model) and --weights load write the same bytes."""
    from edgeft.stages.export import ExportConfig, export

    ws = prepare(PrepareConfig(model_dir=str(tiny_model(family)), lora_r=4, base_precision="int4"),
                 tmp_path / "stream")
    shutil.copytree(ws, tmp_path / "load")
    export(tmp_path / "stream", ExportConfig(weights="stream"))
    export(tmp_path / "load", ExportConfig(weights="load"))
    records = [stages(tmp_path / w)["export"] for w in ("stream", "load")]
    assert [r["weights"] for r in records] == ["stream", "load"]
    assert records[0]["verification"]["gradient_relative_error"] < 1e-5
    for name in ("base.data", "training_model.onnx", "eval_model.onnx", "checkpoint"):
        a, b = ((tmp_path / w / "artifacts" / name).read_bytes() for w in ("stream", "load"))
        assert a == b, name
