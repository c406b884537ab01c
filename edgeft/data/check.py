"""`edgeft data check`: every format error by kind with line numbers, token statistics, duplicates, and
(with a device profile) the estimated time per epoch. Exit 0 clean, 1 problems, 2 unusable input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgeft.data import formats, tokenize


def check(path: Path, model_dir: Path, seq_len: int = 512, profile=None, train_on_prompt: bool = False,
          columns: str | None = None) -> dict:
    result = formats.read(path, formats.parse_columns(columns))
    tok = tokenize.load_tokenizer(model_dir)
    encoded, template_problems, _ = tokenize.encode_all(tok, result.records, 10**9, "drop", train_on_prompt)
    problems = result.problems + template_problems
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    targets = np.array([int(e.loss_mask.sum()) for e in encoded], dtype=np.int64)
    over = [e.line for e in encoded if len(e.input_ids) > seq_len]
    seen: dict[str, int] = {}
    duplicates: list[list[int]] = []
    groups: dict[str, list[int]] = {}
    for r in result.records:
        digest = hashlib.sha256(json.dumps(r.data, sort_keys=True).encode()).hexdigest()
        groups.setdefault(digest, []).append(r.line)
        seen[digest] = seen.get(digest, 0) + 1
    duplicates = [lines for lines in groups.values() if len(lines) > 1]
    kept = lengths[lengths <= seq_len]
    report = {
        "file": str(path), "format": result.format, "records": len(result.records) + len(result.problems),
        "valid_records": len(encoded),
        "problems": {kind: lines for kind, lines in _by_kind(problems).items()},
        "problem_messages": [{"line": p.line, "kind": p.kind, "message": p.message} for p in problems[:200]],
        "tokens": _stats(lengths), "target_tokens": _stats(targets),
        "seq_len": seq_len, "over_seq_len": {"count": len(over), "lines": over[:50]},
        "duplicates": {"count": sum(len(d) - 1 for d in duplicates), "groups": duplicates[:50]},
        "tokens_per_epoch": int(kept.sum()), "target_tokens_per_epoch": int(targets[lengths <= seq_len].sum()),
        "estimate": None,
    }
    if profile is not None and len(kept):
        from edgeft.devices import plan

        report["estimate"] = plan.epoch_estimate(model_dir, profile, kept)
    report["clean"] = not problems and not over and not duplicates
    return report


def _by_kind(problems: list[formats.Problem]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in problems:
        out.setdefault(p.kind, []).append(p.line)
    return out


def _stats(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    return {"min": int(values.min()), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "max": int(values.max()), "total": int(values.sum())}


def render(report: dict) -> str:
    lines = [f"{report['file']}: {report['format'] or 'unknown'} format, {report['records']} records, "
             f"{report['valid_records']} usable"]
    for msg in report["problem_messages"][:50]:
        lines.append(f"  line {msg['line']}: {msg['kind']}: {msg['message']}")
    if len(report["problem_messages"]) > 50:
        lines.append(f"  ... {len(report['problem_messages']) - 50} more (see --json)")
    for kind, where in report["problems"].items():
        shown = ", ".join(map(str, where[:10])) + (" ..." if len(where) > 10 else "")
        lines.append(f"  {kind}: {len(where)} (lines {shown})")
    t = report["tokens"]
    if t:
        lines.append(f"  tokens per sample: min {t['min']}, median {t['median']:g}, p95 {t['p95']:g}, max {t['max']}")
    o = report["over_seq_len"]
    if o["count"]:
        lines.append(f"  {o['count']} sample(s) longer than --seq-len {report['seq_len']} (lines "
                     f"{', '.join(map(str, o['lines'][:10]))}): dropped unless --truncation right")
    d = report["duplicates"]
    if d["count"]:
        lines.append(f"  {d['count']} exact duplicate(s): " + "; ".join(
            "lines " + ", ".join(map(str, g[:5])) for g in d["groups"][:5]))
    lines.append(f"  tokens per epoch: {report['tokens_per_epoch']:,} ({report['target_tokens_per_epoch']:,} trained)")
    e = report["estimate"]
    if e:
        lines.append(f"  estimated time per epoch on {e['device']}: {_duration(e['seconds_per_epoch'])} "
                     f"({e['steps']:,} steps of batch {e['batch_size']} x {e['seq_len']} tokens at {e['step_s']:.3g} s, "
                     f"{e['backend']} backend, {e['base_precision']} base"
                     f"{', recomputed' if e['recompute'] else ''}; `edgeft plan` for the breakdown)")
    lines.append("clean" if report["clean"] else "problems found")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
