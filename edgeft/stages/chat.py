"""chat: stream replies from a bundle, as an app runs it (with one of its swappable adapters active)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.stages.bundle import context_length, generator, load_adapter, open_model


@dataclass(frozen=True)
class ChatConfig:
    max_new_tokens: int = spec("longest reply in tokens (capped at what the model's context leaves)", 256, min=1)
    system: str | None = spec("system prompt (use the one the model was fine-tuned with)", None)
    adapter: str | None = spec("a swappable adapter of the bundle to chat with (its name, or an .onnx_adapter file)",
                               None)



def _reply_length(prompt_tokens: int, wanted: int, context: int | None, warned: set) -> int:
    """The generator's max_length for a prompt: prompt plus `wanted` new tokens, capped at the context (said once);
    a prompt that fills the context is refused."""
    if context is None:
        return prompt_tokens + wanted
    if prompt_tokens >= context:
        raise EdgeftError(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: nothing is "
                          "left for a reply; shorten the prompt (or the system prompt)")
    if prompt_tokens + wanted > context and "cap" not in warned:
        warned.add("cap")
        print(f"chat: replies are capped at {context - prompt_tokens} tokens: the model's context is {context} tokens "
              f"(--max-new-tokens {wanted})", file=sys.stderr)
    return min(prompt_tokens + wanted, context)



def chat(bundle: Path, prompt: str | None = None, cfg: ChatConfig = ChatConfig()) -> None:
    """Stream replies from a packaged model (one prompt, or an interactive loop). `bundle` may be a workspace
    (its bundle/); `cfg.adapter` names one of the bundle's `.onnx_adapter` files (a name or a path)."""
    import onnxruntime_genai as og

    bundle = Path(bundle)
    if not (bundle / "genai_config.json").is_file() and (bundle / "bundle" / "genai_config.json").is_file():
        bundle = bundle / "bundle"
    if not (bundle / "genai_config.json").is_file():
        raise EdgeftError(f"{bundle} is not an ONNX Runtime GenAI bundle (no genai_config.json); "
                          "build one with `edgeft package WS`")
    shipped = sorted(p.stem for p in (bundle / "adapters").glob("*.onnx_adapter"))
    adapter_file = None
    if (adapter := cfg.adapter) is not None:
        adapter_file = Path(adapter) if adapter.endswith(".onnx_adapter") else bundle / "adapters" / f"{adapter}.onnx_adapter"
        if not adapter_file.is_file():
            raise EdgeftError(f"no adapter {adapter!r} in {bundle}: "
                              + (f"it ships {', '.join(shipped)}" if shipped else "it was built without adapters "
                                 "(`edgeft package WS --adapters`)"))
    elif shipped:
        print(f"chat: the base model, no adapter active; this bundle ships {', '.join(shipped)} "
              f"(--adapter {shipped[0]})", file=sys.stderr)
    context = context_length(bundle)
    model = open_model(bundle)
    tok = og.Tokenizer(model)
    active = load_adapter(model, adapter_file) if adapter_file is not None else None
    warned: set = set()

    def reply(text: str) -> None:
        turns = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": text}]
        messages = json.dumps(turns)
        try:
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a bundle without a chat template: send the text as it is
            rendered = text
        ids = tok.encode(rendered)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=_reply_length(len(ids), cfg.max_new_tokens, context, warned),
                                  do_sample=False)
        gen = generator(model, params, active)
        gen.append_tokens(ids)
        new: list[int] = []
        shown = ""
        while not gen.is_done():  # decode the whole reply each step and print what is new: exact for any tokenizer
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
            text_now = tok.decode(np.asarray(new, dtype=np.int32))
            if text_now.startswith(shown) and not text_now.endswith("\ufffd"):
                print(text_now[len(shown):], end="", flush=True)
                shown = text_now
        print()

    if prompt is not None:
        reply(prompt)
        return
    while True:
        try:
            text = input("> ")
        except EOFError:
            return
        except UnicodeDecodeError:
            raise EdgeftError("standard input is not UTF-8 text; type or pipe UTF-8 prompts") from None
        if text.strip():
            try:
                reply(text)
            except EdgeftError as e:  # this prompt only: the session goes on
                print(f"error: {e}", file=sys.stderr)

