"""Reading training files and checking their records, with every problem's line number.

Formats (auto-detected, never mixed in one file):
- chat: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1}, ...],
  "tools"?: [...]} (OpenAI chat fine-tuning format; weight 0 excludes an assistant message from the loss). With
  function calling: `tools` declares {"type": "function", "function": {"name", "description"?, "parameters"?}},
  an assistant message may carry `tool_calls` ([{"id", "type": "function", "function": {"name", "arguments":
  a JSON object as a string}}], several: parallel calls) instead of or with content, and a "tool" message
  answers a call (`tool_call_id`).
- prompt/completion: {"prompt": str, "completion": str}
- text: {"text": str}
Files: .jsonl (one object per line), .json (a list of objects), .parquet (a row per record), or a folder a
Hugging Face `datasets.Dataset` was saved to (`save_to_disk`). In a table, "line" is the row (from 1) and
columns the format does not use are left out; `columns` maps the format's names to a file's own
(messages=conversations, prompt=question, ...), in any of these files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.core.errors import EdgeftError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "prompt_completion", "text")
MAX_LINE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Problem:
    line: int
    kind: str
    message: str


@dataclass
class Record:
    line: int
    format: str
    data: dict


@dataclass
class ReadResult:
    path: Path
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    format: str | None = None

    def problems_by_kind(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in self.problems:
            out.setdefault(p.kind, []).append(p.line)
        return out


def _format_of(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _check_chat(obj: dict, line: int) -> list[Problem]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return [Problem(line, "messages_not_list", f"'messages' must be a list, got {type(msgs).__name__}")]
    if not msgs:
        return [Problem(line, "empty_messages", "'messages' is empty")]
    problems = [p for i, m in enumerate(msgs) for p in _check_message(m, i, line)]
    problems += _check_tools(obj, msgs, line)
    roles = [m.get("role") for m in msgs if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append(Problem(line, "no_assistant", "no assistant message: nothing to learn from"))
    elif all(m.get("weight", 1) == 0 for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"):
        problems.append(Problem(line, "no_assistant", "every assistant message has weight 0: nothing to learn from"))
    if "system" in roles[1:]:
        problems.append(Problem(line, "system_not_first", "a system message may only come first"))
    return problems


def _check_message(m, i: int, line: int) -> list[Problem]:
    """The problems of one message of a chat record (messages[i])."""
    if not isinstance(m, dict):
        return [Problem(line, "message_not_object", f"messages[{i}] is not an object")]
    problems = []
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        problems.append(Problem(line, "unknown_role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"))
    if role == "assistant" and m.get("tool_calls") and content in (None, ""):
        pass  # a message of calls alone
    elif not isinstance(content, str):
        problems.append(Problem(line, "content_not_string",
                                f"messages[{i}].content must be a string, got {type(content).__name__}"))
    elif not content.strip():
        problems.append(Problem(line, "empty_content", f"messages[{i}].content is empty"))
    if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
        problems.append(Problem(line, "bad_weight", f"messages[{i}].weight must be 0 or 1, got {m['weight']!r}"))
    if "weight" in m and role != "assistant":
        problems.append(Problem(line, "bad_weight", f"messages[{i}].weight is only allowed on assistant messages"))
    if unknown := set(m) - {"role", "content", "weight", "name", "tool_calls", "tool_call_id"}:
        problems.append(Problem(line, "unknown_key", f"messages[{i}] has unknown keys {sorted(unknown)}"))
    return problems


def _declared(obj: dict, line: int) -> tuple[set[str] | None, list[Problem]]:
    """The names of the record's declared tools (None: it declares none), and the problems of the declarations."""
    if "tools" not in obj:
        return None, []
    tools = obj["tools"]
    if not isinstance(tools, list):
        return set(), [Problem(line, "bad_tools", f"'tools' must be a list, got {type(tools).__name__}")]
    names, problems = set(), []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(name, str) and name):
            problems.append(Problem(line, "bad_tools", f'tools[{i}] must be {{"type": "function", "function": '
                                                       '{"name": ..., "parameters": ...}}'))
        elif not isinstance(function.get("parameters", {}), dict):
            problems.append(Problem(line, "bad_tools", f"tools[{i}] ({name}): parameters must be a JSON schema object"))
        else:
            names.add(name)
    return names, problems


def _check_tools(obj: dict, msgs: list, line: int) -> list[Problem]:
    """Function calling: each call names a declared tool with a JSON object of arguments; each tool result
    answers an earlier call."""
    declared, problems = _declared(obj, line)
    call_ids: set[str] | None = None  # None until a call is made
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if "tool_calls" in m and role != "assistant":
            problems.append(Problem(line, "bad_tool_call", f"messages[{i}].tool_calls: only assistant messages "
                                                           "call tools"))
        elif "tool_calls" in m:
            ids, found = _check_calls(m["tool_calls"], declared, f"messages[{i}].tool_calls", line)
            problems += found
            call_ids = (call_ids or set()) | ids if ids is not None else call_ids
        if "tool_call_id" in m and role != "tool":
            problems.append(Problem(line, "bad_tool_call", f"messages[{i}].tool_call_id: only tool messages "
                                                           "answer calls"))
        answered = m.get("tool_call_id")
        if role == "tool" and (call_ids is None or (answered is not None and answered not in call_ids)):
            problems.append(Problem(line, "tool_without_call", f"messages[{i}] is a tool result " + (
                "with no call before it" if call_ids is None else
                f"for call {answered!r}, which no earlier assistant message made")))
    return problems


def _check_calls(calls, declared: set[str] | None, where: str, line: int) -> tuple[set[str] | None, list[Problem]]:
    """An assistant message's tool_calls: the ids of its calls (None: none is well formed), and its problems."""
    if not isinstance(calls, list) or not calls:
        return None, [Problem(line, "bad_tool_call", f"{where} must be a non-empty list")]
    ids, problems, made = set(), [], False
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(Problem(line, "bad_tool_call", f'{where}[{j}] must be {{"type": "function", '
                                                           '"function": {"name": ..., "arguments": "{...}"}}'))
            continue
        made = True
        if isinstance(call.get("id"), str):
            ids.add(call["id"])
        if declared is None or name not in declared:
            problems.append(Problem(line, "undeclared_tool", f"{where}[{j}] calls {name!r}, " + (
                "but the record declares no tools (add 'tools')" if declared is None else
                f"which 'tools' does not declare ({', '.join(sorted(declared))})")))
        problems += _check_arguments(function.get("arguments"), f"{where}[{j}]", line)
    return (ids if made else None), problems


def _check_arguments(arguments, where: str, line: int) -> list[Problem]:
    if isinstance(arguments, dict):
        return []  # already an object (some datasets store it parsed)
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError as e:
        return [Problem(line, "bad_arguments", f"{where}.function.arguments is not JSON: {e}")]
    if not isinstance(value, dict):
        return [Problem(line, "bad_arguments", f"{where}.function.arguments must be a JSON object (as a string), got "
                                               f"{type(value if isinstance(arguments, str) else arguments).__name__}")]
    return []


def _check_fields(obj: dict, line: int, keys: tuple[str, ...]) -> list[Problem]:
    problems = []
    for key in keys:
        value = obj.get(key)
        if key not in obj:
            problems.append(Problem(line, "missing_field", f"missing '{key}'"))
        elif not isinstance(value, str):
            problems.append(Problem(line, "not_string", f"'{key}' must be a string, got {type(value).__name__}"))
        elif not value.strip() and key != "prompt":
            problems.append(Problem(line, "empty_content", f"'{key}' is empty"))
    unknown = set(obj) - set(keys)
    if unknown:
        problems.append(Problem(line, "unknown_key", f"unknown keys {sorted(unknown)}; expected {', '.join(keys)}"))
    return problems


CHECKS = {
    "chat": lambda obj, line: _check_chat(obj, line),
    "prompt_completion": lambda obj, line: _check_fields(obj, line, ("prompt", "completion")),
    "text": lambda obj, line: _check_fields(obj, line, ("text",)),
}


KINDS = "a .jsonl, .json or .parquet file, or a folder a datasets.Dataset was saved to (save_to_disk)"


def check_path(path: Path, what: str = "data file") -> Path:
    """`path` if it can be a data file (a .jsonl, .json or .parquet file, or a `save_to_disk` folder); `what` names
    it in messages (the option it came from)."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"{what} {path} does not exist; pass {KINDS}")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise EdgeftError(f"{what} {path} is a DatasetDict (splits: {', '.join(map(str, splits))}); pass one "
                              f"split's folder, e.g. {path / (splits[0] if splits else 'train')}")
        if not (path / "state.json").is_file():
            raise EdgeftError(f"{what} {path} is a directory but not a saved dataset (no state.json); pass {KINDS}")
        return path
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise EdgeftError(f"{what} {path}: expected {KINDS}, got '{path.suffix or 'no extension'}'")
    return path


def parse_columns(text: str | None) -> dict[str, str]:
    """'messages=conversations,prompt=question' as {format's name: the file's name}, checked."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in str(text).split(","):
        ours, sep, theirs = (x.strip() for x in part.partition("="))
        if not sep or not theirs or ours not in FIELDS:
            raise EdgeftError(f"--columns {text!r}: give NAME=COLUMN pairs separated by commas, NAME one of "
                              f"{', '.join(FIELDS)} (e.g. messages=conversations or prompt=question,completion=answer)")
        out[ours] = theirs
    return out


FIELDS = ("messages", "tools", "prompt", "completion", "text")


def _mapped(obj, columns: dict[str, str], table: bool):
    """A record with the file's names mapped to the format's; from a table, only the format's columns, and no
    null values (a table's struct column gives every message every key, null where a message lacks it)."""
    if not isinstance(obj, dict):
        return obj
    if columns:
        obj = dict(obj)
        for ours, theirs in columns.items():
            if theirs in obj:
                obj[ours] = obj.pop(theirs)
    if not table:
        return obj
    obj = {k: v for k, v in obj.items() if k in FIELDS and v is not None}
    if isinstance(obj.get("messages"), list):
        obj["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                           for m in obj["messages"]]
    return obj


def _rows(path: Path) -> list[tuple[int, object]]:
    """The rows of a .parquet file or a saved dataset, as (row from 1, record)."""
    try:
        if path.is_dir():
            from datasets import load_from_disk

            rows = load_from_disk(str(path)).to_list()
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
    except ImportError as e:
        raise EdgeftError(f"{path}: reading {'saved datasets' if path.is_dir() else 'Parquet'} needs {e.name}: "
                          "pip install 'edgeft[data]'") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's and datasets' errors for a damaged or foreign file
        raise EdgeftError(f"{path}: cannot be read as {'a saved dataset' if path.is_dir() else 'Parquet'}: "
                          f"{type(e).__name__}: {e}") from None
    if not rows:
        raise EdgeftError(f"{path} has no rows")
    return list(enumerate(rows, start=1))


def _open_checked(path: Path) -> bytes:
    raw = check_path(path).read_bytes()
    if not raw.strip():
        raise EdgeftError(f"{path} is empty; it needs one JSON object per line")
    return raw


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark (Windows editors write one); harmless, so accepted
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EdgeftError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None


def _objects(text: str, path: Path, result: ReadResult) -> list[tuple[int, object]]:
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EdgeftError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except RecursionError:
            raise EdgeftError(f"{path}: nested too deeply to be a data file (records are a few levels deep)") from None
        if not isinstance(data, list):
            raise EdgeftError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
        return [(i + 1, obj) for i, obj in enumerate(data)]  # "line" = position in the list
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            result.problems.append(Problem(n, "line_too_long", f"line is {len(line) / 2**20:.0f} MB; at most "
                                                               f"{MAX_LINE_BYTES // 2**20} MB per record"))
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            result.problems.append(Problem(n, "not_json", f"not valid JSON: {e.msg} (column {e.colno})"))
        except RecursionError:
            result.problems.append(Problem(n, "too_deep", "nested too deeply to be a record"))
    return out


def read(path: Path, columns: dict[str, str] | None = None) -> ReadResult:
    """Every record and every problem; raises EdgeftError only when the file is unusable as a whole. `columns`:
    the format's names mapped to the file's (parse_columns)."""
    path = Path(path)
    result = ReadResult(path)
    table = check_path(path).is_dir() or path.suffix == ".parquet"
    objects = _rows(path) if table else _objects(_decode(_open_checked(path), path), path, result)
    objects = [(line, _mapped(obj, columns or {}, table)) for line, obj in objects]
    formats: Counter[str] = Counter()
    first_line: dict[str, int] = {}
    for line, obj in objects:
        if not isinstance(obj, dict):
            result.problems.append(Problem(line, "not_object", f"expected a JSON object, got {type(obj).__name__}"))
            continue
        fmt = _format_of(obj)
        if fmt is None:
            result.problems.append(Problem(line, "unknown_format",
                                           f"no 'messages', 'prompt'/'completion' or 'text' key (keys: {sorted(obj)})"))
            continue
        formats[fmt] += 1
        first_line.setdefault(fmt, line)
        problems = CHECKS[fmt](obj, line)
        result.problems.extend(problems)
        if not problems:
            result.records.append(Record(line, fmt, obj))
    if formats:
        result.format = formats.most_common(1)[0][0]
    if len(formats) > 1:
        for fmt in formats:
            if fmt != result.format:
                lines = [r.line for r in result.records if r.format == fmt]
                lines += [ln for ln, o in objects if isinstance(o, dict) and _format_of(o) == fmt and ln not in lines]
                shown = ", ".join(map(str, sorted(set(lines))[:10]))
                result.problems.append(Problem(first_line[fmt], "mixed_formats",
                                               f"{formats[fmt]} {fmt} record(s) in a {result.format} file "
                                               f"(lines {shown}); use one format per file"))
        result.records = [r for r in result.records if r.format == result.format]
    return result
