"""Tool calls: a record's (OpenAI's format) and a model's reply's."""

from __future__ import annotations

import json


def arguments(value) -> dict:
    """A call's arguments as an object (the OpenAI format's JSON string, or an object already)."""
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def parse_calls(text: str) -> list[dict]:
    """The tool calls in a reply: every JSON object in it with a "name" and "arguments" (or Llama's
    "parameters") object, as {"name", "arguments"}; whatever wraps them (<tool_call> tags, a list) is skipped."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        args = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if isinstance(value.get("name") if isinstance(value, dict) else None, str) and isinstance(args, dict):
            calls.append({"name": value["name"], "arguments": args})
            pos = end
        else:
            pos = start + 1
    return calls
