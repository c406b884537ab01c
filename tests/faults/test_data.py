"""Files a user hands edgeft: training data, recipes, profiles, model folders. Each bad one is named, with the fix."""

import shutil

import pytest

from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, tree

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# (id, file name, content (None: no file; "dir": a folder), phrases)
DATA_FILES = [
    ("missing", "nothere.jsonl", None, ["does not exist", "pass a .jsonl"]),
    ("a folder", "folder.jsonl", "dir", ["is a directory but not a saved dataset", "pass a .jsonl"]),
    ("not jsonl", "data.csv", "a,b\n", ["expected a .jsonl, .json or .parquet file, or a folder a datasets.Dataset was saved to (save_to_disk), got '.csv'"]),
    ("binary", "data.jsonl", b"\xff\xfe\x00\x01garbage\n", ["not valid UTF-8", "re-save the file as UTF-8"]),
    ("empty", "data.jsonl", "\n\n", ["is empty"]),
    ("nested 100,000 deep", "data.json", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("a line nested 100,000 deep", "data.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     ["too_deep", "edgeft data check"]),
]


@pytest.mark.parametrize("name, content, phrases", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_training_on_a_bad_data_file_is_refused_before_anything_runs(workspace, tmp_path, name, content, phrases):
    ws = workspace("exported")
    data = tmp_path / "files" / name
    if content == "dir":
        data.mkdir(parents=True)
    elif content is not None:
        write(data, content)
    before = tree(ws)
    refused(cli("train", ws, "--data", data, "--max-steps", "1"), *phrases)
    assert tree(ws) == before and not (ws / "train").exists()


@pytest.mark.parametrize("name, content, phrases", [c[1:] for c in DATA_FILES[:-1]], ids=[c[0] for c in DATA_FILES[:-1]])
def test_data_check_calls_an_unusable_file_unusable(model, tmp_path, name, content, phrases):
    data = tmp_path / name
    if content == "dir":
        data.mkdir()
    elif content is not None:
        write(data, content)
    refused(cli("data", "check", data, "--model", model), *phrases)


def test_data_check_reports_a_record_nested_too_deep_as_a_problem(model, tmp_path):
    data = write(tmp_path / "data.jsonl", (DATA_DIR / "train.jsonl").read_text().splitlines()[0] + "\n"
                 + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    result = cli("data", "check", data, "--model", model)
    assert result.code == 1 and "line 2: too_deep: nested too deeply to be a record" in result.out, result.out


def test_eval_needs_answers_and_bench_needs_text(workspace, tmp_path):
    ws = workspace("packaged")
    before = tree(ws)
    text = write(tmp_path / "text.jsonl", '{"text": "turn on the lights"}\n')
    refused(cli("eval", ws, "--data", text, "--only", "base"), "eval needs chat or prompt/completion records")
    refused(cli("eval", ws, "--data", tmp_path / "none.jsonl"), "--data", "does not exist")
    binary = write(tmp_path / "bin.txt", b"\x00\xff\xfe\xfd" * 64)
    refused(cli("bench", ws, "--data", binary, "--runs", "1"), "is not UTF-8 text")
    assert tree(ws) == before


YAML_FILES = [
    ("not UTF-8", b"name: caf\xe9\n", ["not valid UTF-8", "save the file as UTF-8"]),
    ("billion laughs", BOMB, ["aliases expand to more than 100,000 values"]),
    ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("not YAML", "name: [unclosed\n", ["is not valid YAML"]),
    ("over a megabyte", "# " + "x" * (1 << 20) + "\nname: r\n", ["a recipe is a small YAML file"]),
]


@pytest.mark.parametrize("content, phrases", [c[1:] for c in YAML_FILES], ids=[c[0] for c in YAML_FILES])
def test_a_bad_recipe_file_is_refused_with_a_short_message(tmp_path, content, phrases):
    recipe = write(tmp_path / "recipe.yaml", content)
    result = cli("run", recipe)
    refused(result, *phrases)
    assert len(result.err) < 1500  # never the expanded document
    assert not (tmp_path / "artifacts").exists()


def test_a_profile_that_expands_without_end_is_refused(tmp_path):
    profile = write(tmp_path / "box.yaml", BOMB)
    result = cli("devices", "show", profile)
    refused(result, "device profile", "aliases expand to more than 100,000 values")
    assert len(result.err) < 1000


@pytest.mark.parametrize("config, phrases", [
    ("[1, 2, 3]", ["holds a JSON list, not the object of a model's settings"]),
    ('{"architectures": 5, "model_type": "phi3"}', ["'architectures' must be a list of class names"]),
    ('{"architectures": [', ["config.json is not valid JSON"]),
], ids=["a list", "architectures a number", "cut short"])
def test_prepare_refuses_a_config_that_is_not_a_model_config(model, tmp_path, config, phrases):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text(config)
    refused(cli("prepare", folder, "--out", tmp_path / "ws"), *phrases)
    assert not (tmp_path / "ws").exists()
