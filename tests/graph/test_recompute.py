"""Recomputed activations (export --recompute): the backward pass holds only each layer's input, and training
is unchanged: ORT with recomputation trains the same losses as PyTorch."""


import onnx
import pytest

from edgeft.graph import recompute
from edgeft.graph.trace import INPUT_NAMES
from edgeft.stages.export import export
from edgeft.stages.prepare import PrepareConfig, prepare
from tests.helpers import assert_backends_agree, stages


@pytest.fixture(scope="module")
def recomputed(built):
    return built("exported", lora_r=8, base_precision="int4", export_options={"recompute": True})


def _held(ws) -> set[str]:
    graph = onnx.load(str(ws / "artifacts" / "training_model.onnx"), load_external_data=False)
    return recompute.held_activations(graph, ("loss", "logits"), INPUT_NAMES)


def test_backward_holds_only_each_layers_input(recomputed, tmp_path):
    rec = stages(recomputed)["export"]
    assert rec["config"]["recompute"] and rec["recompute"]["layers"] == 2
    assert rec["verification"]["gradient_relative_error"] < 1e-5  # the export checks the gradients against PEFT's
    held = _held(recomputed)
    in_layers = {t for t in held if recompute.layer_of(t) is not None}
    # Only what crosses from a layer to another is held: each layer's output (the next one's input) and the rotary
    # tables the first layer computes for all. No activation used only inside its own layer (whatever the exporter
    # names it) is.
    graph = onnx.load(str(recomputed / "artifacts" / "training_model.onnx"), load_external_data=False).graph
    for t in in_layers:
        readers = [n for n in graph.node if t in n.input]
        assert any(recompute.layer_of(n.name) != recompute.layer_of(t) for n in readers), t
    assert 0 < len(in_layers) <= 2 + 2 * rec["recompute"]["layers"]
    plain = prepare(PrepareConfig(model_dir=stages(recomputed)[
        "prepare"]["config"]["model_dir"], lora_r=8, base_precision="int4"), tmp_path / "plain")
    export(plain)
    assert len(_held(plain)) > 4 * len(held)


def test_recomputed_training_matches_pytorch(recomputed, tmp_path):
    assert_backends_agree(recomputed, tmp_path, steps=6)


def test_plan_counts_one_layer_of_activations_and_every_layers_input(tiny_model):
    import dataclasses

    from edgeft.devices import plan

    model = tiny_model("phi3-mini-4k")
    shape = plan.for_model(model, None, seq_len=256).shape
    deeper = dataclasses.replace(shape, layers=shape.layers + 30)
    grows = {lean: plan.activation_bytes(deeper, 256, 1, "ort", lean) - plan.activation_bytes(shape, 256, 1, "ort", lean)
             for lean in (False, True)}
    assert grows[True] == pytest.approx(30 * 256 * 4 * shape.hidden)  # each extra layer keeps its input only
    assert grows[False] > 10 * grows[True]
    assert plan.for_model(model, None, seq_len=256, recompute=True).run.recompute
