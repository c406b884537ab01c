"""The bundle's chat defaults: how the fine-tuned model must be prompted, carried by the bundle itself.

A model fine-tuned with a system prompt answers well only with it. The bundle's chat template renders that
prompt when a conversation brings no system message of its own (as Qwen2's template renders its default), so
an app's `apply_chat_template` with a user message alone, `edgeft chat`, and onnxruntime-genai's example
scripts reading the template all prompt the model as it was trained; `system_prompt.txt` holds it for a tool
that always sends a system message (`model-qa.py -sp "$(cat bundle/system_prompt.txt)"`). A model fine-tuned
to call tools gets, the same way, the tools its training records declared (when one declaration dominates), so
a request alone is answered with the calls. The generation length defaults to the training sequence length
(prompt and reply), and the stop tokens are genai_config's.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeft.core import atomic
from edgeft.core.errors import EdgeftError

DOMINANT = 0.5  # a system prompt in more than this share of the training records is the bundle's default
SYSTEM_FILE = "system_prompt.txt"


def tools_of(data_meta: dict) -> list | None:
    """The tools the training records declared, when one declaration is in most of them."""
    tools = data_meta.get("tools") or {}
    return tools["most_common"] if tools.get("most_common") and tools["share"] > DOMINANT else None


def choose(given: str | None, data_meta: dict) -> tuple[str | None, str]:
    """The default system prompt and where it came from: `given` (package --system; "" for none), else the
    training data's when it dominates."""
    if given is not None:
        return (given or None), "--system"
    prompts = data_meta.get("system_prompts")
    if prompts is None:  # tokenized before the data recorded it
        return None, "not recorded with the training data (tokenized by an older edgeft); pass --system"
    if prompts["most_common"] is not None and prompts["share"] > DOMINANT:
        return prompts["most_common"], f"the training data ({prompts['share']:.0%} of its chat records)"
    if prompts["distinct"]:
        return None, (f"the training data has {prompts['distinct']} system prompts, none in most records; "
                      "pass --system to choose one")
    return None, "the training data has no system prompt"


def _template_path(bundle: Path) -> tuple[Path, str | None]:
    """Where the bundle's chat template is: chat_template.jinja, or tokenizer_config.json's chat_template (None:
    the bundle has none)."""
    jinja = bundle / "chat_template.jinja"
    if jinja.is_file():
        return jinja, None
    config = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
    return bundle / "tokenizer_config.json", config.get("chat_template") if isinstance(
        config.get("chat_template"), str) else None


def jinja_literal(value) -> str:
    """`value` (JSON data) as a Jinja expression."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{jinja_literal(str(k))}: {jinja_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(jinja_literal(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return json.dumps(value, ensure_ascii=False)  # strings: the same escapes as JSON's; numbers


def with_defaults(template: str, system: str | None, tools: list | None = None) -> str:
    """`template`, rendering `system` first when the messages bring no system message, and declaring `tools` when
    the caller declares none."""
    head = ""
    if system is not None:
        head += ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
                 f"'content': {jinja_literal(system)}}}] + messages %}}{{%- endif %}}")
    if tools:
        head += f"{{%- if not tools %}}{{%- set tools = {jinja_literal(tools)} %}}{{%- endif %}}"
    return head + template


def _renders(template: str, messages: list[dict]) -> str:
    """`template` rendered as transformers renders it (a sandboxed Jinja environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **_: json.dumps(x, ensure_ascii=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token="", tools=None)


def apply(bundle: Path, system: str | None, source: str, seq_len: int | None, context: int | None,
          tools: list | None = None) -> dict:
    """Write the defaults into the bundle; what its manifest records of them."""
    config_path = bundle / "genai_config.json"
    genai = json.loads(config_path.read_text(encoding="utf-8"))
    if seq_len:
        genai["search"]["max_length"] = min(seq_len, context) if context else seq_len
        atomic.write_json(config_path, genai)
    eos = genai["model"].get("eos_token_id")
    out = {"system_prompt": system, "system_prompt_from": source, "max_length": genai["search"]["max_length"],
           "stop_token_ids": eos if isinstance(eos, list) else [eos],
           "tools": [t["function"]["name"] for t in tools] if tools else None}
    if system is None and not tools:
        return out
    path, template = _template_path(bundle)
    if path.suffix == ".jinja":
        template = path.read_text(encoding="utf-8")
    if template is None:
        raise EdgeftError("the model has no chat template, so the bundle cannot carry a system prompt; package "
                          "with --system '' (and prompt the model as it was trained)")
    user = [{"role": "user", "content": "hello"}]
    try:
        renders_system = system is None or system in _renders(template, [{"role": "system", "content": system}, *user])
    except Exception:  # noqa: BLE001 - a template that refuses system messages raises (raise_exception)
        renders_system = False
    if not renders_system:
        raise EdgeftError("the model's chat template does not render a system message, so the bundle cannot carry "
                          "one; package with --system ''")
    changed = with_defaults(template, system, tools)
    rendered = _renders(changed, user)
    if (system is not None and system not in rendered) or any(t["function"]["name"] not in rendered
                                                                for t in tools or []):
        raise EdgeftError("the bundle's chat template did not take the chat defaults (system prompt, tools); "
                          "package with --system ''")
    if path.suffix == ".jinja":
        atomic.write_text(path, changed)
    else:
        atomic.write_json(path, {**json.loads(path.read_text(encoding="utf-8")), "chat_template": changed})
    if system is None:
        return out
    atomic.write_text(bundle / SYSTEM_FILE, system)
    return out | {"system_prompt_file": SYSTEM_FILE}
