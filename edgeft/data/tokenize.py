"""Tokenize records with the model's own tokenizer and chat template, and mark which tokens carry loss.

Assistant-only loss must work for templates without `{% generation %}` markers (Phi-3's has none), so the
mask comes from the template itself: for assistant turn i, render messages[:i] with the generation prompt
(where the answer starts) and messages[:i+1] (where it ends, including the template's end marker, and its
EOS when the answer is the last turn); their spans in the full rendering, mapped through the fast
tokenizer's character offsets, are the tokens that train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgeft.core.errors import EdgeftError
from edgeft.data.calls import arguments
from edgeft.data.formats import Problem, Record

TRUNCATION = ("drop", "right")


@dataclass
class Encoded:
    line: int
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # bool: token is a target (its prediction from the previous position is trained)


def load_tokenizer(model_dir: os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"cannot load the tokenizer of {model_dir} (training and packaging need it: copy "
                          f"tokenizer.json and tokenizer_config.json from the model's download): {e}") from None
    if not getattr(tok, "is_fast", False):
        raise EdgeftError(f"{model_dir}: edgeft needs a fast tokenizer (tokenizer.json) for character offsets")
    return tok


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tok, messages, add_generation_prompt: bool, tools: list | None = None) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def template_message(m: dict) -> dict:
    """A record's message as chat templates take it: a call's arguments as an object (the OpenAI format has them
    as a JSON string; templates write them with `tojson`), content "" beside calls alone."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": {
            "name": c["function"]["name"], "arguments": arguments(c["function"].get("arguments"))}}
            for c in m["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if key in m:
            out[key] = m[key]
    return out


def _check_renders_tools(full: str, tools: list | None, messages: list[dict]) -> None:
    """Refuse a template that drops the tools or the calls (a template without function calling ignores them)."""
    names = [t["function"]["name"] for t in tools or []]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    if missing := [n for n in dict.fromkeys(names) if n not in full]:
        raise EdgeftError(f"the model's chat template does not render function calling (the tools or calls "
                          f"{', '.join(missing[:3])} vanish from the prompt); train tool calls with a model whose "
                          "template renders `tools` and `tool_calls` (Qwen2.5, Llama 3.2, edgeft's demo base), or "
                          "write the calls into the assistant's content")


def chat_spans(tok, messages: list[dict], train_on_prompt: bool,
               tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans that carry loss (assistant turns, their tool calls included)."""
    plain = [template_message(m) for m in messages]
    full = _render(tok, plain, False, tools)
    if tools or any("tool_calls" in m for m in plain):
        _check_renders_tools(full, tools, plain)
    if train_on_prompt:
        return full, [(0, len(full))]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = _render(tok, plain[:i], True, tools) if i else ""
        through = _render(tok, plain[: i + 1], False, tools)
        if not full.startswith(before):
            raise ValueError("the chat template renders earlier turns differently once later turns are added, "
                             "so the assistant tokens cannot be located")
        end = _common_prefix(through, full)
        eos = tok.eos_token or ""
        if eos and end < len(through) and through.endswith(eos):  # a later turn follows: not the EOS, nor a first
            end = min(end, len(through) - len(eos))               # character the next turn shares with it
        spans.append((len(before), end))
    return full, spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), dtype=bool)
    for i, (start, end) in enumerate(offsets):
        if end > start and any(a <= start and end <= b for a, b in spans):
            mask[i] = True
    return mask


def encode(tok, record: Record, train_on_prompt: bool = False) -> Encoded:
    data = record.data
    if record.format == "chat":
        if tok.chat_template is None:
            raise EdgeftError("chat data needs a tokenizer with a chat template (tokenizer_config.json "
                              "'chat_template' or chat_template.jinja); use prompt/completion data instead")
        text, spans = chat_spans(tok, data["messages"], train_on_prompt, data.get("tools"))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask = enc["input_ids"], _mask_from_spans(enc["offset_mapping"], spans)
    elif record.format == "prompt_completion":
        prompt = tok(data["prompt"], add_special_tokens=True)["input_ids"]
        completion = tok(data["completion"], add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids = prompt + completion + eos
        mask = np.array([train_on_prompt] * len(prompt) + [True] * (len(completion) + len(eos)), dtype=bool)
    else:
        ids = tok(data["text"], add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        mask = np.ones(len(ids), dtype=bool)
    mask[0] = False  # the first token is never predicted
    return Encoded(record.line, np.asarray(ids, dtype=np.int32), mask)


def encode_all(tok, records: list[Record], seq_len: int, truncation: str = "drop",
               train_on_prompt: bool = False) -> tuple[list[Encoded], list[Problem], dict]:
    """Encode records; over-long ones are dropped or cut at the right, and counted either way."""
    if truncation not in TRUNCATION:
        raise EdgeftError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATION)}")
    out, problems = [], []
    stats = {"over_length": 0, "dropped": 0, "truncated": 0, "no_target_after_truncation": 0, "policy": truncation}
    for record in records:
        try:
            enc = encode(tok, record, train_on_prompt)
        except EdgeftError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja TemplateError and friends: the template rejects this record
            problems.append(Problem(record.line, "template_rejected", f"the chat template rejects this record: {e}"))
            continue
        if len(enc.input_ids) > seq_len:
            stats["over_length"] += 1
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            enc = Encoded(enc.line, enc.input_ids[:seq_len], enc.loss_mask[:seq_len])
            stats["truncated"] += 1
            if not enc.loss_mask.any():
                stats["no_target_after_truncation"] += 1
                continue
        out.append(enc)
    return out, problems, stats
