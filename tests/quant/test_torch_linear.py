"""The torch backend's quantized base computes what the fake-quantized fp32 model computes, without holding
fp32 copies of the frozen Linear weights."""

import pytest
import torch

from edgeft.graph import trace
from edgeft.models.lazy import load_base
from edgeft.quant import quantize, torch_linear
from edgeft.stages.prepare import PrepareConfig, prepare


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_linear_forward_and_backward_match_the_fake_quantized_weight(precision):
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 48, bias=False)  # 80 = 2.5 blocks of 32: a padded last block
    quant = {"precision": precision, "block_size": 32, "symmetric": precision == "int8"}
    layer = torch_linear.QuantizedLinear(linear.weight, None, quant)
    quantize.fake_quantize_(linear, quant)
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = torch.randn(3, 5, 80, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    torch.testing.assert_close(layer(x), linear(y), rtol=0, atol=1e-6)
    layer(x).square().sum().backward()
    linear(y).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)
    assert layer.codes.dtype == (torch.int8 if precision == "int8" else torch.uint8)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_torch_backend_base_equals_the_fake_quantized_model(tiny_model, tmp_path, precision):
    from peft import PeftModel

    model_dir = tiny_model("phi3-mini-4k")
    ws = prepare(PrepareConfig(model_dir=str(model_dir), lora_r=4, base_precision=precision), tmp_path / "ws")
    quant = quantize.settings(precision, 32)
    reference = PeftModel.from_pretrained(load_base(model_dir), ws / "adapter_init", is_trainable=True)
    quantize.fake_quantize_(reference, quant)
    ours = torch_linear.load(model_dir, ws / "adapter_init", quant)
    batch = trace.probe_batch(reference.config.vocab_size, 16, 0)
    loss, grads = trace.torch_loss_and_grads(trace.CausalLMLoss(reference), batch)
    our_loss, our_grads = trace.torch_loss_and_grads(trace.CausalLMLoss(ours), batch)
    assert our_loss == pytest.approx(loss, rel=1e-6)
    assert trace.gradient_error(grads, our_grads) < 1e-5
    fp32_linears = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    if precision == "int4":
        assert fp32_linears == []  # 2 layers x 4 Linears and the LM head, all held as int4 blocks
        assert sum(isinstance(m, torch_linear.QuantizedLinear) for m in ours.modules()) == 2 * 4 + 1
    else:
        assert len(fp32_linears) == 2 * 4 + 1
