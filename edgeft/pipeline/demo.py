"""demo: the main job on the embedded default, no downloads.

Runs `edgeft/recipes/home-demo.yaml`: edgeft's own small Phi-3 base (committed, `edgeft/tasks/home_base/`)
is fine-tuned with ONNX Runtime training on one home's commands, packaged int4 for onnxruntime-genai,
evaluated (base vs fine-tuned vs int4) and benchmarked; then one table says what happened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import Workspace
from edgeft.pipeline import run

RECIPE = run.SHIPPED["recipes"] / "home-demo.yaml"


def demo(seed: int = 0, workspace: Path | None = None, device: str | None = None, log=print) -> dict:
    if not (run.SHIPPED["home_base"] / "model.safetensors").is_file():
        raise EdgeftError(f"the demo's base model is missing from {run.SHIPPED['home_base']}; rebuild it with "
                          "`python -m edgeft.tasks.pretrain build` (about 20 CPU-minutes)")
    overrides = [f"train.seed={seed}", f"lora.seed={seed}", f"name=home-demo-seed{seed}"]
    if workspace:
        overrides.append(f"workspace={Path(workspace).absolute()}")
    if device:
        overrides.append(f"device={device}")
    recipe, base = run.load(RECIPE, overrides)
    started = time.time()
    result = run.run_recipe(recipe, base, log=log)
    summary = summarize(Path(result["workspace"]), time.time() - started)
    log(table(summary))
    return summary


def summarize(root: Path, seconds: float) -> dict:
    from edgeft.stages.package.stage import Packaged
    from edgeft.stages.train import Trained

    ws = Workspace(root)
    trained, packaged = ws.read(Trained), ws.read(Packaged)
    results = {r["variant"]: r for r in json.loads((ws.eval_reports / "report.json").read_text())["results"]}
    inference = json.loads((ws.bench_reports / "bench.json").read_text()).get("inference", {})
    pick = lambda prefix: next((r for k, r in results.items() if k.startswith(prefix)), None)  # noqa: E731
    return {
        "workspace": str(root), "seconds": round(seconds, 1),
        "exact_match": {k: (pick(k) or {}).get("exact_match") for k in ("base", "base few-shot", "adapter", "bundle")},
        "train_tokens_per_s": trained.tokens_per_s, "train_peak_rss_mb": trained.peak_rss_mb,
        "package_peak_rss_mb": packaged.peak_rss_mb,
        "decode_tokens_per_s": inference.get("decode_tokens_per_s", {}).get("median"),
        "ttft_ms": inference.get("ttft_ms", {}).get("median"),
        "bundle": str(ws.bundle), "bundle_mb": packaged.bytes / 2**20, "precision": packaged.precision,
    }


def table(s: dict) -> str:
    em = s["exact_match"]
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    rows = [("exact match, base (zero-shot)", fmt(em["base"])),
            ("exact match, base (3-shot)", fmt(em["base few-shot"])),
            ("exact match, fine-tuned", fmt(em["adapter"])),
            (f"exact match, fine-tuned {s['precision']} bundle", fmt(em["bundle"])),
            ("training tokens/s (ONNX Runtime)", f"{s['train_tokens_per_s']:,.0f}" if s["train_tokens_per_s"] else "-"),
            ("training peak memory", f"{s['train_peak_rss_mb']:,.0f} MB"),
            ("packaging peak memory", f"{s['package_peak_rss_mb']:,.0f} MB"),
            ("decode tokens/s (onnxruntime-genai)", f"{s['decode_tokens_per_s']:,.0f}" if s["decode_tokens_per_s"] else "-"),
            ("time to first token", f"{s['ttft_ms']:.1f} ms" if s["ttft_ms"] else "-"),
            ("bundle", f"{s['bundle']} ({s['bundle_mb']:.1f} MB)"),
            ("wall time", f"{s['seconds'] / 60:.1f} min")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "edgeft demo: one home's commands, fine-tuned on this machine", "",
                      *(f"  {k:<{width}}  {v}" for k, v in rows), "",
                      f"reports: {s['workspace']}/eval/report.md, {s['workspace']}/bench/bench.md",
                      f"try it: edgeft chat {s['bundle']} --prompt \"dim the counter lights to 40% at 7 pm\"  "
                      "(the bundle carries the system prompt it was trained with)"])
