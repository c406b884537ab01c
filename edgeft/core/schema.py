"""Typed configs from plain dicts (YAML, JSON, command-line options), with every problem collected and
reported at once.

A config is a frozen dataclass. Field constraints live in the field's metadata, next to its doc:
`doc`, `choices`, `min`, `max` (inclusive), `gt` (exclusive lower bound). Unknown keys are an error
that lists the accepted ones. This is the one place numbers are validated: every number must be finite
(NaN passes every `x > limit` test, so it is refused first), then in range. Values echoed in a message
are cut short, so a huge one never floods the terminal.

`load_yaml` reads a YAML file (a recipe, a device profile) as untrusted input: UTF-8, a size limit, and
no alias that expands past a limit (a "billion laughs" document would otherwise eat memory).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgeft.core.errors import ConfigError, EdgeftError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def spec(doc: str, default: Any = _MISSING, *, default_factory: Any = _MISSING, **constraints: Any) -> Any:
    """A dataclass field with its documentation and constraints."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, **constraints}}
    if default is not _MISSING:
        kwargs["default"] = default
    if default_factory is not _MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def parse(cls: type[T], data: Any, source: str, strict: bool = True) -> T:
    """Build `cls` from `data`; raise ConfigError naming `source`, each bad field and what is accepted. Not
    `strict`: keys `cls` does not know are ignored (a record written by another version of edgeft)."""
    problems: list[str] = []
    value = _convert(cls, data, "", problems, strict)
    if problems:
        raise ConfigError(source, problems)
    return value


def to_dict(obj: Any, keep_none: bool = False) -> Any:
    """The plain-dict form of a config: what `parse` reads back, with None fields left out (unless `keep_none`)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is not None or keep_none:
                out[f.name] = to_dict(v, keep_none)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, keep_none) for v in obj]
    return obj


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: messages name a bad value without echoing a huge one."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, problems: list[str], strict: bool = True) -> Any:
    """`value` as type `tp` (a dataclass, list, dict, optional, or scalar), its problems appended at `path`."""
    where = path or "(top level)"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path, problems, strict)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {short(value)}")
            return None
        return _build_dataclass(tp, value, path, problems, strict)
    if origin is list or tp is dict or origin is dict:
        return _collection(tp, value, path, problems, strict)
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](value, where, problems)
    raise TypeError(f"schema: unsupported field type {tp!r} at {where}")


def _collection(tp: Any, value: Any, path: str, problems: list[str], strict: bool) -> Any:
    """A list or a mapping, each item converted."""
    where = path or "(top level)"
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_type_name(tp)}, got {short(value)}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]", problems, strict) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {short(value)}")
        return None
    if not typing.get_args(tp):
        return value
    value_tp = typing.get_args(tp)[1]
    return {k: _convert(value_tp, v, f"{path}.{k}", problems, strict) for k, v in value.items()}


def _boolean(value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        problems.append(f"{where}: expected true or false, got {short(value)}")
    return value


def _integer(value: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}: expected an integer, got {short(value)}")
    return value


def _number(value: Any, where: str, problems: list[str]) -> Any:
    """A float, refused unless finite: NaN passes every `x > limit` test, so it is refused before any range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}: expected a number, got {short(value)}")
        return value
    try:
        value = float(value)
    except OverflowError:  # an integer past float's range
        value = math.inf
    if not math.isfinite(value):
        problems.append(f"{where}: {value!r} is not a finite number; pass a number such as 0.001")
    return value


def _string(value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, str):
        problems.append(f"{where}: expected a string, got {short(value)}")
    return value


_SCALARS = {bool: _boolean, int: _integer, float: _number, str: _string}


def _check_constraints(meta: dict, value: Any, where: str, problems: list[str]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                problems.append(f"{where}: {short(item)} is not accepted; accepted: {', '.join(map(str, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{where}: {value!r} is below the minimum {meta['min']}")
        if "gt" in meta and value <= meta["gt"]:
            problems.append(f"{where}: {value!r} must be greater than {meta['gt']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{where}: {value!r} is above the maximum {meta['max']}")


def _build_dataclass(cls: Any, data: dict, path: str, problems: list[str], strict: bool) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data if strict else ():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{prefix}{short(key) if not isinstance(key, str) or len(key) > 60 else key}: unknown key{hint}; "
                f"accepted keys here: {', '.join(fields)}"
            )
    kwargs = {}
    n_before = len(problems)
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                problems.append(f"{where}: missing; expected {_type_name(hints[name])} ({f.metadata.get('doc', '')})")
            continue
        value = _convert(hints[name], data[name], where, problems, strict)
        _check_constraints(dict(f.metadata), value, where, problems)
        kwargs[name] = value
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(f"{prefix}{p}" for p in e.problems)
        return None


def section(cls: type, name: str) -> type:
    """A recipe section made of the fields of config `cls` whose metadata says `recipe="NAME.key"`: the same type,
    default, doc and constraints, under the recipe's key. The option is declared once, on `cls`."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        where = f.metadata.get("recipe", "")
        if where.partition(".")[0] != name:
            continue
        kwargs = {"metadata": f.metadata}
        if f.default is not _MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not _MISSING:
            kwargs["default_factory"] = f.default_factory
        fields.append((where.partition(".")[2], hints[f.name], dataclasses.field(**kwargs)))
    return dataclasses.make_dataclass(f"{name.title()}Section", fields, frozen=True)


def gather(cls: type[T], sections: dict[str, Any], **given: Any) -> T:
    """`cls` from the recipe sections `section` made of it (and `given` fields)."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        name, _, key = f.metadata.get("recipe", "").partition(".")
        if name in sections and f.name not in given:
            values[f.name] = getattr(sections[name], key)
    return cls(**values)


def check(problems: list[str], ok: bool, message: str) -> None:
    """Collect a cross-field problem (for `__post_init__`, which raises them together)."""
    if not ok:
        problems.append(message)


def raise_if(problems: list[str], source: str = "config") -> None:
    if problems:
        raise ConfigError(source, problems)


MAX_YAML_BYTES = 1 << 20  # a recipe or a profile is a few kB
MAX_YAML_NODES = 100_000  # values after alias expansion; the largest shipped file has a few hundred


def load_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`, read as untrusted input. `what` names the file in messages ("recipe")."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise EdgeftError(f"{what} {path} is a folder; pass the YAML file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise EdgeftError(f"{what} {path} is {size:,} bytes; a {what} is a small YAML file (at most "
                          f"{MAX_YAML_BYTES:,} bytes). Check that you passed the right file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EdgeftError(f"{what} {path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
            raise EdgeftError(f"{what} {path}: its aliases expand to more than {MAX_YAML_NODES:,} values; a {what} "
                              "never needs that many. Write the values out, or use fewer aliases")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EdgeftError(f"{what} {path} is not valid YAML: {str(e)[:500]}") from None
    except RecursionError:
        raise EdgeftError(f"{what} {path} is nested too deeply to be a {what}") from None


def _expanded_nodes(root) -> int:
    """How many nodes the document has once every alias is expanded (each node counted as often as it is reached),
    computed once per distinct node (iteratively, children first), so that the count itself stays cheap. A node
    that contains itself expands without end."""
    import yaml

    def children(node) -> list:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [x for pair in node.value for x in pair]
        return []

    limit = MAX_YAML_NODES + 1
    counts: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            open_nodes.discard(id(node))
            counts[id(node)] = min(1 + sum(counts[id(c)] for c in children(node)), limit)
            continue
        if id(node) in counts:
            continue
        if id(node) in open_nodes:  # reached again before it was finished: it contains itself
            return limit
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in counts)
    return counts[id(root)]
