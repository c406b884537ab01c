"""The whole pipeline once, end to end through the CLI: `edgeft run` on a tiny model, then eval and bench checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeft.tasks.home import DATA_DIR
from tests.helpers import stages


def edgeft(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True, cwd=cwd)


def recipe(tmp_path, model, **changes):
    data = {
        "name": "tiny", "workspace": str(tmp_path / "ws"), "device": "raspberry-pi-5-8gb",
        "model": {"path": str(model)},
        "lora": {"r": 8, "train_modules": ["lm_head"]},
        "data": {"train": str(DATA_DIR / "train.jsonl"), "eval": str(DATA_DIR / "val.jsonl"),
                 "test": str(DATA_DIR / "test.jsonl")},
        "train": {"max_steps": 6, "batch_size": 8, "seq_len": 128, "lr": 0.01, "backend": "ort"},
        "package": {"precision": "int4"},
        "eval": {"limit": 12, "max_new_tokens": 24, "shots": 2},
        "bench": {"runs": 2, "seq_len": 64, "batch_size": 2, "prompt_tokens": 32, "new_tokens": 8},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    path = recipe(tmp, tiny_model("phi3-mini-4k"))
    proc = edgeft("run", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, path, proc


def test_run_goes_through_every_stage(pipeline):
    tmp, _, proc = pipeline
    ws = tmp / "ws"
    records = stages(ws)
    for name in ("prepare", "export", "train", "merge", "package", "eval", "bench", "run"):
        assert name in records, name
    for name in ("prepare", "export", "train", "merge", "package", "eval", "bench"):
        assert f"[{name}]" in proc.stdout
    assert records["train"]["step"] == 6 and (ws / "train" / "metrics.png").is_file()
    assert (ws / "bundle" / "genai_config.json").is_file()


def test_eval_report_has_every_variant_and_the_bundle_agrees_with_merged(pipeline):
    tmp, _, _ = pipeline
    report = json.loads((tmp / "ws" / "eval" / "report.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"base", "base few-shot", "adapter", "merged", "bundle int4"}
    for r in results.values():
        assert r["samples"] == 12 and r["metric"] == "json_exact_match" and 0 <= r["exact_match"] <= 1
        assert r["loss"] > 0 and r["target_tokens"] > 0
    # Adapter and merged model are the same function; the int4 bundle (onnxruntime-genai) stays close.
    assert results["adapter"]["loss"] == pytest.approx(results["merged"]["loss"], rel=1e-4)
    assert results["bundle int4"]["loss"] == pytest.approx(results["merged"]["loss"], rel=0.05)
    assert results["adapter"]["loss"] < results["base"]["loss"]  # 6 steps at lr 1e-2 do move the answers' loss
    assert (tmp / "ws" / "eval" / "report.png").stat().st_size > 1000
    assert "| bundle int4 | onnxruntime-genai |" in (tmp / "ws" / "eval" / "report.md").read_text()
    # the adapter's model card carries the results, before how to use it
    card = (tmp / "ws" / "adapter" / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and card.index("## Evaluation") < card.index("## Use it")
    assert f"| adapter | transformers | {results['adapter']['exact_match']:.1%} | {results['adapter']['loss']:.4f} |" \
        in card and "(12 samples)" in card


def test_bench_measures_both_sides_and_judges_against_the_profile(pipeline):
    tmp, _, _ = pipeline
    report = json.loads((tmp / "ws" / "bench" / "bench.json").read_text())
    t, i = report["training"], report["inference"]
    assert t["backend"] == "torch"  # the Pi profile's training backend
    assert t["step_s"]["runs"] == 2 and t["step_s"]["min"] <= t["step_s"]["median"] <= t["step_s"]["max"]
    assert t["peak_rss_mb"] > 50 and t["predicted"]["peak_rss_mb"] > 0
    assert i["decode_tokens_per_s"]["median"] > 0 and i["ttft_ms"]["median"] > 0 and i["peak_rss_mb"] > 10
    verdicts = {r["figure"]: r["verdict"] for r in report["judged"]}
    assert verdicts["decode tokens/s (median)"] in ("pass", "fail")
    assert verdicts["training step time (median)"] == "not judged"
    assert (tmp / "ws" / "bench" / "bench.png").is_file()


def test_bench_without_budgets_measures_and_says_nothing_was_judged(pipeline, tmp_path):
    tmp, _, _ = pipeline
    proc = edgeft("bench", str(tmp / "ws" / "bundle"), "--device", "dev-2core-avx512", "--runs", "2",
                  "--prompt-tokens", "16", "--new-tokens", "4", "--out", str(tmp_path / "b"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "training" not in report and report["inference"]["decode_tokens_per_s"]["runs"] == 2
    assert {r["verdict"] for r in report["judged"]} == {"not judged"}
    assert "none was judged" in report["note"]


def test_rerun_skips_unchanged_stages_and_an_override_reruns_from_train(pipeline):
    tmp, path, _ = pipeline
    again = edgeft("run", str(path))
    assert again.returncode == 0, again.stderr
    for name in ("prepare", "export", "train", "merge", "package", "eval", "bench"):
        assert f"[{name}] unchanged; skipped" in again.stdout
    changed = edgeft("run", str(path), "--set", "train.max_steps=7", "--set", "bench.runs=1")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "[prepare] unchanged" in changed.stdout and "[export] unchanged" in changed.stdout
    assert "[train]\n" in changed.stdout and "[eval]\n" in changed.stdout
    assert stages(tmp / "ws")["train"]["step"] == 7


def test_an_interrupted_training_stage_resumes(tiny_model, tmp_path):
    path = recipe(tmp_path, tiny_model("phi3-mini-4k"), stages=["prepare", "export", "train"],
                  **{"train.save_every": 2})
    assert edgeft("run", str(path)).returncode == 0
    # What a kill leaves behind: checkpoints, but no finished train record.
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    del manifest["stages"]["train"]
    (tmp_path / "ws" / "manifest.json").write_text(json.dumps(manifest))
    proc = edgeft("run", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming the interrupted run" in proc.stdout


def test_bad_recipes_exit_2_naming_the_problem(tiny_model, tmp_path):
    path = recipe(tmp_path, tiny_model("phi3-mini-4k"), **{"train.learning_rate": 0.1, "lora.rank": 4})
    proc = edgeft("run", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.learning_rate" in proc.stderr and "lora.rank" in proc.stderr
    missing = edgeft("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_set = edgeft("run", str(recipe(tmp_path, tiny_model("phi3-mini-4k"))), "--set", "trainlr")
    assert bad_set.returncode == 2 and "section.key=value" in bad_set.stderr


def test_every_shipped_recipe_parses_and_starts_with_its_command():
    from pathlib import Path

    from edgeft.pipeline import run

    repo = Path(__file__).resolve().parents[2]
    paths = sorted((repo / "recipes").glob("*.yaml")) + sorted(run.SHIPPED["recipes"].glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# edgeft run ") and path.name in first, path
        recipe, _ = run.load(path)
        assert recipe.name and recipe.device


@pytest.mark.slow
def test_demo_on_the_committed_base_gains_at_least_60_points(tmp_path):
    """The README's main job, as a user runs it (about 5 minutes on 2 cores)."""
    proc = edgeft("demo", "--seed", "0", "--workspace", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text())
    em = {r["variant"]: r["exact_match"] for r in report["results"]}
    assert em["base"] <= 0.05 and em["adapter"] >= 0.6 and em["bundle int4"] >= 0.6
    for line in ("exact match, fine-tuned", "training tokens/s", "decode tokens/s", "bundle"):
        assert line in proc.stdout
    # The bundle carries the system prompt it was trained with: its README's snippet as written (a user message
    # alone) and `edgeft chat` without --system answer the sample request.
    import re

    bundle = tmp_path / "demo" / "bundle"
    want = {"service": "light.turn_on", "entity_id": "light.porch"}
    snippet = re.search(r"```python\n(.*?)```", (bundle / "README.md").read_text(), re.S)[1]
    run = subprocess.run([sys.executable, "-c", snippet], cwd=bundle.parent, capture_output=True, text=True)
    assert run.returncode == 0 and json.loads(run.stdout) == want, run.stdout + run.stderr
    chat = edgeft("chat", str(bundle), "--prompt", "turn on the porch light")
    assert chat.returncode == 0 and json.loads(chat.stdout) == want, chat.stdout + chat.stderr


def test_bench_bad_input(tiny_model, tmp_path):
    from edgeft.stages.prepare import PrepareConfig, prepare

    ws = prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k"))), tmp_path / "ws")
    nothing = edgeft("bench", str(ws), "--backend", "ort")
    assert nothing.returncode == 2 and "nothing to bench" in nothing.stderr and "Traceback" not in nothing.stderr
    missing = edgeft("bench", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = edgeft("bench", str(ws), "--device", "raspberry-pi-6")
    assert unknown.returncode == 2 and "unknown device" in unknown.stderr


@pytest.mark.slow
def test_the_tool_calling_variant_trains_to_the_calls(tmp_path):
    """benchmarks/tools.py's run (about 6 minutes): the demo recipe on the tool-calling data; the fine-tune calls
    the right tools with the right arguments (measured: 54 % call exact match, 73 % the right tools; the base 0 %)
    and `edgeft chat` shows the call for a request alone."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.tools import run

    result = run(0, tmp_path)
    em = {r["variant"]: r["exact_match"] for r in result["results"]}
    assert em["base"] == 0.0 and em["adapter"] >= 0.4 and em["bundle int4"] >= 0.4, em
    assert result["chat"]["shows_the_call"] and result["chat"]["exit"] == 0, result["chat"]
