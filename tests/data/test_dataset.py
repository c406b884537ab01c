import json
import subprocess
import sys

import numpy as np
import pytest

from edgeft.core.errors import EdgeftError
from edgeft.data.dataset import DataConfig, build, split_indices
from edgeft.tasks.home import DATA_DIR
from edgeft.trainer import batching


@pytest.fixture(scope="module")
def home(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return build(DATA_DIR / "train.jsonl", tiny_model("phi3-mini-4k"), out, DataConfig(seq_len=256)), out


def test_arrays_are_plain_numpy_and_consistent(home):
    ds, _ = home
    assert ds.meta["splits"]["train"]["samples"] + ds.meta["splits"]["val"]["samples"] == 1200
    assert ds.meta["splits"]["val"]["samples"] == 120
    code = ("import sys, numpy as np; z = np.load(sys.argv[1]); "
            "assert z['tokens'].dtype == np.int32 and z['loss_mask'].dtype == bool; "
            "assert z['offsets'][-1] == len(z['tokens']) == len(z['loss_mask']); "
            "assert not any(m.startswith(('torch', 'transformers', 'onnx')) for m in sys.modules); print(len(z['lines']))")
    out = subprocess.run([sys.executable, "-c", code, str(ds.split("train"))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == ds.meta["splits"]["train"]["samples"]


def test_cache_is_reused_and_keyed_by_settings(home, tiny_model):
    ds, out = home
    stamp = (ds.root / "meta.json").stat().st_mtime_ns
    again = build(DATA_DIR / "train.jsonl", tiny_model("phi3-mini-4k"), out, DataConfig(seq_len=256))
    assert again.root == ds.root and (again.root / "meta.json").stat().st_mtime_ns == stamp
    other = build(DATA_DIR / "train.jsonl", tiny_model("phi3-mini-4k"), out, DataConfig(seq_len=256, seed=1))
    assert other.root != ds.root


def test_validation_split_is_deterministic_and_disjoint():
    a_train, a_val = split_indices(100, 0.1, seed=3)
    b_train, b_val = split_indices(100, 0.1, seed=3)
    assert np.array_equal(a_val, b_val) and len(a_val) == 10
    assert not set(a_train) & set(a_val) and len(a_train) + len(a_val) == 100
    assert not np.array_equal(a_val, split_indices(100, 0.1, seed=4)[1])


def test_eval_file_replaces_the_split(tiny_model, tmp_path):
    ds = build(DATA_DIR / "train.jsonl", tiny_model("phi3-mini-4k"), tmp_path, DataConfig(seq_len=256),
               eval_data=DATA_DIR / "val.jsonl")
    assert ds.meta["splits"] == {**ds.meta["splits"], "train": {**ds.meta["splits"]["train"], "samples": 1200}}
    assert ds.meta["splits"]["val"]["samples"] == 150


def test_length_grouping_cuts_padding_and_labels_follow_the_mask(home):
    ds, _ = home
    split = batching.Split(ds.split("train"))
    lengths = split.lengths
    grouped = batching.length_grouped(lengths, 8, seed=0, epoch=0)
    random_order = [np.random.default_rng(0).permutation(len(lengths))[i:i + 8] for i in range(0, len(lengths), 8)]
    assert sorted(np.concatenate(grouped).tolist()) == list(range(len(lengths)))
    assert batching.padding_fraction(lengths, grouped) < 0.5 * batching.padding_fraction(lengths, random_order)
    assert [b.tolist() for b in grouped] == [b.tolist() for b in batching.length_grouped(lengths, 8, 0, 0)]
    batch = batching.collate(split, grouped[0], pad_id=ds.meta["pad_token_id"])
    for row, i in enumerate(grouped[0]):
        a, b = split.offsets[i], split.offsets[i + 1]
        n = b - a
        assert batch["attention_mask"][row].sum() == n
        trained = split.loss_mask[a:b]
        assert np.array_equal(batch["labels"][row, :n][trained], split.tokens[a:b][trained])
        assert (batch["labels"][row, :n][~trained] == -100).all() and (batch["labels"][row, n:] == -100).all()


def test_problems_stop_the_build_with_a_pointer_to_data_check(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(EdgeftError, match=r"no_assistant \(1: line 1\).*edgeft data check"):
        build(path, tiny_model("phi3-mini-4k"), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_everything_too_long_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(EdgeftError, match="no training samples left.*raise --seq-len or use --truncation right"):
        build(DATA_DIR / "val.jsonl", tiny_model("phi3-mini-4k"), tmp_path, DataConfig(seq_len=8))


def test_a_parquet_copy_of_the_data_tokenizes_as_the_jsonl(home, tiny_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds, out = home
    rows = [json.loads(x) for x in (DATA_DIR / "train.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{"conv": r["messages"]} for r in rows]), tmp_path / "train.parquet")
    copy = build(tmp_path / "train.parquet", tiny_model("phi3-mini-4k"), out,
                 DataConfig(seq_len=256, columns="messages=conv"))
    assert copy.root != ds.root and copy.meta["splits"] == ds.meta["splits"]
    for split in ("train", "val"):
        a, b = np.load(ds.split(split)), np.load(copy.split(split))
        assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "loss_mask", "offsets", "lines"))
    assert copy.meta["system_prompts"] == ds.meta["system_prompts"]
    assert copy.meta["system_prompts"]["share"] == 1.0
