"""Tiny random-weight models of every supported family, built from the real config classes.

Each keeps its family's structural features (fused projections, GQA, partial rotary, long-context rope,
tied embeddings, biased q/k/v). Sizes avoid the GenAI builder's LM-head pitfall: neither
intermediate_size nor 2*intermediate_size equals the vocabulary size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config

from edgeft.tasks.pretrain import bpe_tokenizer

VOCAB = 320
CORPUS = [
    "turn on the kitchen lights", "set the thermostat to 21 degrees", "open the garage door at 7 am",
    "what is the temperature in the bedroom", "play jazz in the living room", "lock the front door",
    '{"action": "set", "device": "light", "room": "kitchen", "value": "on"}',
] * 20


def build_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Phi-3's special tokens and chat template (no generation markers, EOS last)."""
    return bpe_tokenizer(CORPUS, vocab_size)


def _longrope(rotary_half: int, original: int, maximum: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(rotary_half)],
            "long_factor": [1.0 + 0.5 * i for i in range(rotary_half)],
            "original_max_position_embeddings": original}


def _phi3(**kw) -> Phi3Config:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
                pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    return Phi3Config(**base)


CONFIGS = {
    "phi3-mini-4k": lambda: _phi3(),
    "phi3-mini-128k": lambda: _phi3(max_position_embeddings=131072, original_max_position_embeddings=4096,
                                    rope_scaling=_longrope(8, 4096, 131072)),
    "phi3.5-mini": lambda: _phi3(max_position_embeddings=131072, original_max_position_embeddings=4096,
                                 rope_scaling=_longrope(8, 4096, 131072), num_hidden_layers=3),
    # Phi-4-mini: GQA, partial rotary 0.75 of head 64 (rotary half 24, a multiple of 8), tied embeddings.
    "phi4-mini": lambda: _phi3(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                               partial_rotary_factor=0.75, tie_word_embeddings=True,
                               max_position_embeddings=131072, original_max_position_embeddings=4096,
                               rope_scaling=_longrope(24, 4096, 131072)),
    "llama3.2": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=True, pad_token_id=3,
        bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    "qwen2.5": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, pad_token_id=3,
        bos_token_id=1, eos_token_id=2),
}


# Not a family of its own (so not in the per-family tests): a Phi-3 whose context is shorter than edgeft's defaults.
VARIANTS = {"phi3-ctx256": lambda: _phi3(max_position_embeddings=256, original_max_position_embeddings=256)}


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny model folder (config, safetensors, tokenizer) for family `name` into `out`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = {**CONFIGS, **VARIANTS}[name]()
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return Path(out)


def phi3_slice(kind: str, out: Path, layers: int) -> Path:
    """A Phi-3-mini model folder for measuring: "slice", the real widths (hidden 3072, ffn 8192, vocab 32064) with
    `layers` decoder layers; "tiny", the tiny one. Random weights, seed 0."""
    from transformers import AutoModelForCausalLM

    if kind == "tiny":
        cfg = Phi3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
                         pad_token_id=3, bos_token_id=1, eos_token_id=2)
    else:
        cfg = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
