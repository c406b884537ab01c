import json

import pytest

from edgeft.core.errors import EdgeftError
from edgeft.data import formats

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("record, fmt", [
    (CHAT, "chat"), ({"prompt": "a", "completion": "b"}, "prompt_completion"), ({"text": "abc"}, "text")])
def test_formats_are_detected(tmp_path, record, fmt):
    result = formats.read(write(tmp_path, [record, record]))
    assert result.format == fmt and len(result.records) == 2 and not result.problems


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([CHAT, CHAT, CHAT]))
    assert len(formats.read(path).records) == 3


def test_mixed_formats_refused_with_line_numbers(tmp_path):
    result = formats.read(write(tmp_path, [CHAT, CHAT, {"text": "x"}, CHAT, {"text": "y"}]))
    (problem,) = [p for p in result.problems if p.kind == "mixed_formats"]
    assert "2 text record(s) in a chat file (lines 3, 5)" in problem.message
    assert all(r.format == "chat" for r in result.records)


@pytest.mark.parametrize("line, kind", [
    ("{not json", "not_json"),
    ("[1, 2]", "not_object"),
    ({"messages": []}, "empty_messages"),
    ({"messages": "hi"}, "messages_not_list"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "content_not_string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "no_assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "bad_weight"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system_not_first"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"prompt": "a", "completion": 3}, "not_string"),
    ({"prompt": "a"}, "missing_field"),
    ({"text": "a", "label": 1}, "unknown_key"),
    ({"input": "a"}, "unknown_format"),
])
def test_each_problem_kind_with_its_line(tmp_path, line, kind):
    first = CHAT
    if isinstance(line, dict) and "prompt" in line:
        first = {"prompt": "p", "completion": "c"}
    elif isinstance(line, dict) and "text" in line:
        first = {"text": "t"}
    result = formats.read(write(tmp_path, [first, line]))
    assert kind in result.problems_by_kind(), result.problems
    assert result.problems_by_kind()[kind] == [2]


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    assert len(formats.read(path).records) == 1


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_text("\n  \n"), "is empty"),
    (lambda p: p.write_bytes(json.dumps(CHAT).encode() + b"\n{\"text\": \"caf\xe9\"}\n"),
     r"d.jsonl:2: not valid UTF-8"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_unusable_files(tmp_path, setup, message):
    path = tmp_path / "d.jsonl"
    setup(path)
    with pytest.raises(EdgeftError, match=message):
        formats.read(path)


def test_missing_and_wrong_extension(tmp_path):
    with pytest.raises(EdgeftError, match="does not exist"):
        formats.read(tmp_path / "none.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(EdgeftError, match="expected a .jsonl, .json or .parquet file, or a folder"):
        formats.read(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text('{"text": "x"}')
    with pytest.raises(EdgeftError, match="must hold a list"):
        formats.read(tmp_path / "d.json")


def test_50mb_single_line_is_reported_not_loaded(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(CHAT) + "\n")
        f.write('{"text": "' + "x" * (50 * 2**20) + '"}\n')
    result = formats.read(path)
    assert result.problems_by_kind() == {"line_too_long": [2]}
    assert "50 MB" in result.problems[0].message


# Parquet and datasets folders: the same records and checks as JSONL, columns mapped by name.

def home_rows(n: int = 50) -> list[dict]:
    from edgeft.tasks.home import DATA_DIR

    return [json.loads(x) for x in (DATA_DIR / "train.jsonl").read_text().splitlines()[:n]]


def test_a_parquet_file_gives_the_jsonl_records_and_ignores_other_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = home_rows()
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "id": i, "source": "home"} for i, r in enumerate(rows)]), path)
    result = formats.read(path)
    assert result.format == "chat" and not result.problems
    assert [r.data for r in result.records] == rows and [r.line for r in result.records] == list(range(1, 51))


def test_a_saved_dataset_with_its_own_column_names(tmp_path):
    from datasets import Dataset

    rows = [{"question": "2+2?", "answer": "4"}, {"question": "capital of France?", "answer": "Paris"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "qa"))
    unmapped = formats.read(tmp_path / "qa")
    assert not unmapped.records and unmapped.problems[0].kind == "unknown_format"
    mapped = formats.read(tmp_path / "qa", formats.parse_columns("prompt=question,completion=answer"))
    assert mapped.format == "prompt_completion" and not mapped.problems
    assert [r.data for r in mapped.records] == [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    chats = Dataset.from_list([{"conversations": r["messages"]} for r in home_rows(5)])
    chats.save_to_disk(str(tmp_path / "chats"))
    assert [r.data for r in formats.read(tmp_path / "chats", {"messages": "conversations"}).records] == home_rows(5)


def test_table_problems_name_the_row_and_a_datasetdict_names_its_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = home_rows(4)
    rows[2]["messages"][2]["content"] = " "
    rows[3]["messages"][0]["weight"] = 1  # a struct column: the other rows' messages get weight null, dropped
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    result = formats.read(tmp_path / "bad.parquet")
    assert [(p.line, p.kind) for p in result.problems] == [(3, "empty_content"), (4, "bad_weight")]
    assert len(result.records) == 2
    DatasetDict({"train": Dataset.from_list(home_rows(3)), "test": Dataset.from_list(home_rows(2))}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(EdgeftError, match="DatasetDict .splits: train, test.; pass one split's folder"):
        formats.read(tmp_path / "dd")
    assert len(formats.read(tmp_path / "dd" / "train").records) == 3
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(EdgeftError, match="cannot be read as Parquet"):
        formats.read(tmp_path / "junk.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(EdgeftError, match="not a saved dataset"):
        formats.read(tmp_path / "folder")
    for bad in ("messages", "answer=x", "prompt=", "=q"):
        with pytest.raises(EdgeftError, match="NAME=COLUMN"):
            formats.parse_columns(bad)


# Function calling (OpenAI's fine-tuning format)

TOOLS = [{"type": "function", "function": {"name": "light_turn_on", "parameters": {"type": "object", "properties": {
    "entity_id": {"type": "string"}}}}}, {"type": "function", "function": {"name": "lock_lock"}}]


def call(name, arguments='{"entity_id": "light.porch"}', id_="call_1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_record(calls, *after, tools=TOOLS):
    return {"tools": tools, "messages": [{"role": "user", "content": "porch light on"},
                                         {"role": "assistant", "tool_calls": calls}, *after]}


def test_tool_calls_parallel_calls_and_tool_results_are_chat_records(tmp_path):
    good = [tool_record([call("light_turn_on")]),
            tool_record([call("light_turn_on"), call("lock_lock", "{}", "call_2")],
                        {"role": "tool", "tool_call_id": "call_2", "content": "locked"},
                        {"role": "tool", "tool_call_id": "call_1", "content": "on"},
                        {"role": "assistant", "content": "Done."}),
            tool_record([call("lock_lock", "{}", None)], {"role": "tool", "content": "locked"})]
    result = formats.read(write(tmp_path, good))
    assert not result.problems and result.format == "chat" and len(result.records) == 3


@pytest.mark.parametrize("record, kind, phrase", [
    (tool_record([call("light_turn_off")]), "undeclared_tool", "'light_turn_off', which 'tools' does not declare"),
    (tool_record([call("light_turn_on")], tools=None) | {"tools": None}, "bad_tools", "'tools' must be a list"),
    ({"messages": tool_record([call("lock_lock", "{}")])["messages"]}, "undeclared_tool", "declares no tools"),
    (tool_record([call("light_turn_on", "{entity_id: porch}")]), "bad_arguments", "arguments is not JSON"),
    (tool_record([call("light_turn_on", "[1, 2]")]), "bad_arguments", "must be a JSON object"),
    (tool_record([call("light_turn_on")], {"role": "tool", "tool_call_id": "call_9", "content": "on"}),
     "tool_without_call", "for call 'call_9', which no earlier assistant message made"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "on"},
                   {"role": "assistant", "content": "y"}]}, "tool_without_call", "with no call before it"),
    (tool_record([]), "bad_tool_call", "must be a non-empty list"),
    (tool_record([{"type": "function", "function": {"arguments": "{}"}}]), "bad_tool_call", '"name"'),
    ({"tools": [{"type": "function", "name": "x"}], "messages": CHAT["messages"]}, "bad_tools", "tools[0] must be"),
])
def test_bad_tool_calling_records_are_named(tmp_path, record, kind, phrase):
    result = formats.read(write(tmp_path, [record]))
    assert not result.records and kind in [p.kind for p in result.problems], result.problems
    assert any(phrase in p.message and p.line == 1 for p in result.problems if p.kind == kind), result.problems
