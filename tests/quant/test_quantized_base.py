"""A quantized frozen base (int8, int4) under ONNX Runtime training: stored quantized, dequantized at each use, equal to PyTorch's, and for int4 the very blocks the bundle ships."""

import json

import numpy as np
import onnx
import pytest

from edgeft.core.errors import EdgeftError
from edgeft.graph import frozen_base
from edgeft.quant import quantize
from edgeft.stages.merge import merge
from edgeft.stages.train import TrainConfig, train
from edgeft.tasks.home import DATA_DIR
from tests.helpers import assert_backends_agree, stages


@pytest.fixture(scope="module")
def exported_int8(built, exported):
    return built("exported", lora_r=8, base_precision="int8"), exported


def test_int8_round_trip_error_is_bounded():
    w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    q, scale = quantize.int8_per_channel(w)
    assert q.dtype == np.int8 and scale.shape == (64,)
    assert np.abs(q.astype(np.float32) * scale - w).max() <= scale.max() / 2 + 1e-7


def test_export_stores_int8_behind_dequantize_linear(exported_int8):
    ws, fp = exported_int8
    rec = stages(ws)["export"]
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
    v32 = stages(fp)["export"]["verification"]
    assert v8["relative_difference"] < 1e-6 and v8["gradient_relative_error"] < 1e-5
    assert v8["torch_loss"] != v32["torch_loss"] and abs(v8["torch_loss"] / v32["torch_loss"] - 1) < 0.01


def test_ort_and_torch_train_the_same_int8_base_and_merge_checks_it(exported_int8, tmp_path):
    ws, _ = exported_int8
    assert_backends_agree(ws, tmp_path, steps=8)
    merge(tmp_path / "ort")  # PEFT on the same int8 base reproduces the ORT eval logits within 1e-4
    v = stages(tmp_path / "ort")["merge"]["verification"]
    assert v["peft_vs_ort_eval_max_abs"] < 1e-4


def _matmul_model(w_in_out):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_in_out.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(w_in_out, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("k,symmetric", [(96, True), (96, False), (80, True)])  # 80: the last block is padded
def test_int4_blocks_are_the_builders_own(k, symmetric):
    """The blocks come from the quantizer the GenAI builder runs (MatMulNBitsQuantizer), byte for byte, and
    int4_dequantize is what MatMulNBits multiplies by."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(k)
    w = rng.standard_normal((k, 48)).astype(np.float32)
    packed, scales, zero = quantize.nbits_blocks(w, 32, symmetric)
    quantizer = MatMulNBitsQuantizer(_matmul_model(w), block_size=32, is_symmetric=symmetric, accuracy_level=1)
    quantizer.process()
    model = quantizer.model.model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert np.array_equal(inits[node.input[1]], packed) and np.array_equal(inits[node.input[2]], scales)
    if symmetric:
        assert len(node.input) < 4 or not node.input[3]
        assert (zero == 8).all()
    else:
        assert np.array_equal(quantize.unpack_nibbles(inits[node.input[3]])[:, :packed.shape[1]], zero)
    values = quantize.int4_dequantize(packed, scales, zero, k)
    assert values.shape == (48, k) and np.abs(values.T - w).max() <= np.abs(scales).max() * (8 if symmetric else 1)
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ values.T, atol=1e-4)


@pytest.fixture(scope="module")
def trained_int4(built):
    return built("exported", lora_r=8, base_precision="int4")


def test_int4_export_dequantizes_each_use_just_in_time(trained_int4):
    ws = trained_int4
    rec = stages(ws)["export"]
    assert rec["base_weights"]["precision"] == "int4" and rec["base_weights"]["quantized"] == 9
    v = rec["verification"]
    assert v["relative_difference"] < 1e-6 and v["gradient_relative_error"] < 1e-5
    info = json.loads((ws / "artifacts" / "edgeft_inputs.json").read_text())
    assert {s["precision"] for s in info["quantized_weights"].values()} == {"int4"}
    assert {info["base_inputs"][s["q"]]["dtype"] for s in info["quantized_weights"].values()} == {"uint8"}
    graph = onnx.load(str(ws / "artifacts" / "training_model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    counts = []
    for weight, spec in info["quantized_weights"].items():
        assert weight not in producers  # the export-time copy is gone
        uses = [n for n in graph.node if any(i.startswith(f"{weight}/use") and i.endswith("/nk") for i in n.input)]
        assert {n.op_type for n in uses} <= {"FusedMatMul", "Gemm"}  # read transposed: no Transpose copy
        counts.append(len(uses))
        for user in uses:  # each copy waits for its consumer's other input
            one = producers[next(i for i in user.input if i.startswith(weight)).replace("/nk", "/one")]
            size = producers[one.input[0]]
            assert size.op_type == "Size" and size.input[0] in user.input
        # the forward reads the blocks themselves
        readers = [n for n in graph.node if spec["q"] in n.input and n.op_type == "MatMulNBits"]
        assert len(readers) == 1 and list(readers[0].input[1:]) == [spec["q"], spec["scale"]]
    # A dequantized copy for each backward use, except the first projection's: no gradient flows below it.
    assert sorted(counts) == [0] + [1] * 8
    evaluation = onnx.load(str(ws / "artifacts" / "eval_model.onnx"), load_external_data=False).graph
    assert not [n for n in evaluation.node if n.name.startswith(frozen_base.DEQUANTIZE_PREFIX)]
    read = {n.input[1] for n in evaluation.node if n.op_type == "MatMulNBits"}  # the LM head twice: logits and loss
    assert read == {spec["q"] for spec in info["quantized_weights"].values()}


def test_int4_base_trains_like_torch_and_ships_byte_for_byte(trained_int4, tmp_path):
    """Train what you ship: ORT and PyTorch train the same int4 base; the int4 bundle's MatMulNBits blocks are
    the trained ones, and the bundle with the trained adapter reproduces the training runtime's logits."""
    import yaml

    from edgeft.devices import profiles
    from edgeft.stages.package.stage import PackageConfig, package

    assert_backends_agree(trained_int4, tmp_path, steps=6)
    ws = tmp_path / "ort"
    merge(ws)
    assert stages(ws)["merge"]["verification"][
        "peft_vs_ort_eval_max_abs"] < 1e-4
    profile = yaml.safe_load((profiles.DEVICES_DIR / "dev-2core-avx512.yaml").read_text())
    profile["name"], profile["quantization"]["accuracy_level"] = "fp32-compute", 1
    (tmp_path / "fp32-compute.yaml").write_text(yaml.safe_dump(profile))
    out = package(ws, PackageConfig(adapters=True), profiles.load(str(tmp_path / "fp32-compute.yaml")))
    shipped = json.loads((out / "manifest.json").read_text())["verification"]["shipped_base"]
    assert shipped["identical_weights"] == shipped["trained_int4_weights"] == 9 and not shipped["not_in_bundle"]
    assert shipped["trained_rows"] == shipped["bundle_rows"]  # and nothing else in the bundle is int4
    assert shipped["adapter_vs_training_runtime_max_logit_error"] < 1e-3


def test_package_refuses_a_bundle_whose_int4_blocks_differ(trained_int4, tmp_path):
    import shutil

    from edgeft.stages.package.stage import PackageConfig, package

    ws = tmp_path / "ws"
    shutil.copytree(trained_int4, ws)
    train(ws, DATA_DIR / "train.jsonl", TrainConfig(max_steps=2, batch_size=4, seq_len=256, val_fraction=0.05))
    merge(ws)
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["stages"]["prepare"]["config"]["int4_symmetric"] = False  # as if trained against other blocks
    (ws / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeftError, match="not in the bundle byte for byte"):
        package(ws, PackageConfig(adapters=True))
    assert not (ws / "bundle").exists()


def test_int4_weights_over_a_tile_are_used_a_tile_at_a_time(built, trained_int4, tmp_path):
    """A weight over the tile size in fp32 (20 kB here, so this tiny model has 1 to 4 tiles a weight) is read a
    tile of rows at a time: MatMulNBits per tile of outputs, the backward dequantizes one tile after the previous
    tile's product, fed from views of base.data. Same loss and gradients as PyTorch, same eval outputs as the
    whole-weight graphs, and it trains as PyTorch does."""
    import shutil

    from edgeft.stages.export import ExportConfig, export
    ws = tmp_path / "tiled"
    shutil.copytree(built("prepared", lora_r=8, base_precision="int4"), ws)
    export(ws, ExportConfig(tile_mb=20 / 1024))
    v = stages(ws)["export"]["verification"]
    assert v["relative_difference"] < 1e-6 and v["gradient_relative_error"] < 1e-5
    info = json.loads((ws / "artifacts" / "edgeft_inputs.json").read_text())
    cuts = {weight: frozen_base.tiles(spec, 20 << 10) for weight, spec in info["quantized_weights"].items()}
    assert sorted({len(c) for c in cuts.values()}) == [1, 2, 3, 4]
    graph = onnx.load(str(ws / "artifacts" / "training_model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    backward = 0
    for weight, spec in info["quantized_weights"].items():
        cut = cuts[weight]
        if len(cut) == 1:
            continue
        tile_q = [frozen_base.tile_input(spec["q"], first, end) for first, end in cut]
        assert spec["q"] not in inputs and set(tile_q) <= inputs
        readers = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] in tile_q]
        assert sorted(n.input[1] for n in readers) == sorted(tile_q)  # the forward: a tile of outputs each
        assert {n.op_type for n in graph.node if {r.output[0] for r in readers} & set(n.input)} == {"Concat"}
        sizes = [n for n in graph.node if n.op_type == "Size"
                 and n.name.startswith(f"{frozen_base.DEQUANTIZE_PREFIX}{weight}/")]
        if sizes:  # the backward: tile 0 once its slice of dY exists, tile i once the sum to tile i - 1 does
            backward += 1
            anchors = [producers[n.input[0]] for n in sizes]
            assert len(sizes) == len(cut) and anchors[0].op_type == "Slice"
            assert [a.output[0].rsplit("/tile", 1)[1].split("/")[0] for a in anchors[1:]] == [
                str(i) for i in range(len(cut) - 1)]
    assert backward >= 4
    _same_as_whole(trained_int4, ws, tmp_path)
    assert_backends_agree(ws, tmp_path, steps=4)


def _same_as_whole(whole_ws, tiled_ws, tmp_path):
    """The training runtime gives the same eval logits, losses and LoRA gradients with tiles as with whole weights."""
    from edgeft.runtime import jobs, launcher

    ids = np.random.default_rng(0).integers(3, 300, size=(2, 32))
    np.savez(tmp_path / "batch.npz", input_ids=ids, attention_mask=np.ones_like(ids), labels=ids)
    found = []
    for name, workspace in (("whole", whole_ws), ("tiled", tiled_ws)):
        run = launcher.run(jobs.Verify(artifacts=str(workspace / "artifacts"), batch=str(tmp_path / "batch.npz"),
                                       grads_out=str(tmp_path / f"{name}-grads.npz"),
                                       logits_out=str(tmp_path / f"{name}-logits.npy")))
        found.append((run, np.load(tmp_path / f"{name}-logits.npy"), dict(np.load(tmp_path / f"{name}-grads.npz"))))
    (whole, whole_logits, whole_grads), (tiled, tiled_logits, tiled_grads) = found
    assert np.isfinite(tiled_logits).all() and np.allclose(tiled_logits, whole_logits, rtol=1e-5, atol=1e-5)
    for key in ("eval_loss", "train_loss"):
        assert np.isfinite(tiled[key]) and tiled[key] == pytest.approx(whole[key], rel=1e-6)
    for name, grad in whole_grads.items():
        assert np.isfinite(tiled_grads[name]).all() and np.allclose(tiled_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_int8_weights_over_a_tile_are_used_a_tile_at_a_time(built, exported_int8, tmp_path):
    """int8 dequantizes for the forward too: x W over tiles of outputs, concatenated; dY W^T summed over tiles."""
    import shutil

    from edgeft.stages.export import ExportConfig, export

    ws = tmp_path / "tiled"
    shutil.copytree(built("prepared", lora_r=8, base_precision="int8"), ws)
    export(ws, ExportConfig(tile_mb=20 / 1024))
    v = stages(ws)["export"]["verification"]
    assert v["relative_difference"] < 1e-6 and v["gradient_relative_error"] < 1e-5
    graph = onnx.load(str(ws / "artifacts" / "training_model.onnx"), load_external_data=False).graph
    tiled = [n for n in graph.node if n.name.startswith(frozen_base.DEQUANTIZE_PREFIX) and "/tile" in n.name]
    assert {n.op_type for n in tiled} >= {"DequantizeLinear", "Slice", "FusedMatMul", "Add"}
    assert [n for n in graph.node if n.op_type == "Concat" and all("/tile" in i for i in n.input)]
    _same_as_whole(exported_int8[0], ws, tmp_path)
