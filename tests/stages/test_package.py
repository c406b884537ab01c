"""package: GenAI bundles built through the builder's CLI, verified against transformers, described by a manifest."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeft.core.errors import EdgeftError
from edgeft.devices import profiles
from edgeft.stages.export import export
from edgeft.stages.merge import merge
from edgeft.stages.package.stage import PackageConfig, package
from edgeft.stages.prepare import PrepareConfig, prepare
from edgeft.stages.train import TrainConfig, train
from edgeft.tasks.home import DATA_DIR


@pytest.fixture(scope="module")
def merged_ws(built):
    return built("merged", lora_r=8)


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
    out = package(ws, device=profiles.load("raspberry-pi-5-8gb"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["device"] == "raspberry-pi-5-8gb"
    assert manifest["quantization"] == {"precision": "int4", "block_size": 32, "accuracy_level": 4, "symmetric": True}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "README.md"} <= set(manifest["files"])
    # the adapter's weights and config (its card is documentation that eval adds its results to)
    assert set(manifest["source"]["adapter_sha256"]) == {"adapter/adapter_config.json",
                                                         "adapter/adapter_model.safetensors"}
    v = manifest["verification"]
    assert 0 <= v["token_agreement"] <= 1 and v["max_logit_error"] >= 0
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == "phi3"
    # Every core of the target (genai would otherwise run one thread), recorded and hashed.
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 4 == manifest["cpu_threads"]
    proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(out), "--prompt", "lock the front door",
                           "--max-new-tokens", "5"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    # the README's snippet, as written, from the bundle's folder
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    run = subprocess.run([sys.executable, "-c", snippet], cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert_carries_the_training_system_prompt(out)


SYSTEM = json.loads((DATA_DIR / "train.jsonl").read_text().splitlines()[0])["messages"][0]["content"]


def rendered(bundle, messages) -> str:
    import onnxruntime_genai as og

    return og.Tokenizer(og.Model(str(bundle))).apply_chat_template(json.dumps(messages), add_generation_prompt=True)


def assert_carries_the_training_system_prompt(bundle):
    """The sample task's data has one system prompt: the bundle renders it when a conversation has none, keeps an
    app's own, and generates up to the training length (256) by default."""
    chat = json.loads((bundle / "manifest.json").read_text())["chat_defaults"]
    assert chat["system_prompt"] == SYSTEM and "100% of its chat records" in chat["system_prompt_from"]
    assert chat["max_length"] == 256 == json.loads((bundle / "genai_config.json").read_text())["search"]["max_length"]
    assert 2 in chat["stop_token_ids"]
    assert (bundle / "system_prompt.txt").read_text() == SYSTEM
    user = [{"role": "user", "content": "turn on the porch light"}]
    assert rendered(bundle, user).startswith(f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\nturn on the porch light")
    own = rendered(bundle, [{"role": "system", "content": "Be brief."}, *user])
    assert own.startswith("<|system|>\nBe brief.<|end|>") and SYSTEM not in own


def test_chat_defaults_choice_and_any_system_text(merged_ws, tmp_path):
    from edgeft.stages.package import chat_defaults

    data = {"system_prompts": {"most_common": "A", "share": 0.6, "distinct": 3}}
    assert chat_defaults.choose(None, data)[0] == "A"
    assert chat_defaults.choose("B", data) == ("B", "--system") and chat_defaults.choose("", data)[0] is None
    split = {"system_prompts": {"most_common": "A", "share": 0.4, "distinct": 3}}
    assert chat_defaults.choose(None, split)[0] is None and "--system" in chat_defaults.choose(None, split)[1]
    assert chat_defaults.choose(None, {"system_prompts": {"most_common": None, "share": 1.0, "distinct": 0}})[0] is None
    # quotes, backslashes, newlines, braces and non-ASCII reach the prompt as written (Jinja and genai's renderer)
    ws = copy(merged_ws, tmp_path)
    bundle = package(ws, PackageConfig(precision="fp32", system='Say "hi" \\ {{ x }} {% raw %}\nzweite Zeile: ü'))
    text = 'Say "hi" \\ {{ x }} {% raw %}\nzweite Zeile: ü'
    assert (bundle / "system_prompt.txt").read_text() == text
    assert rendered(bundle, [{"role": "user", "content": "x"}]).startswith(f"<|system|>\n{text}<|end|>")
    # a fine-tune on tool calls: its tools declared by default, the caller's own taking their place
    from edgeft.tasks import home

    tooled = tmp_path / "tooled"
    shutil.copytree(bundle, tooled)
    chat = chat_defaults.apply(tooled, None, "test", None, None, home.TOOLS[:2])
    assert chat["tools"] == ["light_turn_on", "light_turn_off"]
    assert "<|tools|>\nlight_turn_on\nlight_turn_off\n<|end|>\n" in rendered(tooled, [{"role": "user", "content": "x"}])
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(tooled)))
    own = tok.apply_chat_template(json.dumps([{"role": "user", "content": "x"}]), tools=json.dumps(home.TOOLS[5:6]),
                                  add_generation_prompt=True)
    assert "<|tools|>\ncover_open_cover\n<|end|>" in own and "light_turn_on" not in own
    none = package(ws, PackageConfig(precision="fp32", system="", force=True))
    assert not (none / "system_prompt.txt").exists()
    assert rendered(none, [{"role": "user", "content": "x"}]).startswith("<|user|>")
    assert json.loads((none / "manifest.json").read_text())["chat_defaults"]["system_prompt"] is None


def matmul_nbits(bundle):
    """(dequantized [N, K] weight, attributes) of every MatMulNBits in a bundle, in graph order."""
    from edgeft.stages.package.builder import matmul_nbits as read

    return [(b.dequantized(), {"K": b.K, "N": b.N, "bits": b.bits, "block_size": b.block_size,
                               "accuracy_level": b.accuracy_level}) for b in read(bundle)]


@pytest.mark.parametrize("family,precision,symmetric", [
    ("phi3-mini-4k", "int4", True), ("phi3-mini-4k", "int4", False), ("phi3-mini-4k", "int8", True),
    pytest.param("llama3.2", "int4", True, marks=pytest.mark.slow),  # the builder's families: one in the default run
    pytest.param("qwen2.5", "int4", True, marks=pytest.mark.slow)])
def test_quantized_copy_builds_the_builders_own_int4(tiny_model, tmp_path, family, precision, symmetric):
    """The builder given edgeft's quantized copy (prequantize.py) ships the weights it would have quantized
    itself from fp32, and the two bundles compute the same logits and tokens."""
    import numpy as np

    from edgeft.devices.profiles import Quantization
    from edgeft.quant import prequantize
    from edgeft.stages.package.builder import build, run_builder
    from edgeft.stages.package.verify import agreement, genai_generate
    from edgeft.stages.package.verify import prompts_of as _prompts

    model = tiny_model(family)
    quant = Quantization(precision=precision, block_size=32, accuracy_level=4, symmetric=symmetric)
    assert prequantize.unsupported(model, 32) is None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    built = build(model, tmp_path / "a" / "bundle", tmp_path / "cache", precision, "cpu", quant)
    assert built["builder_input"] == "prequantized" and built["prequantize"]["quantized_linears"] > 0
    assert not list((tmp_path / "a").glob(".prequantized-*"))  # the copy is gone once built
    run_builder(model, tmp_path / "b" / "bundle", tmp_path / "cache", precision, "cpu", quant)
    ours, theirs = matmul_nbits(tmp_path / "a" / "bundle"), matmul_nbits(tmp_path / "b" / "bundle")
    assert len(ours) == len(theirs) > 0
    for (w1, a1), (w2, a2) in zip(ours, theirs, strict=True):
        assert a1 == a2 and np.array_equal(w1, w2)
    prompts = _prompts(model, 2)
    t1, l1 = genai_generate(tmp_path / "a" / "bundle", prompts, 8)
    t2, l2 = genai_generate(tmp_path / "b" / "bundle", prompts, 8)
    assert agreement(t1, t2) == 1.0
    assert max(float(np.abs(x - y).max()) for x, y in zip(l1, l2, strict=True)) < 1e-5


def test_the_builder_quantizes_where_the_copy_cannot_be_made(tiny_model, tmp_path):
    """Blocks that do not divide a weight's inputs, and GPU builds (fp16 weights): the builder's own route."""
    from edgeft.devices.profiles import Quantization
    from edgeft.quant import prequantize
    from edgeft.stages.package.builder import build

    model = tiny_model("phi3-mini-4k")
    assert "not a multiple of the block size 256" in prequantize.unsupported(model, 256)
    built = build(model, tmp_path / "bundle", tmp_path / "cache", "int4", "cuda", Quantization())
    assert built["builder_input"] == "fp32" and "fp16" in built["why"]
    assert (tmp_path / "bundle" / "model.onnx").is_file()


def test_a_gpu_bundle_is_verified_on_the_cpu_where_its_provider_is_missing(merged_ws, tmp_path):
    """Built for CUDA on a machine without it: the same graph and weights run on the CPU provider for the
    verification, and the manifest says so."""
    from edgeft.stages.package.verify import provider_here

    if provider_here("cuda"):
        pytest.skip("this machine runs CUDA: the bundle is verified on it")
    ws = copy(merged_ws, tmp_path)
    out = package(ws, PackageConfig(precision="int4", ep="cuda"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["execution_provider"] == "cuda" and manifest["build"]["builder_input"] == "fp32"
    config = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in json.dumps(config["model"]["decoder"]["session_options"]["provider_options"])
    v = manifest["verification"]
    assert v["ran_on"] == "cpu (no cuda provider on this machine)" and 0 <= v["token_agreement"] <= 1


def test_bad_input(merged_ws, tiny_model, tmp_path):
    ws = copy(merged_ws, tmp_path)
    package(ws, PackageConfig(precision="fp32"))
    with pytest.raises(EdgeftError, match="exists; pass --force"):
        package(ws, PackageConfig(precision="fp32"))
    with pytest.raises(EdgeftError, match="--ep cuda is not an inference provider of raspberry-pi-5-8gb"):
        package(ws, PackageConfig(ep="cuda", force=True), profiles.load("raspberry-pi-5-8gb"))
    (ws / "merged" / "config.json").write_text((ws / "merged" / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(EdgeftError, match="no longer matches what merge wrote"):
        package(ws, PackageConfig(force=True))
    fresh = tmp_path / "fresh"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k"))), fresh)
    with pytest.raises(EdgeftError, match="merge it first"):
        package(fresh)
    proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not an ONNX Runtime GenAI bundle" in proc.stderr


def test_adapter_bundle_switches_the_lora_at_run_time(merged_ws, tiny_model, tmp_path):
    import onnxruntime_genai as og

    from edgeft.stages.package.verify import genai_generate
    from edgeft.stages.package.verify import prompts_of as _prompts

    ws = copy(merged_ws, tmp_path)
    out = package(ws, PackageConfig(precision="fp32", adapters=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "base+adapters" and list(manifest["adapters"]) == ["ws"]
    adapter = out / manifest["adapters"]["ws"]["file"]
    assert manifest["files"]["adapters/ws.onnx_adapter"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    v = manifest["verification"]
    # Adapter active == the merged model; none active == the base model (both against transformers, fp32).
    assert v["token_agreement"] == 1.0 and v["max_logit_error"] < 1e-4
    assert v["no_adapter_vs_base"]["token_agreement"] == 1.0 and v["no_adapter_vs_base"]["max_logit_error"] < 1e-4
    # ...and the adapter does change the output (the trained LoRA is not a no-op).
    prompts = _prompts(ws / "merged", 2)
    _, with_adapter = genai_generate(out, prompts, 1, adapter)
    _, without = genai_generate(out, prompts, 1)
    assert max(abs(a - b).max() for a, b in zip(with_adapter, without, strict=True)) > 1e-2
    # The app's calls, as the bundle README shows them.
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    adapters.load(str(adapter), "ws")
    assert "set_active_adapter" in (out / "README.md").read_text()
    # `edgeft chat WS --adapter ws` replies as that adapter does, and without --adapter as the base does.
    tok = og.Tokenizer(model)
    ids = tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": "lock the front door"}]),
                                             add_generation_prompt=True)).tolist()
    for extra, active in ((["--adapter", "ws"], adapter), ([], None)):
        proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(ws), "--prompt", "lock the front door",
                               "--max-new-tokens", "6", *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        (expected,), _ = genai_generate(out, [ids], 6, active)
        # chat holds back an incomplete character (U+FFFD) at the end of what it has decoded
        assert proc.stdout.rstrip("\n") == tok.decode(np.asarray(expected, dtype=np.int32)).rstrip("\ufffd")
    assert "no adapter active; this bundle ships ws (--adapter ws)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(out), "--adapter", "other", "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no adapter 'other' in" in proc.stderr and "it ships ws" in proc.stderr
    # `edgeft eval` scores the bundle as the fine-tune, with this workspace's adapter active: the merged model's
    # loss (fp32), not the base's.
    from edgeft.stages import evaluate

    report = evaluate.evaluate(ws, DATA_DIR / "test.jsonl", evaluate.EvalConfig(limit=4, max_new_tokens=4,
                                                                           variants=["base", "merged", "bundle"]),
                          log=lambda *_: None)
    loss = {r["variant"]: r["loss"] for r in report["results"]}
    assert set(loss) == {"base", "merged", "bundle fp32 + ws.onnx_adapter"}
    assert loss["bundle fp32 + ws.onnx_adapter"] == pytest.approx(loss["merged"], rel=1e-4)
    assert abs(loss["base"] - loss["merged"]) > 1e-2
    # `edgeft bench` times the bundle as the app runs the fine-tune: with that adapter active.
    from edgeft.stages.bench import bench_inference

    timed = bench_inference(out, 1, 8, 4, None, tmp_path)
    assert timed["adapter"] == "adapters/ws.onnx_adapter" and timed["decode_tokens_per_s"]["median"] > 0


def test_adapter_bundle_int4_and_refusals(merged_ws, tiny_model, tmp_path):
    ws = copy(merged_ws, tmp_path)
    out = package(ws, PackageConfig(adapters=True))  # int4 base, float adapters
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    lora_inputs = [i.name for i in graph.input if ".lora_" in i.name]
    assert "MatMulNBits" in ops and lora_inputs
    assert all(n.op_type == "MatMul" for n in graph.node if "/lora_" in n.name)  # adapters stay float
    with pytest.raises(EdgeftError, match="needs --adapters"):
        package(ws, PackageConfig(add_adapters=[str(ws)], force=True))
    lm = tmp_path / "lm"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), train_modules=["lm_head"]), lm)
    export(lm)
    train(lm, DATA_DIR / "train.jsonl", TrainConfig(max_steps=2, batch_size=4, seq_len=256))
    merge(lm)
    with pytest.raises(EdgeftError, match="whole trained modules; an .onnx_adapter holds plain LoRA weights only"):
        package(lm, PackageConfig(adapters=True))


def test_the_streamed_reference_gives_the_loaded_models_tokens_and_logits(merged_ws):
    """package's transformers reference, one decoder layer resident at a time (what a Phi-3-mini past 4 GiB of
    fp32 weights gets), equals the reference that holds the model: same greedy tokens, same logits."""
    from edgeft.stages.package.verify import prompts_of as _prompts
    from edgeft.stages.package.verify import reference

    merged = merged_ws / "merged"
    prompts = _prompts(merged, 2)
    loaded_tokens, loaded_logits = reference(merged, prompts, 8, weights="load")
    streamed_tokens, streamed_logits = reference(merged, prompts, 8, weights="stream")
    assert streamed_tokens == loaded_tokens and all(len(t) == 8 for t in loaded_tokens)
    for a, b in zip(loaded_logits, streamed_logits, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
