"""The bundle's README: how an app loads it, and how it switches adapters."""

from __future__ import annotations

USAGE = """# {name}

An ONNX Runtime GenAI model ({precision}, {ep}) packaged by edgeft {version}. Load it in an app:

```python
import onnxruntime_genai as og

model = og.Model("{name}")
tokenizer = og.Tokenizer(model)
stream = tokenizer.create_stream()
prompt = tokenizer.apply_chat_template('[{{"role": "user", "content": "turn on the porch light"}}]',
                                       add_generation_prompt=True)
params = og.GeneratorParams(model)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
print()
```

{prompting}Or from a shell: `edgeft chat {name}`. `manifest.json` lists every file with its sha256, the source model
and adapter, the build settings, the chat defaults and the verification figures.
"""

SYSTEM = """The chat template adds the system prompt the model was fine-tuned with (`system_prompt.txt`) when the
messages bring none, and generation stops at the model's end tokens within `genai_config.json`'s max_length
(the training sequence length). A script that always sends its own system prompt needs this one, e.g.
onnxruntime-genai's example: `python model-qa.py -m {name} -e cpu -sp "$(cat {name}/system_prompt.txt)"`.

"""



ADAPTER_USAGE = """
## Swappable adapters ({names})

The base model's LoRA branches are inputs; with no adapter active it is the base model. Switch per
generator:

```python
adapters = og.Adapters(model)
adapters.load("adapters/NAME.onnx_adapter", "NAME")
generator = og.Generator(model, params)
generator.set_active_adapter(adapters, "NAME")
```
"""



def readme(name: str, precision: str, ep: str, version: str, adapters: list[str], system: str | None = None) -> str:
    """The bundle's README: loading it in an app (prompted as trained, `system`), and switching its adapters when it
    ships them."""
    prompting = SYSTEM.format(name=name) if system else ""
    return USAGE.format(name=name, precision=precision, ep=ep, version=version, prompting=prompting) + (
        ADAPTER_USAGE.format(names=", ".join(adapters)) if adapters else "")
