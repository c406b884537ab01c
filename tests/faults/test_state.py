"""What edgeft wrote earlier, damaged from outside: manifests, artifacts, checkpoints, logs, caches, bundles."""

import json
import shutil

import numpy as np
import pytest
import yaml

from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, stages, tree

DATA = DATA_DIR / "train.jsonl"
TRAINED = ["--data", DATA, "--max-steps", "4", "--batch-size", "4", "--seq-len", "128", "--lr", "0.01",
           "--eval-every", "2", "--save-every", "1", "--keep-last", "2"]  # the options the `trained` stage ran with
MANIFEST_FIX = "restore it from a backup, or start a new workspace"

DAMAGED_MANIFESTS = {
    "cut short": lambda text: text[: len(text) // 2],
    "a list": lambda text: "[]",
    "stages not records": lambda text: json.dumps({"stages": {"prepare": 5}}),
}
COMMANDS = {
    "export": ["export", "{ws}"],
    "train": ["train", "{ws}", "--data", DATA, "--max-steps", "1"],
    "merge": ["merge", "{ws}"],
    "package": ["package", "{ws}", "--force"],
    "eval": ["eval", "{ws}", "--data", DATA_DIR / "test.jsonl"],
    "plan": ["plan", "{ws}", "--device", "raspberry-pi-5-8gb"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGED_MANIFESTS)
def test_a_damaged_manifest_is_named_with_the_way_out(workspace, damage, command):
    ws = workspace("trained")
    manifest = ws / "manifest.json"
    manifest.write_text(DAMAGED_MANIFESTS[damage](manifest.read_text()))
    before = tree(ws)
    argv = [str(a).format(ws=ws) for a in COMMANDS[command]]
    refused(cli(*argv), f"the workspace manifest {manifest} is damaged", MANIFEST_FIX)
    assert tree(ws) == before


@pytest.mark.parametrize("damage", ["truncated", "deleted", "edited"])
def test_damaged_artifacts_are_named_and_export_force_rebuilds_them(workspace, damage):
    ws = workspace("trained")
    target = ws / "artifacts" / {"truncated": "training_model.onnx", "deleted": "base.data",
                                 "edited": "optimizer_model.onnx"}[damage]
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "deleted":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes().replace(b"AdamW", b"Adamw", 1))
    state = "missing" if damage == "deleted" else "changed"
    name = f"artifacts/{target.name} ({state})"
    fix = f"`edgeft export {ws} --force` rebuilds them"
    refused(cli("export", ws), name, fix)
    refused(cli("train", ws, *TRAINED, "--resume"), name, fix)
    refused(cli("merge", ws), name, fix)
    refused(cli("bench", ws, "--runs", "1"), name, fix)
    if damage == "truncated":  # the way out works
        assert cli("export", ws, "--force").code == 0
        result = cli("train", ws, "--data", DATA, "--max-steps", "1", "--batch-size", "4", "--seq-len", "128")
        assert result.code == 2 and "holds checkpoints of another run" in result.err  # the artifacts are new
        shutil.rmtree(ws / "train")
        assert cli("train", ws, "--data", DATA, "--max-steps", "1", "--batch-size", "4", "--seq-len", "128").code == 0


def latest(ws):
    return sorted((ws / "train" / "checkpoints").glob("step-*"))[-1]


@pytest.mark.parametrize("damage, phrases", [
    ("state cut", ["the checkpoint state", "is damaged (not valid JSON", "to use the checkpoint before it"]),
    ("state a list", ["the checkpoint state", "is damaged (it holds a JSON list"]),
    ("weights truncated", ["is damaged: ort_checkpoint (changed) differ from what was saved",
                           "to use the checkpoint before it"]),
])
def test_a_damaged_checkpoint_is_refused_by_resume_and_merge(workspace, damage, phrases):
    ws = workspace("trained")
    ckpt = latest(ws)
    if damage == "state cut":
        (ckpt / "trainer_state.json").write_text((ckpt / "trainer_state.json").read_text()[:40])
    elif damage == "state a list":
        (ckpt / "trainer_state.json").write_text("[]")
    else:
        data = (ckpt / "ort_checkpoint").read_bytes()
        (ckpt / "ort_checkpoint").write_bytes(data[: len(data) // 2])
    before = tree(ws)
    refused(cli("train", ws, *TRAINED, "--resume"), *phrases)
    refused(cli("merge", ws, "--checkpoint", "last"), *phrases)
    assert tree(ws) == before and not (ws / "merged").exists()


@pytest.mark.parametrize("pointer", ['{"path": "step-0', '{"path": "../../etc"}', '[]'],
                         ids=["cut", "outside", "a list"])
def test_a_damaged_best_pointer_is_refused_with_the_way_out(workspace, pointer):
    ws = workspace("trained")
    (ws / "train" / "checkpoints" / "best.json").write_text(pointer)
    refused(cli("merge", ws), "the best-checkpoint pointer", "damaged", "--checkpoint last")
    if pointer == "[]":  # the way out works
        assert cli("merge", ws, "--checkpoint", "last").code == 0


def test_resume_after_a_crash_that_cut_the_metrics_log(workspace):
    """A run killed while logging leaves its last line cut short; --resume drops it and logs on."""
    ws = workspace("trained")
    shutil.rmtree(latest(ws))  # the crash came before step 4 was saved
    metrics = ws / "train" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"event": "progress", "step": 4, "lo')
    result = cli("train", ws, *TRAINED, "--resume")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "progress"] == [1, 2, 3, 4]
    assert (ws / "train" / "metrics.png").stat().st_size > 10_000


def test_a_damaged_data_cache_is_rebuilt(workspace):
    ws = workspace("trained")
    shutil.rmtree(ws / "train")
    [cache] = [p for p in (ws / "data").iterdir() if p.is_dir()]
    (cache / "train.npz").write_bytes(b"not an npz")
    result = cli("train", ws, "--data", DATA, "--max-steps", "1", "--batch-size", "4", "--seq-len", "128")
    assert result.code == 0, result.err
    assert "are damaged (train.npz (changed)); rebuilding them" in result.out
    assert np.load(cache / "train.npz")["tokens"].size > 0


def test_run_reruns_training_when_the_data_file_is_edited_in_place(model, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = DATA.read_text().splitlines()
    data.write_text("\n".join(lines[:200]) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "edit", "workspace": str(tmp_path / "ws"), "model": {"path": str(model)}, "lora": {"r": 4},
        "data": {"train": str(data)}, "train": {"max_steps": 1, "batch_size": 4, "seq_len": 128},
        "stages": ["prepare", "export", "train"]}))
    assert cli("run", recipe).code == 0
    key = stages(tmp_path / "ws")["train"]["data_key"]
    again = cli("run", recipe)
    assert again.code == 0 and "[train] unchanged; skipped" in again.out
    data.write_text("\n".join(lines[200:400]) + "\n")  # the same path, other records
    edited = cli("run", recipe)
    assert edited.code == 0, edited.err
    assert "[prepare] unchanged; skipped" in edited.out and "[export] unchanged; skipped" in edited.out
    assert "[train]\n" in edited.out and "[train] unchanged" not in edited.out
    assert stages(tmp_path / "ws")["train"]["data_key"] != key


def bundle_copy(workspace):
    ws = workspace("packaged")
    return ws, ws / "bundle"


@pytest.mark.parametrize("damage, phrases", [
    ("config cut", ["the bundle's genai_config.json", "is damaged", "edgeft package WS --force"]),
    ("weights truncated", ["onnxruntime-genai cannot load the bundle", "edgeft package WS --force"]),
    ("junk adapter", ["onnxruntime-genai cannot load the adapter", "edgeft package WS --force"]),
])
def test_chat_names_a_damaged_bundle(workspace, damage, phrases):
    ws, bundle = bundle_copy(workspace)
    if damage == "config cut":
        (bundle / "genai_config.json").write_text((bundle / "genai_config.json").read_text()[:50])
    elif damage == "weights truncated":
        onnx = max(bundle.glob("model.onnx*"), key=lambda p: p.stat().st_size)
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
    else:
        (bundle / "adapters" / "packaged.onnx_adapter").write_bytes(b"\x00junk" * 100)
    argv = ["chat", ws, "--prompt", "turn on the porch light", "--max-new-tokens", "4"]
    refused(cli(*argv, *(["--adapter", "packaged"] if damage == "junk adapter" else [])), *phrases)


def test_chat_caps_the_reply_at_the_models_context_and_refuses_what_cannot_fit(workspace):
    ws, bundle = bundle_copy(workspace)
    config = json.loads((bundle / "genai_config.json").read_text())
    config["model"]["context_length"] = 96  # the bundle's default system prompt takes about 65 of them
    (bundle / "genai_config.json").write_text(json.dumps(config))
    result = cli("chat", ws, "--prompt", "lights")  # default --max-new-tokens 256, past the context
    assert result.code == 0, result.err
    assert "replies are capped at" in result.err and "the model's context is 96 tokens" in result.err
    refused(cli("chat", ws, "--prompt", "lights " * 60), "the model's context is 96", "shorten the prompt")


def test_chat_refuses_input_that_is_not_utf8(workspace):
    ws, _ = bundle_copy(workspace)
    refused(cli("chat", ws, "--max-new-tokens", "2", stdin=b"\xff\xfe lights\n"), "standard input is not UTF-8")
