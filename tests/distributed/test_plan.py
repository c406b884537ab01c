"""The planner for data-parallel runs: per-rank memory of each strategy, checked against the measured rows of
benchmarks/results/distributed.json (each rank's peak while training, within 15 %), and how many ranks of a
profile a model needs."""

import json
from pathlib import Path

import pytest

from edgeft.devices import plan
from edgeft.devices.plan import Run
from tests.devices.test_plan import profile_file
from tests.helpers import cli

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "distributed.json"
PHI3_MEDIUM = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120,
               "num_hidden_layers": 40, "intermediate_size": 17920, "num_attention_heads": 40,
               "num_key_value_heads": 10, "vocab_size": 32064, "max_position_embeddings": 4096,
               "tie_word_embeddings": False}
SLICE = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
         "tie_word_embeddings": False}


def config_folder(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_per_rank_memory_follows_what_each_strategy_shards(tmp_path):
    model = config_folder(tmp_path, "medium", PHI3_MEDIUM)
    one = plan.make(model, Run(seq_len=512, batch_size=4, backend="torch"), None).memory
    per = {s: plan.make(model, Run(seq_len=512, batch_size=4, backend="torch", ranks=4, strategy=s), None).memory
           for s in ("ddp", "zero2", "zero3", "fsdp")}
    assert per["ddp"].frozen == per["zero2"].frozen == one.frozen  # the whole base on every rank
    # a quarter each, plus what is gathered around the layer computed (FSDP2 on gloo holds more of it)
    assert per["zero3"].frozen < per["fsdp"].frozen < one.frozen / 3
    assert per["zero2"].optimizer == pytest.approx(one.optimizer / 4) and per["ddp"].optimizer == one.optimizer
    assert all(m.activations == pytest.approx(one.activations / 4) for m in per.values())  # a sample each


def test_plan_says_how_many_ranks_a_model_needs(tmp_path):
    model = config_folder(tmp_path, "medium", PHI3_MEDIUM)
    profile = profile_file(tmp_path, "gpu-24gb", 24)
    result = cli("plan", model, "--device", profile, "--backend", "torch", "--base-precision", "fp32",
                 "--seq-len", "512", "--recompute")
    assert result.code == 1  # 56 GB of fp32 weights do not fit one
    line = next(x for x in result.out.splitlines() if x.startswith("ranks of gpu-24gb it needs"))
    needed = {s: n for s, n in (part.split(" ", 1) for part in line.split(": ", 1)[1].split(", "))}
    assert needed["zero3"] == needed["fsdp"] == "3" and needed["ddp"].startswith("none")
    fits = cli("plan", model, "--device", profile, "--backend", "torch", "--base-precision", "fp32", "--seq-len", "512",
               "--recompute", "--ranks", "3", "--strategy", "zero3")
    assert fits.code == 0 and "3 ranks, zero3" in fits.out


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_the_planner_predicts_the_measured_per_rank_memory_within_15_percent(strategy, tmp_path):
    measured = json.loads(RESULTS.read_text())
    model = config_folder(tmp_path, "slice", SLICE | {"num_hidden_layers": measured["layers"]})
    row = next(r for r in measured["rows"] if r["run"] == strategy)
    run = Run(seq_len=256, batch_size=2, backend="torch", ranks=row["ranks"], strategy=strategy)
    predicted = plan.make(model, run, None).memory.total / 1e6
    measured_mb = max(row["rank_training_peak_rss_mb"])
    assert abs(predicted / measured_mb - 1) <= 0.15, (strategy, predicted, measured_mb)
