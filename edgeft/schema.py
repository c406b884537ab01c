"""Typed configs from plain dicts (YAML, JSON), with every problem collected and reported at once.

A config is a frozen dataclass. Field constraints live in the field's metadata, next to its doc:
`doc`, `choices`, `min`, `max` (inclusive), `gt` (exclusive lower bound). Unknown keys are an error
that lists the accepted ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from edgeft.errors import ConfigError

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


def parse(cls: type[T], data: Any, source: str) -> T:
    """Build `cls` from `data`; raise ConfigError naming `source`, each bad field and what is accepted."""
    problems: list[str] = []
    value = _convert(cls, data, "", problems)
    if problems:
        raise ConfigError(source, problems)
    return value


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a config: what `parse` reads back, with None fields left out."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is not None:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    where = path or "(top level)"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return _build_dataclass(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema: unsupported field type {tp!r} at {where}")


def _check_constraints(meta: dict, value: Any, where: str, problems: list[str]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                problems.append(f"{where}: {item!r} is not accepted; accepted: {', '.join(map(str, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{where}: {value!r} is below the minimum {meta['min']}")
        if "gt" in meta and value <= meta["gt"]:
            problems.append(f"{where}: {value!r} must be greater than {meta['gt']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{where}: {value!r} is above the maximum {meta['max']}")


def _build_dataclass(cls: Any, data: dict, path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{prefix}{key}: unknown key{hint}; accepted keys here: {', '.join(fields)}"
            )
    kwargs = {}
    n_before = len(problems)
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                problems.append(f"{where}: missing; expected {_type_name(hints[name])} ({f.metadata.get('doc', '')})")
            continue
        value = _convert(hints[name], data[name], where, problems)
        _check_constraints(dict(f.metadata), value, where, problems)
        kwargs[name] = value
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(f"{prefix}{p}" for p in e.problems)
        return None


def check(problems: list[str], ok: bool, message: str) -> None:
    """Collect a cross-field problem (for `__post_init__`, which raises them together)."""
    if not ok:
        problems.append(message)


def raise_if(problems: list[str], source: str = "config") -> None:
    if problems:
        raise ConfigError(source, problems)
