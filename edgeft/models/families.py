"""Supported model families: how to recognise each, and where LoRA goes by default.

Phi-3-mini, Phi-3.5-mini and Phi-4-mini are all `Phi3ForCausalLM` (fused qkv_proj and gate_up_proj);
what differs (long-context rope, grouped-query attention, partial rotary, tied embeddings) lives in the
config and is handled by transformers' own modules.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.errors import EdgeftError


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
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EdgeftError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(config, dict):
        raise EdgeftError(f"{path} holds a JSON {type(config).__name__}, not the object of a model's settings; use "
                          "the config.json that came with the model")
    return config


def detect(config: dict, model_dir: Path | str = "model") -> Family:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise EdgeftError(f"config.json of {model_dir}: 'architectures' must be a list of class names such as "
                          f"[\"Phi3ForCausalLM\"], not {str(archs)[:60]}; use the config.json that came with the model")
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


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of one safetensors file (name: dtype, shape, data_offsets), read from its header alone and
    checked against the file's size, so that a truncated or corrupt download is named before a stage starts
    rather than failing halfway through it."""
    path = Path(path)
    try:
        on_disk = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > on_disk - 8:
                raise ValueError(f"its header length, {length:,} bytes, is more than the file holds")
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes_ok = all(isinstance(v["shape"], list) for v in tensors.values())
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # JSON and Unicode errors are ValueErrors
        raise EdgeftError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                          "download it again") from None
    if not shapes_ok or 8 + length + end != on_disk:
        raise EdgeftError(f"{path} is truncated or corrupt: its header describes {8 + length + end:,} bytes, the file "
                          f"has {on_disk:,}; download it again")
    return tensors


def max_train_seq_len(config: dict) -> int:
    """Longest sequence the exported graph is valid for: long-rope exports pin the short-factor frequencies."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) == "longrope":
        return int(rope.get("original_max_position_embeddings") or config["original_max_position_embeddings"])
    return int(config.get("max_position_embeddings", 4096))
