"""plan: predictions from config.json and safetensors headers, budget checks in prepare and train."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from edgeft.core.errors import EdgeftError
from edgeft.devices import plan, profiles
from edgeft.stages.export import export
from edgeft.stages.prepare import PrepareConfig, prepare
from edgeft.stages.train import TrainConfig, train
from edgeft.tasks.home import DATA_DIR
from tests.helpers import stages


def profile_file(tmp_path, name: str, budget_gb: float):
    """A profile as `devices probe` writes it (a file outside devices/), with its own memory budget."""
    data = yaml.safe_load((profiles.DEVICES_DIR / "dev-2core-avx512.yaml").read_text())
    data["name"] = name
    data["memory"]["budget_gb"] = {"value": budget_gb, "source": "target", "ref": "test"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("family", ["phi3-mini-4k", "phi4-mini", "llama3.2", "qwen2.5"])
@pytest.mark.parametrize("train_modules", [[], ["lm_head"]])
def test_trainable_count_matches_peft(tiny_model, tmp_path, family, train_modules):
    model = tiny_model(family)
    ws = prepare(PrepareConfig(model_dir=str(model), lora_r=8, train_modules=train_modules), tmp_path / "ws")
    prep = stages(ws)["prepare"]
    p = plan.make(model, plan.Run(seq_len=64, batch_size=1, lora_r=8, targets=tuple(prep["targets"]),
                                  train_modules=tuple(train_modules)), None)
    assert p.trainable == prep["params"]["trainable"]
    assert p.base_params == prep["params"]["base"]


def test_memory_grows_with_tokens_and_largest_fit_is_tight(tiny_model):
    model = tiny_model("phi3-mini-4k")
    profile = profiles.load("dev-2core-avx512")
    small = plan.make(model, plan.Run(seq_len=128, batch_size=1), profile)
    long = plan.make(model, plan.Run(seq_len=1024, batch_size=1), profile)
    wide = plan.make(model, plan.Run(seq_len=128, batch_size=8), profile)
    assert long.memory.activations > 8 * small.memory.activations  # attention grows with seq^2
    assert wide.memory.activations == pytest.approx(8 * small.memory.activations)
    assert small.memory.frozen == long.memory.frozen
    # A budget between the two: the long run does not fit, the answer fits, and one step more does not.
    budget = (small.memory.total + long.memory.total) / 2
    tight = dataclasses.replace(profile, memory=dataclasses.replace(
        profile.memory, budget_gb=profiles.Figure(budget / 1e9, "target", "test")))
    assert plan.make(model, long.run, tight).fits is False
    seq, batch = plan.largest_fit(model, long.run, tight, long.trainable)
    assert plan.make(model, plan.Run(seq_len=seq, batch_size=1), tight).fits
    assert not plan.make(model, plan.Run(seq_len=seq + 16, batch_size=1), tight).fits


def test_cli_plan_text_json_and_exit_codes(tiny_model, tmp_path):
    model = str(tiny_model("phi3-mini-4k"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgeft", "plan", *a], capture_output=True, text=True)  # noqa: E731
    ok = run(model, "--device", "raspberry-pi-5-8gb", "--seq-len", "256")
    assert ok.returncode == 0, ok.stderr
    for word in ("frozen weights", "activations", "gradients + AdamW state", "runtime", "step time",
                 "fits raspberry-pi-5-8gb: yes"):
        assert word in ok.stdout
    data = json.loads(run(model, "--device", "raspberry-pi-5-8gb", "--json").stdout)
    assert data["fits"] is True and data["run"]["backend"] == "torch"  # the Pi profile trains with torch
    assert set(data["memory_bytes"]) == {"frozen", "adapters", "optimizer", "activations", "runtime", "dequantized",
                                        "total"}
    # A probed-style profile file with a small budget: does not fit, says what would (exit 1).
    small = profile_file(tmp_path, "small-box", 0.4)
    over = run(model, "--device", str(small), "--seq-len", "4096", "--batch-size", "8")
    assert over.returncode == 1 and "fits small-box: NO" in over.stdout and "--seq-len" in over.stdout
    bad = run(model, "--device", "no-such-device")
    assert bad.returncode == 2 and "unknown device" in bad.stderr and "Traceback" not in bad.stderr


def test_prepare_and_train_refuse_runs_over_the_budget(tiny_model, tmp_path):
    model = tiny_model("phi3-mini-4k")
    with pytest.raises(EdgeftError, match="nothing fits: the fixed costs alone"):
        prepare(PrepareConfig(model_dir=str(model)), tmp_path / "ws0", profiles.load(profile_file(tmp_path, "tiny-box", 0.1)))
    assert not (tmp_path / "ws0" / "manifest.json").exists()
    ws = prepare(PrepareConfig(model_dir=str(model)), tmp_path / "ws")
    export(ws)
    box = profiles.load(profile_file(tmp_path, "box", 0.36))
    with pytest.raises(EdgeftError, match=r"over box's .* budget.*largest batch that fits is \d+ \(use --batch-size \d+ --grad-accum \d+"):
        train(ws, DATA_DIR / "train.jsonl", TrainConfig(max_steps=1, batch_size=4096, seq_len=128,
                                                       truncation="right"), device=box)
    assert not (ws / "train" / "checkpoints").exists()


@pytest.mark.parametrize("family", ["phi3-mini-4k", "phi4-mini", "qwen2.5"])
def test_a_config_only_folder_plans_like_the_full_one(tiny_model, tmp_path, family):
    """Plan before downloading: config.json alone gives the same counts as the safetensors headers."""
    import shutil

    full = tiny_model(family)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(full / "config.json", bare / "config.json")
    run = plan.Run(seq_len=128, batch_size=2, train_modules=("lm_head",))
    a, b = plan.make(full, run, None), plan.make(bare, run, None)
    assert (a.base_params, a.trainable, a.memory.total) == (b.base_params, b.trainable, b.memory.total)


def test_quantized_base_plans_smaller_frozen_weights(tiny_model):
    model = tiny_model("phi3-mini-4k")
    fp32, int8, int4 = (plan.make(model, plan.Run(seq_len=128, batch_size=1, base_precision=p), None)
                        for p in ("fp32", "int8", "int4"))
    assert fp32.memory.frozen > int8.memory.frozen > int4.memory.frozen
    assert fp32.memory.dequantized == 0 < int4.memory.dequantized


def _with_budget(profile, budget_bytes: float):
    return dataclasses.replace(profile, memory=dataclasses.replace(
        profile.memory, budget_gb=profiles.Figure(budget_bytes / 1e9, "target", "test")))


def test_profile_picks_base_precision_and_recomputation_and_export_follows(tiny_model, tmp_path):
    """Without --base-precision, prepare --device takes the first of fp32, fp32 recomputed, the profile's
    packaged precision (int4), int4 recomputed that fits batch 1 x 256; export recomputes as it chose."""
    model = tiny_model("phi3-mini-4k")
    profile = profiles.load("dev-2core-avx512")  # packages int4
    assert profile.quantization.precision == "int4"
    run = plan.Run(seq_len=plan.CHOICE_SEQ_LEN, batch_size=1, backend="ort")
    order = [("fp32", False), ("fp32", True), ("int4", False), ("int4", True)]
    totals = {c: plan.make(model, dataclasses.replace(run, base_precision=c[0], recompute=c[1]), profile).memory.total
              for c in order}
    assert totals[("int4", True)] == min(totals.values())
    for budget in sorted(totals.values()):
        tight = _with_budget(profile, budget + 1)  # a byte over: the budget goes through GB and back
        picked = plan.choose(model, run, tight)
        first = next(c for c in order if totals[c] <= budget)
        assert (picked.run.base_precision, picked.run.recompute) == first and picked.fits
    none = plan.choose(model, run, _with_budget(profile, totals[("int4", True)] - 1))
    assert (none.run.base_precision, none.run.recompute, none.fits) == ("int4", True, False)  # the leanest
    assert plan.choose(model, run, profile, base_precision="int8").run.base_precision == "int8"  # given: kept

    lean = _with_budget(profile, totals[("int4", True)] + 1)
    ws = prepare(PrepareConfig(model_dir=str(model)), tmp_path / "ws", lean)  # lora_r 16, as `run`
    record = stages(ws)["prepare"]
    assert record["config"]["base_precision"] == "int4" and record["plan"]["precision_picked"]
    assert record["plan"]["recompute"] and record["plan"]["fits"]
    export(ws)
    exported = stages(ws)["export"]
    assert exported["recompute"]["layers"] == 2 and exported["base_weights"]["precision"] == "int4"
