import numpy as np
import pytest

from edgeft.core.errors import EdgeftError
from edgeft.data import tokenize
from edgeft.data.formats import Record
from tests.tiny_models import build_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "turn on the kitchen lights"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "lock the front door"},
    {"role": "assistant", "content": "done"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def marked(tok, enc):
    """The decoded sequence with trained tokens in [brackets]."""
    return "".join(f"[{tok.decode([int(i)])}]" if m else tok.decode([int(i)])
                   for i, m in zip(enc.input_ids, enc.loss_mask, strict=True))


def test_multi_turn_mask_token_by_token(tok):
    enc = tokenize.encode(tok, Record(1, "chat", {"messages": MULTI_TURN}))
    trained = [tok.decode([int(i)]) for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m]
    # Phi-3's template has no generation markers: the answers, their <|end|> and newline, and the final EOS
    assert trained == ["o", "k", "<|end|>", "\n", "d", "on", "e", "<|end|>", "\n", "</s>"]
    assert marked(tok, enc) == (
        "<|system|>\nbe brief<|end|>\n<|user|>\nturn on the kitchen lights<|end|>\n<|assistant|>\n"
        "[o][k][<|end|>][\n]<|user|>\nlock the front door<|end|>\n<|assistant|>\n[d][on][e][<|end|>][\n][</s>]")


def test_weight_zero_turn_is_not_trained(tok):
    msgs = [dict(m) for m in MULTI_TURN]
    msgs[2]["weight"] = 0
    enc = tokenize.encode(tok, Record(1, "chat", {"messages": msgs}))
    assert "[o][k]" not in marked(tok, enc) and "[d][on][e]" in marked(tok, enc)


def test_train_on_prompt_trains_everything_but_the_first(tok):
    enc = tokenize.encode(tok, Record(1, "chat", {"messages": MULTI_TURN}), train_on_prompt=True)
    assert not enc.loss_mask[0] and enc.loss_mask[1:].all()


def test_prompt_completion_and_text(tok):
    enc = tokenize.encode(tok, Record(1, "prompt_completion", {"prompt": "lock the door", "completion": " done"}))
    n_prompt = len(tok("lock the door")["input_ids"])
    assert not enc.loss_mask[:n_prompt].any() and enc.loss_mask[n_prompt:].all()
    assert enc.input_ids[-1] == tok.eos_token_id
    text = tokenize.encode(tok, Record(1, "text", {"text": "turn on the lights"}))
    assert text.loss_mask[1:].all() and text.input_ids[-1] == tok.eos_token_id


def test_template_that_rejects_a_record(tok):
    strict = build_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]
    records = [Record(1, "chat", {"messages": good}), Record(2, "chat", {"messages": bad})]
    encoded, problems, _ = tokenize.encode_all(strict, records, 100)
    assert len(encoded) == 1
    assert [(p.line, p.kind) for p in problems] == [(2, "template_rejected")]
    assert "roles must alternate" in problems[0].message


def test_truncation_policies_are_counted(tok):
    records = [Record(i, "text", {"text": "turn on the kitchen lights " * n}) for i, n in enumerate([1, 5, 9], 1)]
    kept, _, stats = tokenize.encode_all(tok, records, 20, "drop")
    assert [e.line for e in kept] == [1] and stats["dropped"] == 2 and stats["over_length"] == 2
    kept, _, stats = tokenize.encode_all(tok, records, 20, "right")
    assert [len(e.input_ids) for e in kept][1:] == [20, 20] and stats["truncated"] == 2
    assert all(isinstance(e.input_ids, np.ndarray) for e in kept)


TOOLS = [{"type": "function", "function": {"name": "light_turn_on", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "lock_lock", "parameters": {"type": "object"}}}]
CALLS = [{"id": "c1", "type": "function", "function": {"name": "light_turn_on", "arguments": '{"entity_id": "l.p"}'}},
         {"id": "c2", "type": "function", "function": {"name": "lock_lock", "arguments": "{}"}}]


def test_tool_calls_train_the_calls_and_the_answer_not_the_results(tok):
    """The template renders the tools' names, each call as <tool_call>{"name", "arguments"}</tool_call> (arguments as an
    object, from the record's JSON string), and the results as their own turn; the loss covers the assistant's
    parallel calls and its answer, not the declarations, the request or the results."""
    msgs = [{"role": "user", "content": "porch on, lock up"}, {"role": "assistant", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "c1", "content": "on"}, {"role": "tool", "tool_call_id": "c2",
                                                                       "content": "locked"},
            {"role": "assistant", "content": "done"}]
    enc = tokenize.encode(tok, Record(1, "chat", {"messages": msgs, "tools": TOOLS}))
    text = marked(tok, enc)
    assert text.startswith("<|tools|>\nlight_turn_on\nlock_lock\n<|end|>\n<|user|>\nporch on, lock up<|end|>")
    trained = "".join(tok.decode([int(i)]) for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m)
    assert trained == ('<tool_call>{"name": "light_turn_on", "arguments": {"entity_id": "l.p"}}</tool_call>'
                       '<tool_call>{"name": "lock_lock", "arguments": {}}</tool_call><|end|>\ndone<|end|>\n</s>')
    assert "<|tool|>\non<|end|>\n<|tool|>\nlocked<|end|>\n<|assistant|>\n[d]" in text


def test_a_template_without_function_calling_is_refused(tok):
    phi3 = build_tokenizer()
    phi3.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    record = Record(1, "chat", {"messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "tool_calls": CALLS[:1]}], "tools": TOOLS})
    with pytest.raises(EdgeftError, match="does not render function calling .the tools or calls light_turn_on"):
        tokenize.encode(phi3, record)
