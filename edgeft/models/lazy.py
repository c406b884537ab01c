"""A base model whose frozen weights stay in the model folder's safetensors files until a stage needs them.

Phi-3-mini in fp32 is 15 GB: loading it whole, as `from_pretrained` does, rules out a 16 GB machine before
any work starts, and an 8 GB edge box entirely. Here the model is built with placeholder parameters: a
zero broadcast to the real shape (one element of memory; the real shape and dtype for PEFT and the ONNX
tracer). Each placeholder remembers its key in the safetensors files, and a stage loads only what it needs:

- prepare: LoRA's initialisation depends on shapes and the seed only. DoRA magnitudes, and whole modules
  to train, are computed from the real weights, one module at a time.
- export: the tracer needs shapes only. The weights are copied from the files into base.data one tensor
  at a time, and the PyTorch reference loads one decoder layer at a time (`streamed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from edgeft.core.errors import EdgeftError
from edgeft.models import families, shapes

STREAM_ABOVE = 4 * 2**30  # fp32 bytes of weights past which a stage's weights="auto" streams them
KEY = "_edgeft_key"  # on a placeholder: its tensor's name in the safetensors files
PLACEHOLDER = "_edgeft_placeholder"  # on a loaded parameter: the placeholder it replaced


class Shards:
    """The model folder's safetensors files, read one tensor at a time, as fp32."""

    def __init__(self, model_dir: Path):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in families.weight_files(model_dir):
            for key, info in families.safetensors_header(path).items():
                self.files[key] = path
                self.shapes[key] = tuple(info["shape"])

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as stored. Its file is opened for it alone: the file's mapped pages go when it closes."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)

    def read(self, key: str) -> torch.Tensor:
        return self.tensor(key).float()


def is_placeholder(p: torch.Tensor) -> bool:
    return hasattr(p, KEY)


def empty_model(model_dir: Path, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Shards]:
    """The causal LM of `model_dir` in fp32 with placeholder parameters (buffers, such as rotary tables, are
    real), and the files its weights are read from."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                                     trust_remote_code=trust_remote_code)
        # from_pretrained ties the embeddings (tie_word_embeddings). Outside the block: inside it, assigning a
        # parameter makes a new meta one, which leaves two.
        model.tie_weights()
        if (model_dir / "generation_config.json").is_file():  # as from_pretrained reads it (eos ids, for one)
            model.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"cannot load the model in {model_dir}: {e}") from None
    shards = Shards(model_dir)
    _to_placeholders(model, shards, model_dir)
    return model.eval(), shards


def _to_placeholders(model: torch.nn.Module, shards: Shards, model_dir: Path) -> None:
    """Replace every parameter by a placeholder keyed to its tensor in the shards (one per shared parameter, so
    tied ones stay tied); refuse weights the files lack, or whose shapes config.json does not describe."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    made: dict[int, torch.nn.Parameter] = {}
    missing, mismatched = [], []
    for module in model.modules():
        for pname, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in made:
                key = next((n for n in names[id(p)] if n in shards), None)
                if key is None:
                    missing.append(names[id(p)][0])
                elif shards.shapes[key] != tuple(p.shape):
                    mismatched.append(f"{key} {list(shards.shapes[key])} (config.json gives {list(p.shape)})")
                made[id(p)] = placeholder(p.shape, key)
            module._parameters[pname] = made[id(p)]
    if missing:
        raise EdgeftError(f"{model_dir}: weights missing from its safetensors files: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; download the complete model folder again")
    if mismatched:
        raise EdgeftError(f"{model_dir}: config.json does not describe the weights in its safetensors files: "
                          f"{'; '.join(mismatched[:3])}{f'; and {len(mismatched) - 3} more' if len(mismatched) > 3 else ''}. "
                          "Use the config.json that came with these weights")


def load_base(model_dir: Path, trust_remote_code: bool = False, dtype=None):
    """transformers' model of `model_dir`, loaded whole (fp32 unless `dtype`), with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            attn_implementation="eager", local_files_only=True)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"cannot load the model in {model_dir}: {e}") from None


def base_model(model_dir: Path, trust_remote_code: bool, weights: str) -> tuple[torch.nn.Module, Shards | None]:
    """The base model as a stage's `weights` option asks for it: "load", transformers' fp32 model, and no
    shards; "stream", `empty_model` and its shards; "auto", streamed past STREAM_ABOVE bytes of fp32 weights."""
    if streams(model_dir, weights):
        return empty_model(model_dir, trust_remote_code)
    return load_base(model_dir, trust_remote_code), None


def streams(model_dir: Path, weights: str) -> bool:
    """Whether `base_model` streams the model of `model_dir` for this `weights` option."""
    return weights == "stream" or (weights == "auto" and shapes.safetensors_params(model_dir) * 4 > STREAM_ABOVE)


def placeholder(shape, key: str | None) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(tuple(shape)), requires_grad=False)
    setattr(p, KEY, key)
    return p


def load_(module: torch.nn.Module, shards: Shards, only: set[int] | None = None) -> int:
    """Replace the placeholders in `module` and its children (those whose id is in `only`, if given) by the
    real weights. A placeholder shared by several modules (tied embeddings) is loaded once and stays shared
    within `module`. Returns how many tensors were read."""
    loaded: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for pname, p in sub._parameters.items():
            if p is None or not is_placeholder(p) or (only is not None and id(p) not in only):
                continue
            if id(p) not in loaded:
                real = torch.nn.Parameter(shards.read(getattr(p, KEY)), requires_grad=p.requires_grad)
                setattr(real, PLACEHOLDER, p)
                loaded[id(p)] = real
            sub._parameters[pname] = loaded[id(p)]
    return len(loaded)


def unload_(module: torch.nn.Module) -> None:
    """Put the placeholders back where `load_` replaced them (the real weights are freed once unused)."""
    for sub in module.modules():
        for pname, p in sub._parameters.items():
            if p is not None and hasattr(p, PLACEHOLDER):
                sub._parameters[pname] = getattr(p, PLACEHOLDER)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList with one entry per hidden layer)."""
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    n = config.num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not found:
        raise EdgeftError(f"cannot find the {n} decoder layers of {type(model).__name__}")
    return found[0]


@contextlib.contextmanager
def streamed(model: torch.nn.Module, shards: Shards, loaded: Callable[[torch.nn.Module], object] | None = None,
             on_layer: Callable[[], None] | None = None) -> Iterator[None]:
    """Within: `model` (placeholders, maybe wrapped by PEFT) computes with its real weights while holding one
    decoder layer's weights at a time; `loaded(module)` is applied to each part once its weights are in (a
    quantized base's fake quantization: quantize.fake_quantizer). `on_layer` is called after each layer's pass
    (progress.Steps' tick).

    Everything outside the decoder layers (embedding, final norm, LM head) is loaded for the whole block.
    Each layer loads its weights when it runs and drops them after; with gradients enabled it runs under
    activation checkpointing, so the backward pass loads the layer again instead of keeping it."""
    from torch.utils.checkpoint import checkpoint

    loaded = loaded or (lambda module: None)
    layers = decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    load_(model, shards, only={id(p) for p in model.parameters() if id(p) not in inside})
    loaded(model)  # the layers are still placeholders: a fake quantization skips them

    def wrap(layer: torch.nn.Module):
        forward = layer.forward

        def run(*args, **kwargs):
            load_(layer, shards)
            try:
                loaded(layer)
                return forward(*args, **kwargs)
            finally:
                unload_(layer)
                if on_layer is not None:
                    on_layer()

        def checkpointed(*args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        layer.forward = checkpointed

    for layer in layers:
        wrap(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward is back
        unload_(model)
