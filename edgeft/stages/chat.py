"""chat: stream replies from a bundle, as an app runs it (with one of its swappable adapters active)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.data.calls import parse_calls
from edgeft.stages.bundle import context_length, generator, load_adapter, open_model


@dataclass(frozen=True)
class ChatConfig:
    max_new_tokens: int = spec("longest reply in tokens (capped at what the model's context leaves)", 256, min=1)
    system: str | None = spec("system prompt (default: the bundle's, the one the model was fine-tuned with)", None)
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
    bundle = _bundle_of(Path(bundle))
    session = _Session(bundle, _adapter_of(bundle, cfg.adapter), cfg)
    if prompt is not None:
        session.reply(prompt)
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
                session.reply(text)
            except EdgeftError as e:  # this prompt only: the session goes on
                print(f"error: {e}", file=sys.stderr)


def _bundle_of(path: Path) -> Path:
    """The bundle folder `path` names: itself, or a workspace's bundle/."""
    if not (path / "genai_config.json").is_file() and (path / "bundle" / "genai_config.json").is_file():
        path = path / "bundle"
    if not (path / "genai_config.json").is_file():
        raise EdgeftError(f"{path} is not an ONNX Runtime GenAI bundle (no genai_config.json); "
                          "build one with `edgeft package WS`")
    return path


def _adapter_of(bundle: Path, adapter: str | None) -> Path | None:
    """The .onnx_adapter file `adapter` names (a name the bundle ships, or a file); None says which it ships."""
    shipped = sorted(p.stem for p in (bundle / "adapters").glob("*.onnx_adapter"))
    if adapter is None:
        if shipped:
            print(f"chat: the base model, no adapter active; this bundle ships {', '.join(shipped)} "
                  f"(--adapter {shipped[0]})", file=sys.stderr)
        return None
    path = Path(adapter) if adapter.endswith(".onnx_adapter") else bundle / "adapters" / f"{adapter}.onnx_adapter"
    if not path.is_file():
        raise EdgeftError(f"no adapter {adapter!r} in {bundle}: "
                          + (f"it ships {', '.join(shipped)}" if shipped else "it was built without adapters "
                             "(`edgeft package WS --adapters`)"))
    return path


class _Session:
    """A loaded bundle (with its adapter active) that answers prompts, streaming the reply."""

    def __init__(self, bundle: Path, adapter: Path | None, cfg: ChatConfig):
        import onnxruntime_genai as og

        self.cfg, self.context, self.warned = cfg, context_length(bundle), set()
        self.model = open_model(bundle)
        self.tok = og.Tokenizer(self.model)
        self.active = load_adapter(self.model, adapter) if adapter is not None else None

    def reply(self, text: str) -> None:
        import onnxruntime_genai as og

        ids = self.tok.encode(self._rendered(text))
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=_reply_length(len(ids), self.cfg.max_new_tokens, self.context,
                                                           self.warned), do_sample=False)
        gen = generator(self.model, params, self.active)
        gen.append_tokens(ids)
        new: list[int] = []
        shown = ""
        while not gen.is_done():  # decode the whole reply each step and print what is new: exact for any tokenizer
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
            text_now = self.tok.decode(np.asarray(new, dtype=np.int32))
            if text_now.startswith(shown) and not text_now.endswith("\ufffd"):
                print(text_now[len(shown):], end="", flush=True)
                shown = text_now
        print()
        for call in parse_calls(shown):  # a model fine-tuned to call tools: what an app would run
            print(f"call: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})", file=sys.stderr)

    def _rendered(self, text: str) -> str:
        system = self.cfg.system
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        try:
            return self.tok.apply_chat_template(json.dumps(turns), add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a bundle without a chat template: send the text as it is
            return text
