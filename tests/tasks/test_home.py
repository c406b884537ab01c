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


def test_the_tool_calling_variant_declares_a_tool_per_service_and_calls_them(tmp_path):
    from edgeft.data import formats
    from edgeft.data.calls import arguments

    paths = home.generate(tmp_path, "tools", {"train": 300, "val": 20, "test": 20})
    result = formats.read(paths["train"])
    assert not result.problems and len(result.records) == 300
    assert sorted(t["function"]["name"] for t in home.TOOLS) == sorted(
        {home.tool_name(s) for s in home.SERVICES.values()})
    rows = [r.data for r in result.records]
    parallel = [r for r in rows if len(r["messages"][-1]["tool_calls"]) == 2]
    assert 0.1 < len(parallel) / len(rows) < 0.3 and " and " in parallel[0]["messages"][1]["content"]
    for row in rows:
        for call in row["messages"][-1]["tool_calls"]:
            declared = next(t for t in home.TOOLS if t["function"]["name"] == call["function"]["name"])
            assert set(arguments(call["function"]["arguments"])) <= set(
                declared["function"]["parameters"]["properties"])


def test_calls_are_scored_by_exact_match_in_any_order():
    from edgeft.stages.evaluate import Item, score

    calls = [{"name": "light_turn_on", "arguments": {"entity_id": "light.porch"}},
             {"name": "lock_lock", "arguments": {"entity_id": "lock.front_door"}}]
    items = [Item([], "", None, None, home.TOOLS, calls), Item([], "", None, None, home.TOOLS, calls[:1])]
    answers = ['<tool_call>{"name": "lock_lock", "arguments": {"entity_id": "lock.front_door"}}</tool_call>'
               '<tool_call>{"name": "light_turn_on", "arguments": {"entity_id": "light.porch"}}</tool_call>',
               '<tool_call>{"name": "light_turn_on", "arguments": {"entity_id": "light.hallway"}}</tool_call>']
    s = score(answers, items)
    assert s["metric"] == "call_exact_match" and s["exact_match"] == 0.5 and s["name_match"] == 1.0
    assert score(["no call", "{}"], items)["exact_match"] == 0.0
