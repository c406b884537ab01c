"""Tokenized datasets as plain numpy arrays, cached by content hash of data + tokenizer + settings.

Each split is one .npz the training runtime reads with numpy alone: `tokens` (int32, all samples
concatenated), `loss_mask` (bool, same length), `offsets` (int64, n+1 sample boundaries), `lines` (int32,
source line of each sample).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core import atomic, fingerprint, state
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.data import formats, tokenize
from edgeft.data.tokenize import Encoded

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = spec("longest sample in tokens", 512, min=8)
    truncation: str = spec("over-long samples: drop them, or keep their first seq_len tokens", "drop",
                           choices=tokenize.TRUNCATION)
    train_on_prompt: bool = spec("train on every token, not only assistant / completion tokens", False)
    val_fraction: float = spec("share of the data held out for validation when no eval file is given", 0.1,
                               min=0.0, max=0.5)
    seed: int = spec("seed of the validation split", 0)
    columns: str | None = spec("the data's own names for the format's fields, NAME=COLUMN[,...] with NAME messages, prompt, "
                                  "completion or text (e.g. messages=conversations)", None)

    def __post_init__(self):
        formats.parse_columns(self.columns)  # refused here, before any reading


@dataclass
class Dataset:
    root: Path
    meta: dict

    def split(self, name: str) -> Path:
        return self.root / f"{name}.npz"


def cache_key(data: Path, eval_data: Path | None, model_dir: Path, cfg: DataConfig,
              hashes: fingerprint.Hashes | None = None) -> str:
    sha = (hashes or fingerprint.Hashes()).of
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "cfg": dataclasses.asdict(cfg)}, sort_keys=True).encode())
    h.update(digest(data, hashes).encode())
    if eval_data:
        h.update(digest(eval_data, hashes).encode())
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            h.update(name.encode() + sha(Path(model_dir) / name).encode())
    return h.hexdigest()[:20]


def digest(data: Path, hashes: fingerprint.Hashes | None = None) -> str:
    """The sha256 of a data file, or of a saved dataset's files."""
    hashes = hashes or fingerprint.Hashes()
    if Path(data).is_dir():
        return hashlib.sha256(json.dumps(hashes.folder(data, data), sort_keys=True).encode()).hexdigest()
    return hashes.of(data)


def _cached(root: Path, hashes: fingerprint.Hashes) -> Dataset | None:
    """The tokenized data in `root` if they are intact. A cache: a damaged one is said and rebuilt."""
    if not root.exists():
        return None
    try:
        meta = state.read_json(root / "meta.json", "the tokenized data's description", "rebuilding it",
                               keys=("key", "pad_token_id", "files"))
        if changed := hashes.changed(meta["files"], root):
            raise EdgeftError(f"the tokenized data in {root} are damaged ({fingerprint.describe(changed, root)}); "
                              "rebuilding them")
    except EdgeftError as e:
        print(f"train: {e}")
        return None
    return Dataset(root, meta)


def read_clean(path: Path, columns: str | None = None) -> formats.ReadResult:
    result = formats.read(path, formats.parse_columns(columns))
    if result.problems:
        kinds = ", ".join(f"{k} ({len(v)}: line {', '.join(map(str, v[:3]))}{'...' if len(v) > 3 else ''})"
                          for k, v in result.problems_by_kind().items())
        raise EdgeftError(f"{path} has {len(result.problems)} problem(s): {kinds}; "
                          f"run `edgeft data check {path} --model MODEL_DIR` for the full list")
    return result


def system_prompts(records: list[formats.Record]) -> dict:
    """The most common system prompt of chat records and its share of them (the bundle's default when it
    dominates: package's chat defaults)."""
    prompts = Counter(m["content"] if (m := r.data["messages"][0])["role"] == "system" else None
                      for r in records if r.format == "chat")
    if not prompts:
        return {"most_common": None, "share": 0.0, "distinct": 0}
    text, count = prompts.most_common(1)[0]
    return {"most_common": text, "share": round(count / sum(prompts.values()), 4),
            "distinct": len([t for t in prompts if t is not None])}


def declared_tools(records: list[formats.Record]) -> dict:
    """The most common `tools` declaration of the records and its share of them (the bundle's default when it
    dominates, as the system prompt)."""
    lists = Counter(json.dumps(r.data["tools"], sort_keys=True) if r.data.get("tools") else None for r in records
                    if r.format == "chat")
    if not lists or lists.most_common(1)[0][0] is None:
        return {"most_common": None, "share": 0.0}
    text, count = lists.most_common(1)[0]
    return {"most_common": json.loads(text), "share": round(count / sum(lists.values()), 4)}


def to_arrays(samples: list[Encoded]) -> dict[str, np.ndarray]:
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {
        "tokens": np.concatenate([s.input_ids for s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32),
        "loss_mask": np.concatenate([s.loss_mask for s in samples]) if samples else np.zeros(0, bool),
        "offsets": offsets, "lines": np.array([s.line for s in samples], dtype=np.int32),
    }


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def build(data: Path, model_dir: Path, out_root: Path, cfg: DataConfig = DataConfig(),
          eval_data: Path | None = None, hashes: fingerprint.Hashes | None = None) -> Dataset:
    """Tokenize `data` (and `eval_data`, else a `val_fraction` split) into out_root/<key>/, or reuse it."""
    hashes = hashes or fingerprint.Hashes()
    data = formats.check_path(data)
    eval_data = formats.check_path(eval_data, "eval data file") if eval_data else None
    key = cache_key(data, eval_data, model_dir, cfg, hashes)
    root = Path(out_root) / key
    if (cached := _cached(root, hashes)) is not None:
        return cached
    tok = tokenize.load_tokenizer(model_dir)
    train_read = read_clean(data, cfg.columns)
    train, problems, stats = tokenize.encode_all(tok, train_read.records, cfg.seq_len, cfg.truncation,
                                                 cfg.train_on_prompt)
    val_stats = None
    if eval_data:
        val_read = read_clean(eval_data, cfg.columns)
        val, val_problems, val_stats = tokenize.encode_all(tok, val_read.records, cfg.seq_len, cfg.truncation,
                                                           cfg.train_on_prompt)
        problems += val_problems
    else:
        tr, va = split_indices(len(train), cfg.val_fraction, cfg.seed)
        train, val = [train[i] for i in tr], [train[i] for i in va]
    if problems:
        raise EdgeftError(f"{len(problems)} record(s) cannot be tokenized, first at line {problems[0].line}: "
                          f"{problems[0].message}; run `edgeft data check {data} --model {model_dir}`")
    if not train:
        raise EdgeftError(f"no training samples left in {data} after truncation ({stats['dropped']} of "
                          f"{len(train_read.records)} longer than --seq-len {cfg.seq_len}); raise --seq-len or "
                          "use --truncation right")
    meta = {
        "version": FORMAT_VERSION, "key": key, "config": dataclasses.asdict(cfg), "format": train_read.format,
        "data": str(Path(data).resolve()), "eval_data": str(Path(eval_data).resolve()) if eval_data else None,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "truncation": stats, "eval_truncation": val_stats, "system_prompts": system_prompts(train_read.records),
        "tools": declared_tools(train_read.records),
        "splits": {name: {"samples": len(s), "tokens": int(sum(len(x.input_ids) for x in s)),
                          "target_tokens": int(sum(int(x.loss_mask.sum()) for x in s))}
                   for name, s in (("train", train), ("val", val))},
    }
    with atomic.atomic_dir(root) as tmp:
        for name, samples in (("train", train), ("val", val)):
            np.savez(tmp / f"{name}.npz", **to_arrays(samples))
        meta["files"] = {f"{name}.npz": fingerprint.sha256_file(tmp / f"{name}.npz") for name in ("train", "val")}
        atomic.write_json(tmp / "meta.json", meta)
    return Dataset(root, meta)

