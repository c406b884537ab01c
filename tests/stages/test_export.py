import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeft.graph.trace import CausalLMLoss, probe_batch
from edgeft.models.lazy import load_base
from edgeft.runtime import jobs, launcher
from edgeft.stages.export import ExportConfig, export
from edgeft.stages.prepare import PrepareConfig, prepare
from tests.helpers import stages
from tests.tiny_models import CONFIGS

TOLERANCE = 1e-4  # relative, on the mean cross-entropy


def randomize_adapter(ws, seed=1):
    """LoRA B starts at zero, which would hide a broken adapter path; give every adapter tensor values."""
    path = ws / "adapter_init" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_file(path).items()}
    save_file(tensors, path)


def full_logits_loss(model, batch):
    """Mean next-token cross-entropy from the model's own logits over every position, unlabelled ones
    ignored: the textbook formula, independent of CausalLMLoss."""
    ids, mask, labels = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100), logits


def peft_loss(ws, model_dir, batch):
    """The reference: transformers + PEFT as a user runs them, long-rope switching left on."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(model_dir), ws / "adapter_init").eval()
    with torch.no_grad():
        return float(full_logits_loss(model, batch)[0])


def prompt_masked(batch, prompt=9):
    """The probe batch with the first `prompt` labels of each row ignored, as chat data masks the prompt."""
    batch = {k: v.copy() for k, v in batch.items()}
    batch["labels"][:, :prompt] = -100
    return batch


@pytest.mark.parametrize("family", list(CONFIGS))
def test_loss_runs_the_head_on_labelled_positions_only(tiny_model, tmp_path, family):
    """CausalLMLoss's loss and gradients equal the full-logits formula; its logits equal the model's; and
    with logits=False no head output is ever as wide as the batch."""
    from peft import PeftModel

    ws, model_dir = prepared(tiny_model, tmp_path, family)
    model = PeftModel.from_pretrained(load_base(model_dir), ws / "adapter_init", is_trainable=True).eval()
    batch = prompt_masked(probe_batch(model.config.vocab_size))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    trainable = [p for p in model.parameters() if p.requires_grad]

    reference, reference_logits = full_logits_loss(model, batch)
    expected = torch.autograd.grad(reference, trainable)
    widths = []
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: widths.append(o.shape[:-1].numel()))
    try:
        loss, = CausalLMLoss(model, logits=False)(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels")))
    finally:
        hook.remove()
    grads = torch.autograd.grad(loss, trainable)
    assert widths == [labelled] and labelled < batch["input_ids"].size / 2
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        both = CausalLMLoss(model)(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels")))
    torch.testing.assert_close(both[0], reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both[1], reference_logits.detach(), rtol=0, atol=0)


def ort_loss(ws, batch, tmp_path):
    np.savez(tmp_path / "batch.npz", **batch)
    return launcher.run(jobs.Verify(artifacts=str(ws / "artifacts"), batch=str(tmp_path / "batch.npz")))


def prepared(tiny_model, tmp_path, family, **options):
    model_dir = tiny_model(family)
    ws = prepare(PrepareConfig(model_dir=str(model_dir), lora_r=4, **options), tmp_path / "ws")
    randomize_adapter(ws)
    return ws, model_dir


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_matches_peft_for_every_family(tiny_model, tmp_path, family):
    ws, model_dir = prepared(tiny_model, tmp_path, family)
    out = export(ws)
    assert sorted(p.name for p in out.iterdir()) == ["base.data", "checkpoint", "edgeft_inputs.json", "eval_model.onnx",
                                                    "optimizer_model.onnx", "training_model.onnx"]
    rec = stages(ws)["export"]
    assert rec["verification"]["relative_difference"] <= TOLERANCE
    assert rec["verification"]["gradient_relative_error"] <= 1e-3
    assert rec["memory_mb"]["generate_artifacts_peak_rss"] > 0 and rec["timing_s"]["total"] > 0

    # another batch size and length than the one traced: the axes are dynamic
    batch = probe_batch(320, seq_len=11, pad_id=3, seed=7)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # 3 rows
    result = ort_loss(ws, batch, tmp_path)
    reference = peft_loss(ws, model_dir, batch)
    assert result["eval_loss"] == pytest.approx(reference, rel=TOLERANCE)
    assert result["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in result["trainable"])
    assert result["trainable_count"] == rec["trainable_params"]
    # the checkpoint holds only what trains; the frozen base lives once, in base.data
    assert result["checkpoint_tensors"] == len(result["trainable"])
    assert (out / "checkpoint").stat().st_size < 4 * rec["trainable_params"] + 65536
    assert rec["base_weights"]["tensors"] == rec["frozen_tensors"]
    assert rec["base_weights"]["bytes"] >= 4 * (rec["frozen_tensors"] and 1)
    import onnx

    graph = onnx.load(str(out / "training_model.onnx"), load_external_data=False).graph
    assert rec["base_weights"]["transposed"] >= 2 * 4  # 4+ adapted Linears per layer, 2 layers
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0].endswith("base_layer.weight")]


@pytest.mark.parametrize("family, options, marker", [
    ("phi3-mini-4k", {"train_modules": ["lm_head"]}, "lm_head.modules_to_save"),
    ("phi4-mini", {"train_modules": ["embed_tokens"]}, "embed_tokens.modules_to_save"),
    ("qwen2.5", {"trainable_token_indices": [5, 6]}, "token_adapter.trainable_tokens_delta"),
])
def test_modules_to_save_and_trainable_tokens_are_trainable(tiny_model, tmp_path, family, options, marker):
    ws, model_dir = prepared(tiny_model, tmp_path, family, **options)
    export(ws)
    batch = probe_batch(320, seq_len=9, pad_id=3, seed=3)
    result = ort_loss(ws, batch, tmp_path)
    assert result["eval_loss"] == pytest.approx(peft_loss(ws, model_dir, batch), rel=TOLERANCE)
    assert any(marker in n for n in result["trainable"])
    prep = stages(ws)["prepare"]
    assert result["trainable_count"] == prep["params"]["trainable"]


def test_long_rope_export_records_its_valid_length(tiny_model, tmp_path):
    ws, _ = prepared(tiny_model, tmp_path, "phi3-mini-128k")
    export(ws)
    rec = stages(ws)["export"]
    assert rec["max_seq_len"] == 4096


def test_options_rerun_and_errors(tiny_model, tmp_path, capsys):
    ws, _ = prepared(tiny_model, tmp_path, "llama3.2")
    export(ws, ExportConfig(nominal_checkpoint=True, ort_format=True))
    names = {p.name for p in (ws / "artifacts").iterdir()}
    assert {"nominal_checkpoint", "training_model.ort", "eval_model.ort", "optimizer_model.ort"} <= names
    capsys.readouterr()
    export(ws, ExportConfig(nominal_checkpoint=True, ort_format=True))
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["phi3-mini-4k", "llama3.2"])
def test_dora_exports_with_peft_gradients(tiny_model, tmp_path, family):
    ws, model_dir = prepared(tiny_model, tmp_path, family, dora=True)
    export(ws)
    rec = stages(ws)["export"]
    assert rec["detached_inputs"] > 0
    assert rec["verification"]["gradient_relative_error"] <= 1e-3
    batch = probe_batch(320, seq_len=10, pad_id=3, seed=4)
    result = ort_loss(ws, batch, tmp_path)
    assert result["eval_loss"] == pytest.approx(peft_loss(ws, model_dir, batch), rel=TOLERANCE)
    assert any("lora_magnitude_vector" in n for n in result["trainable"])


def test_verification_failure_writes_nothing(tiny_model, tmp_path, monkeypatch):
    from edgeft.graph import trace
    from edgeft.stages.export import VerificationError

    ws, _ = prepared(tiny_model, tmp_path, "phi3-mini-4k")
    real = trace.torch_loss_and_grads

    def wrong_grads(wrapper, batch):
        loss, grads = real(wrapper, batch)
        return loss, {k: 2 * v for k, v in grads.items()}

    monkeypatch.setattr(trace, "torch_loss_and_grads", wrong_grads)
    with pytest.raises(VerificationError, match="gradients differ from PyTorch's"):
        export(ws)
    assert not (ws / "artifacts").exists()
    assert "export" not in stages(ws)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_export_of_unprepared_workspace_exits_2(tmp_path, make):
    ws = tmp_path / "ws"
    if make == "empty":
        ws.mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgeft", "export", str(ws)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "run `edgeft prepare MODEL_DIR --out" in proc.stderr and "Traceback" not in proc.stderr


def test_artifacts_train_only_the_adapter(tiny_model, tmp_path):
    import hashlib

    ws, _ = prepared(tiny_model, tmp_path, "phi3-mini-4k")
    out = export(ws)
    base_hash = hashlib.sha256((out / "base.data").read_bytes()).hexdigest()
    batch = probe_batch(320, seq_len=16, pad_id=3, seed=5)
    np.savez(tmp_path / "b.npz", **batch)
    result = launcher.run(jobs.Steps(artifacts=str(out), batch=str(tmp_path / "b.npz"), steps=5, lr=1e-2))
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    assert hashlib.sha256((out / "base.data").read_bytes()).hexdigest() == base_hash


def test_training_graph_runs_the_head_on_labelled_rows(tiny_model, tmp_path):
    """The training graph has no logits output and its LM head reads only the gathered labelled rows; the
    eval graph keeps the logits. On a prompt-masked batch ONNX Runtime's loss is the full-logits one."""
    import onnx

    ws, model_dir = prepared(tiny_model, tmp_path, "phi3-mini-4k", lora_dropout=0.0)
    out = export(ws)
    training = onnx.load(str(out / "training_model.onnx"), load_external_data=False).graph
    evaluation = onnx.load(str(out / "eval_model.onnx"), load_external_data=False).graph
    assert "logits" not in [o.name for o in training.output]
    assert [o.name for o in evaluation.output][:2] == ["loss", "logits"]
    producer = {o: n for n in training.node for o in n.output}
    heads = [n for n in training.node if n.op_type == "MatMul" and "lm_head" in n.name]
    assert len(heads) == 1, [n.name for n in heads]
    assert producer[heads[0].input[0]].op_type == "GatherND"  # its gradient is fast; Gather's is not

    batch = prompt_masked(probe_batch(320, seq_len=16, pad_id=3, seed=5))
    result = ort_loss(ws, batch, tmp_path)
    reference = peft_loss(ws, model_dir, batch)
    for loss in (result["eval_loss"], result["train_loss"]):
        assert abs(loss - reference) <= TOLERANCE * abs(reference), (loss, reference)
