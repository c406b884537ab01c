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
params.set_search_options(max_length=256, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
```

Or from a shell: `edgeft chat {name}`. `manifest.json` lists every file with its sha256, the source model
and adapter, the build settings and the verification figures.
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



def readme(name: str, precision: str, ep: str, version: str, adapters: list[str]) -> str:
    """The bundle's README: loading it in an app, and switching its adapters when it ships them."""
    return USAGE.format(name=name, precision=precision, ep=ep, version=version) + (
        ADAPTER_USAGE.format(names=", ".join(adapters)) if adapters else "")
