import json

import pytest

from edgeft.tasks import home


def test_generator_reproduces_the_committed_files(tmp_path):
    home.generate(tmp_path)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (home.DATA_DIR / f"{split}.jsonl").read_text(), split


def test_splits_do_not_share_requests():
    requests = {s: {json.loads(x)["messages"][1]["content"] for x in (home.DATA_DIR / f"{s}.jsonl").read_text()
                    .splitlines()} for s in ("train", "val", "test")}
    assert not requests["train"] & requests["test"] and not requests["train"] & requests["val"]


def test_scorer_by_hand():
    gold = [{"service": "lock.lock", "entity_id": "lock.front_door"},
            {"service": "light.turn_on", "entity_id": "light.porch", "brightness_pct": 40},
            {"service": "switch.turn_off", "entity_id": "switch.office_fan"}]
    preds = ['{"service": "lock.lock", "entity_id": "lock.front_door"}',
             'sure: {"service": "light.turn_on", "entity_id": "light.porch", "brightness_pct": 50}',
             "not json"]
    s = home.score(preds, gold)
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["field_accuracy"] == pytest.approx(4 / 7)  # 2 + 2 of 3 + 0 of 2
    assert s["valid_json"] == pytest.approx(2 / 3)
    assert s["per_field"]["brightness_pct"] == 0.0 and s["per_field"]["service"] == pytest.approx(2 / 3)


def test_generic_schema_renders_the_same_meaning():
    import random

    text, meaning = home.command(random.Random(5))
    generic, specific = home.render(meaning, "generic"), home.render(meaning, "home")
    assert generic["device"] == meaning["kind"] and specific["entity_id"] == meaning["entity"]
