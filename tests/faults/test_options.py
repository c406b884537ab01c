"""Numbers and names from the command line, recipes and profiles: refused before anything runs, never NaN."""

import json

import pytest
import yaml

from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, stages, tree

TEST = DATA_DIR / "test.jsonl"
PI = "raspberry-pi-5-8gb"

# (id, workspace stage or None, argv, phrases the message must hold)
CASES = [
    ("prepare alpha nan", None, ["prepare", "{model}", "--out", "{new}", "--lora-alpha", "nan"],
     ["lora_alpha: nan is not a finite number", "pass a number"]),
    ("prepare dropout inf", None, ["prepare", "{model}", "--out", "{new}", "--lora-dropout", "inf"],
     ["lora_dropout: inf is not a finite number"]),
    ("prepare rank zero", None, ["prepare", "{model}", "--out", "{new}", "--lora-r", "0"],
     ["lora_r: 0 must be greater than 0"]),
    ("prepare rank huge", None, ["prepare", "{model}", "--out", "{new}", "--lora-r", "10000000"],
     ["--lora-r 10000000 is above 64, the smallest dimension of the targeted layers", "use --lora-r 64 or less"]),
    ("prepare tokens abc", None, ["prepare", "{model}", "--out", "{new}", "--trainable-tokens", "abc"],
     ["trainable_token_indices[0]: expected an integer, got 'abc'"]),
    ("train lr nan", "exported", ["train", "{ws}", "--data", "{data}", "--lr", "nan"],
     ["lr: nan is not a finite number"]),
    ("train lr inf", "exported", ["train", "{ws}", "--data", "{data}", "--lr", "inf"],
     ["lr: inf is not a finite number"]),
    ("train clip nan", "exported", ["train", "{ws}", "--data", "{data}", "--max-grad-norm", "nan"],
     ["max_grad_norm: nan is not a finite number"]),
    ("train batch zero", "exported", ["train", "{ws}", "--data", "{data}", "--batch-size", "0"],
     ["batch_size: 0 is below the minimum 1"]),
    ("train val fraction", "exported", ["train", "{ws}", "--data", "{data}", "--val-fraction", "0.9"],
     ["val_fraction: 0.9 is above the maximum 0.5"]),
    ("train seq-len past the model", "exported", ["train", "{ws}", "--data", "{data}", "--seq-len", "100000"],
     ["--seq-len 100000 exceeds 4096", "use <= 4096"]),
    ("plan negatives", None, ["plan", "{model}", "--device", PI, "--seq-len", "-5", "--batch-size", "0",
                              "--lora-r", "-3"],
     ["seq_len: -5 is below the minimum 1", "batch_size: 0 is below the minimum 1", "lora_r: -3 must be greater"]),
    ("plan unknown target", None, ["plan", "{model}", "--device", PI, "--targets", "nonsense"],
     ["--targets nonsense: not a Linear layer", "qkv_proj"]),
    ("plan a file", None, ["plan", "{data}", "--device", PI], ["is not a folder"]),
    ("eval unknown variant", "trained", ["eval", "{ws}", "--data", "{test}", "--only", "nonsense"],
     ["variants: 'nonsense' is not accepted", "base few-shot"]),
    ("eval negative shots", "trained", ["eval", "{ws}", "--data", "{test}", "--shots", "-2"],
     ["shots: -2 is below the minimum 0"]),
    ("eval no new tokens", "trained", ["eval", "{ws}", "--data", "{test}", "--max-new-tokens", "0"],
     ["max_new_tokens: 0 is below the minimum 1"]),
    ("eval limit zero", "trained", ["eval", "{ws}", "--data", "{test}", "--limit", "0"],
     ["limit: 0 is below the minimum 1"]),
    ("bench no runs", "trained", ["bench", "{ws}", "--runs", "0"], ["runs: 0 is below the minimum 1"]),
    ("bench one new token", "trained", ["bench", "{ws}", "--new-tokens", "1"],
     ["new_tokens: 1 is below the minimum 2"]),
    ("bench no prompt", "trained", ["bench", "{ws}", "--prompt-tokens", "0"],
     ["prompt_tokens: 0 is below the minimum 1"]),
    ("bench no sequence", "trained", ["bench", "{ws}", "--seq-len", "0"], ["seq_len: 0 is below the minimum 8"]),
    ("bench seq-len past the model", "exported", ["bench", "{ws}", "--seq-len", "100000"],
     ["--seq-len 100000 exceeds 4096"]),
    ("chat no new tokens", "packaged", ["chat", "{ws}", "--max-new-tokens", "0", "--prompt", "hi"],
     ["max_new_tokens: 0 is below the minimum 1"]),
    ("chat negative new tokens", "packaged", ["chat", "{ws}", "--max-new-tokens", "-5", "--prompt", "hi"],
     ["max_new_tokens: -5 is below the minimum 1"]),
    ("data check seq-len zero", None, ["data", "check", "{data}", "--model", "{model}", "--seq-len", "0"],
     ["seq_len: 0 is below the minimum 8"]),
    ("probe into a folder", None, ["devices", "probe", "--out", "{tmp}"], ["is a folder", "this-box.yaml"]),
    ("run an unknown stage", None, ["run", "{recipe}", "--force", "deploy"],
     ["--force deploy: no such stage", "prepare, export, train"]),
]


@pytest.mark.parametrize("stage, argv, phrases", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_option_is_refused_and_nothing_is_written(stage, argv, phrases, model, workspace, tmp_path):
    ws = workspace(stage) if stage else tmp_path / "ws"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "workspace": str(tmp_path / "run-ws"), "model": {"path": str(model)},
                                      "data": {"train": str(DATA_DIR / "train.jsonl")}}))
    values = {"model": model, "ws": ws, "new": tmp_path / "new", "data": DATA_DIR / "train.jsonl", "test": TEST,
              "tmp": tmp_path, "recipe": recipe}
    before = tree(ws)
    refused(cli(*(a.format(**values) for a in argv)), *phrases)
    assert tree(ws) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "run-ws").exists()


PROFILE = {
    "name": "box", "description": "a test box",
    "cpu": {"arch": "x86_64", "model": "x", "cores": 2, "isa": ["avx2"],
            "max_freq_ghz": {"value": 3.0, "source": "datasheet", "ref": "x"},
            "peak_fp32_gflops": {"value": 100.0, "source": "datasheet", "ref": "x"}},
    "memory": {"total_gb": {"value": 8.0, "source": "datasheet", "ref": "x"},
               "budget_gb": {"value": 6.0, "source": "target", "ref": "x"},
               "bandwidth_gbs": {"value": 20.0, "source": "datasheet", "ref": "x"}},
    "execution_providers": {"training": ["cpu"], "inference": ["cpu"]},
    "budgets": {"basis": "x", "peak_memory_gb": {"value": 5.0, "source": "target", "ref": "x"}},
}


@pytest.mark.parametrize("path, value, phrase", [
    (("budgets", "peak_memory_gb", "value"), float("nan"), "budgets.peak_memory_gb.value: nan is not a finite number"),
    (("memory", "budget_gb", "value"), float("inf"), "memory.budget_gb.value: inf is not a finite number"),
    (("cpu", "peak_fp32_gflops", "value"), 10**400, "cpu.peak_fp32_gflops.value: inf is not a finite number"),
    (("cpu", "cores"), 0, "cpu.cores: 0 is below the minimum 1"),
], ids=["budget nan", "memory inf", "peak overflows", "no cores"])
def test_a_profile_figure_must_be_finite_and_in_range(tmp_path, path, value, phrase):
    profile = json.loads(json.dumps(PROFILE))
    node = profile
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file = tmp_path / "box.yaml"
    file.write_text(yaml.safe_dump(profile))
    ok = tmp_path / "box-ok.yaml"
    ok.write_text(yaml.safe_dump({**PROFILE, "name": "box-ok"}))
    assert cli("devices", "show", ok).code == 0
    refused(cli("devices", "show", file), phrase)
    refused(cli("plan", tmp_path, "--device", file), phrase)


@pytest.mark.parametrize("change, phrases", [
    ({"train": {"lr": float("nan")}}, ["train.lr: nan is not a finite number"]),
    ({"lora": {"alpha": float("inf")}}, ["lora.alpha: inf is not a finite number"]),
    ({"name": "../../x"}, ["name: '../../x' is not a plain name", "workspace:"]),
    ({"name": "/tmp/elsewhere"}, ["name: '/tmp/elsewhere' is not a plain name"]),
    ({"stages": ["prepare", "deploy"]}, ["stages: 'deploy' is not accepted"]),
    ({"eval": {"variants": ["nonsense"]}}, ["eval.variants: 'nonsense' is not accepted"]),
], ids=["lr nan", "alpha inf", "name climbs out", "name absolute", "unknown stage", "unknown variant"])
def test_a_bad_recipe_value_is_refused_before_any_stage(model, tmp_path, change, phrases):
    recipe = {"name": "r", "model": {"path": str(model)}, "data": {"train": str(DATA_DIR / "train.jsonl")}}
    for key, value in change.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("run", path)
    refused(result, *phrases)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path.parent / "x").exists()


def test_a_default_the_model_cannot_take_is_capped_and_said_once(tiny_model, tmp_path):
    """A model whose context is 256 tokens trains without --seq-len (the default 512 would be refused)."""
    model = tiny_model("phi3-ctx256")
    ws = tmp_path / "ws"
    assert cli("prepare", model, "--out", ws, "--lora-r", "4").code == 0
    assert cli("export", ws).code == 0
    result = cli("train", ws, "--data", DATA_DIR / "train.jsonl", "--max-steps", "1", "--batch-size", "4")
    assert result.code == 0, result.err
    assert result.out.count("--seq-len 256, the longest sequence this model takes") == 1
    assert stages(ws)["train"]["config"]["seq_len"] == 256
