"""Planner accuracy: predicted vs measured peak RSS and step time of real training runs on this machine.

    python benchmarks/plan_accuracy.py [--only NAME,... [--merge]] [--backends ort,torch] [--steps N]
                                       [--out benchmarks/results]

Each configuration is a random-weight model built from a real config class (Phi3Config, or LlamaConfig for
the GQA one), prepared with the default LoRA targets (r 16) and exported; then `edgeft train` runs a few
steps on text samples cut to exactly the planned length, so every batch is batch x seq tokens. Measured:
the training process's peak RSS (VmHWM) and the median step time after the first step. Predicted:
`edgeft.plan.make` for the dev profile. Rows marked `fit` were used to calibrate `plan.CALIBRATION`; the
others check it. Goals: memory within +-15 %, step time within +-30 %.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

PROFILE = "dev-2core-avx512"
# name: (family, hidden, layers, ffn, heads, kv_heads, vocab, batch, seq, role[, base precision[, "recompute"]])
CONFIGS = {
    "demo-128x8": ("phi3", 256, 4, 704, 4, 4, 1024, 8, 128, "fit"),
    "demo-512x4": ("phi3", 256, 4, 704, 4, 4, 1024, 4, 512, "fit"),
    "small-256x4": ("phi3", 512, 4, 1536, 8, 8, 8000, 4, 256, "fit"),
    "mid-256x2": ("phi3", 1024, 6, 2816, 16, 16, 8000, 2, 256, "fit"),
    "mid-1024x1": ("phi3", 1024, 6, 2816, 16, 16, 8000, 1, 1024, "fit"),
    "slice-256x1": ("phi3", 3072, 2, 8192, 32, 32, 32064, 1, 256, "fit"),
    "check-384x2": ("phi3", 768, 8, 2048, 12, 12, 16000, 2, 384, "check"),
    "llama-gqa-512x1": ("llama", 2048, 4, 5632, 16, 4, 32000, 1, 512, "check"),
    "slice-512x2": ("phi3", 3072, 2, 8192, 32, 32, 32064, 2, 512, "check"),
    "slice-int8-256x1": ("phi3", 3072, 2, 8192, 32, 32, 32064, 1, 256, "check", "int8"),
    "slice-int4-256x1": ("phi3", 3072, 2, 8192, 32, 32, 32064, 1, 256, "check", "int4"),
    "slice-int4r-256x1": ("phi3", 3072, 2, 8192, 32, 32, 32064, 1, 256, "check", "int4", "recompute"),
}
WORDS = ("turn on the kitchen lights set thermostat to degrees open garage door at am pm lock front play jazz "
         "living room bedroom temperature what is").split()


def build(name: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    from tests.tiny_models import build_tokenizer

    family, hidden, layers, ffn, heads, kv, vocab, *_ = CONFIGS[name]
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                  pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg = Phi3Config(original_max_position_embeddings=4096, **common) if family == "phi3" else LlamaConfig(**common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def edgeft(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"edgeft {' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def text_data(path: Path, seq: int, n: int = 256) -> Path:
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(seq + 8))}) + "\n"
                            for _ in range(n)))
    return path


def measure(name: str, backends: list[str], steps: int, root: Path) -> list[dict]:
    from edgeft.devices import plan, profiles
    from edgeft.models import shapes

    family, hidden, layers, ffn, heads, kv, vocab, batch, seq, role, *rest = CONFIGS[name]
    precision = rest[0] if rest else "fp32"
    recompute = "recompute" in rest
    model = build(name, root / f"{name}-model")
    base = root / f"{name}-ws"
    edgeft("prepare", str(model), "--out", str(base), "--base-precision", precision)
    edgeft("export", str(base), "--recompute" if recompute else "--no-recompute")
    data = text_data(root / f"{name}.jsonl", seq)
    profile = profiles.load(PROFILE)
    rows = []
    for backend in backends:
        ws = root / f"{name}-{backend}"
        shutil.copytree(base, ws)
        edgeft("train", str(ws), "--data", str(data), "--backend", backend, "--max-steps", str(steps),
               "--batch-size", str(batch), "--seq-len", str(seq), "--truncation", "right",
               "--val-fraction", "0.02", "--eval-every", str(10 * steps), "--lr", "1e-4")
        metrics = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
        prog = [r for r in metrics if r["event"] == "progress"]
        full = [r for r in prog[1:] if r["tokens"] == batch * seq]
        if len(full) < 2:
            raise SystemExit(f"{name}: fewer than 2 full-length steps; tokens per step: {[r['tokens'] for r in prog]}")
        measured_rss = json.loads((ws / "manifest.json").read_text())["stages"]["train"]["peak_rss_mb"] * 2**20
        measured_step = statistics.median(r["step_s"] for r in full)
        p = plan.make(model, plan.Run(seq_len=seq, batch_size=batch, backend=backend, base_precision=precision,
                                         recompute=recompute),
                      profile)
        rows.append({
            "config": name, "role": role, "backend": backend, "base_precision": precision,
            "recompute": recompute, "family": family, "hidden": hidden, "layers": layers,
            "ffn": ffn, "heads": heads, "kv_heads": kv, "vocab": vocab, "batch": batch, "seq_len": seq,
            "base_params": p.base_params, "trainable": p.trainable, "matmul_params": shapes.matmul_params(model),
            "largest_linear": max(r * c for r, c in shapes.linear_shapes(model).values()),
            "max_seq_len": p.shape.max_seq_len, "tied": p.shape.tied,
            "measured_peak_bytes": measured_rss, "predicted_peak_bytes": p.memory.total,
            "predicted_breakdown": {k: getattr(p.memory, k) for k in ("frozen", "adapters", "optimizer",
                                                                        "activations", "runtime", "dequantized")},
            "measured_step_s": measured_step, "predicted_step_s": p.step_s,
            "memory_error": p.memory.total / measured_rss - 1, "time_error": p.step_s / measured_step - 1})
        shutil.rmtree(ws)
    shutil.rmtree(base)
    shutil.rmtree(model)
    return rows


def repredict(row: dict) -> dict:
    """The prediction for a measured row with the current calibration (no model folder needed)."""
    from edgeft.devices import plan, profiles

    shape = plan.Shape(row["hidden"], row["layers"], row["ffn"], row["heads"], row["kv_heads"], row["vocab"],
                       row.get("tied", False), row.get("max_seq_len", 4096))
    run = plan.Run(seq_len=row["seq_len"], batch_size=row["batch"], backend=row["backend"],
                   base_precision=row.get("base_precision", "fp32"), recompute=row.get("recompute", False))
    memory = plan.memory(shape, run, row["base_params"], row["trainable"], row["largest_linear"])
    profile = profiles.load(PROFILE)
    peak, _ = plan.peak_gflops(profile)
    _, step = plan.step_seconds(shape, run, row["matmul_params"], row["trainable"], peak)
    step += plan.dequant_seconds(shape, run, row["matmul_params"], profile.memory.bandwidth_gbs.value)
    return row | {"predicted_peak_bytes": memory.total, "predicted_step_s": step,
                  "memory_error": memory.total / row["measured_peak_bytes"] - 1,
                  "time_error": step / row["measured_step_s"] - 1}


def merged(table: Path, partial: dict) -> dict:
    """The saved table with `partial`'s rows in place of theirs (same config and backend; new ones appended), each
    dated by when it was measured, and every prediction recomputed with the current calibration."""
    result = json.loads(table.read_text())
    kept = [{"measured_on": result["date"]} | r for r in result["rows"]]
    fresh = {(r["config"], r["backend"]): r | {"measured_on": partial["date"]} for r in partial["rows"]}
    rows = [fresh.pop((r["config"], r["backend"]), r) for r in kept] + list(fresh.values())
    return result | {"date": partial["date"], "rows": [repredict(r) for r in rows]}


def backend(row: dict) -> str:
    """'ort', 'torch int8', 'ort int4 recomputed': the backend, the base's precision when quantized, recomputation."""
    precision = row.get("base_precision", "fp32")
    return " ".join([row["backend"]] + ([precision] if precision != "fp32" else [])
                    + (["recomputed"] if row.get("recompute") else []))


def markdown(result: dict) -> str:
    lines = ["# Planner accuracy: predicted vs measured", "",
             f"Measured {result['date']} on {result['machine']} ({result['profile']}) by "
             "`python benchmarks/plan_accuracy.py`. Each row: a random-weight model, default LoRA targets r 16, "
             f"{result['steps']} training steps on full-length batches; measured peak RSS of the training process "
             "and median step time (after the first). `fit` rows calibrated `edgeft.plan.CALIBRATION`; `check` rows "
             "did not. Goals: memory within +-15 %, step time within +-30 %.", "",
             "| config | role | backend | hidden x layers, ffn, vocab | batch x seq | predicted peak | measured peak | "
             "error | predicted step | measured step | error | measured on |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem_ok = abs(r["memory_error"]) <= 0.15
        time_ok = abs(r["time_error"]) <= 0.30
        lines.append(
            f"| {r['config']} | {r['role']} | {backend(r)} | {r['hidden']} x {r['layers']}, {r['ffn']}, {r['vocab']} "
            f"| {r['batch']} x {r['seq_len']} | {r['predicted_peak_bytes'] / 1e6:.0f} MB | "
            f"{r['measured_peak_bytes'] / 1e6:.0f} MB | {r['memory_error']:+.1%} {'ok' if mem_ok else 'MISS'} | "
            f"{r['predicted_step_s']:.3f} s | {r['measured_step_s']:.3f} s | "
            f"{r['time_error']:+.1%} {'ok' if time_ok else 'MISS'} | {r.get('measured_on', result['date'])} |")
    rows = result["rows"]
    mem_ok = sum(abs(r["memory_error"]) <= 0.15 for r in rows)
    time_ok = sum(abs(r["time_error"]) <= 0.30 for r in rows)
    lines += ["", f"Within goal: memory {mem_ok}/{len(rows)}, step time {time_ok}/{len(rows)}.", "",
              "Notes: a quantized base is dequantized at each use, by ORT and by the torch backend "
              "(quant/torch_linear.py). What is in flight (`dequant_live`) and the time it takes (`dequant_bytes`) were "
              "fitted on the 4-layer slice of results/quantized_base.md, so the 2-layer int8 and int4 rows here check "
              "them at another depth (the int4 recomputed rows: exported with `--recompute`, which the torch "
              "backend follows by checkpointing each layer). Rows are re-measured (`--only NAME,... --merge`) when "
              "a change moves them: the int8 rows after the torch backend began holding the base quantized "
              "and again, with the int4 rows added, after ORT began using int4 blocks through MatMulNBits and large "
              "weights a tile at a time (2026-12-04: ORT int8 3.49 -> 2.59 s, 1518 -> 1193 MB), and "
              "slice-256x1, demo-128x8 and slice-512x2 after the loss began running the LM head on the labelled "
              "positions only (these runs label every token but the first, so the head does the same work; ORT "
              "no longer copies the logits to shift them, which took slice-512x2 from 5821 to 4765 MB). "
              "The ORT int8 and int4 rows and the ORT slice-256x1 row were re-measured together after the training "
              "sessions kept ONNX Runtime's CPU arena (2026-12-04, int4 recomputed 6.23 -> 3.01 s): this VM then ran "
              "slice-256x1 in 1.92 s against 2.58 s on 2026-11-23, so their step-time errors carry the box's drift; "
              "against that fp32 row, measured beside them, int8 took 1.08x, int4 1.22x and int4 recomputed 1.57x "
              "(predicted 1.24x, 1.34x and 1.83x). "
              "Predictions were recomputed from the measured rows with the final calibration (`--recompute`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--backends", default="ort,torch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--raw", type=Path, help="also append raw rows to this JSONL (for calibration)")
    ap.add_argument("--merge", action="store_true", help="with --only: the rows measured replace theirs (same "
                    "config and backend) in OUT/plan.json, the others kept with their dates, all re-predicted")
    ap.add_argument("--recompute", type=Path, help="re-predict the rows of a plan.json with the current calibration")
    args = ap.parse_args()
    if args.recompute:
        result = json.loads(args.recompute.read_text())
        result["rows"] = [repredict(r) for r in result["rows"]]
        report.save(args.out, "plan", result, markdown)
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    rows = []
    (REPO / "artifacts").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "artifacts") as tmp:
        for name in names:
            for row in measure(name, args.backends.split(","), args.steps, Path(tmp)):
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.raw:
                    with open(args.raw, "a") as f:
                        f.write(json.dumps(row) + "\n")
    result = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "profile": PROFILE,
              "steps": args.steps, "rows": rows}
    if args.only and not args.merge:  # a partial run is printed, never saved over the full table
        print(markdown(result))
    elif args.only:
        report.save(args.out, "plan", merged(args.out / "plan.json", result), markdown)
    else:
        report.save(args.out, "plan", result, markdown)


if __name__ == "__main__":
    main()
