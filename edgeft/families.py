"""Supported model families: how to recognise each, and where LoRA goes by default.

Phi-3-mini, Phi-3.5-mini and Phi-4-mini are all `Phi3ForCausalLM` (fused qkv_proj and gate_up_proj);
what differs (long-context rope, grouped-query attention, partial rotary, tied embeddings) lives in the
config and is handled by transformers' own modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft.errors import EdgeftError


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str
    default_targets: tuple[str, ...]
    examples: str


FAMILIES = (
    Family("phi3", "Phi3ForCausalLM", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           "Phi-3-mini-4k/128k, Phi-3.5-mini, Phi-4-mini"),
    Family("llama", "LlamaForCausalLM", "llama",
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "Llama-3.2-1B/3B and Llama-style models"),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2",
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "Qwen2 / Qwen2.5"),
)


def supported_list() -> str:
    return "; ".join(f"{f.architecture} ({f.examples})" for f in FAMILIES)


def read_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EdgeftError(f"model folder {model_dir} does not exist; pass a Hugging Face model folder "
                          "(config.json, *.safetensors, tokenizer files)")
    if not model_dir.is_dir():
        raise EdgeftError(f"{model_dir} is a file, not a model folder; pass the folder that holds config.json")
    path = model_dir / "config.json"
    if not path.is_file():
        raise EdgeftError(f"{model_dir} is not a Hugging Face model folder: config.json is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{path} is not valid JSON: {e}") from None


def detect(config: dict, model_dir: Path | str = "model") -> Family:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for family in FAMILIES:
        if family.architecture in archs or (not archs and model_type == family.model_type):
            return family
    found = ", ".join(archs) or f"model_type {model_type!r}"
    raise EdgeftError(f"unsupported architecture {found} in {model_dir}; supported: {supported_list()}")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, checked against the shard index when there is one."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise EdgeftError(f"{model_dir}: weight shards listed in {index.name} are missing: "
                              f"{', '.join(missing)}; download the complete model folder again")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise EdgeftError(f"{model_dir} has PyTorch .bin weights only; edgeft reads safetensors. Convert with "
                          "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")
    raise EdgeftError(f"{model_dir} has no weights: model.safetensors (or a sharded index) is missing")
