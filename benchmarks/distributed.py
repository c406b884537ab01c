"""Per-rank memory of the data-parallel strategies, against one process, side by side in one process tree.

    python benchmarks/distributed.py [--layers 8 --steps 3 --ranks 2 --out benchmarks/results]

A real-width Phi-3-mini slice (hidden 3072, ffn 8192, vocab 32064, `--layers` decoder layers, fp32 base, random
weights) is prepared once; `edgeft train --backend torch` then runs the same global batch (2 x 256 tokens, LoRA r16
on the default targets) in one process and under each strategy on `--ranks` ranks of this machine (gloo). Reported
per run: each rank's peak RSS (VmHWM) over the whole run and after its model was loaded and sharded (the peak is
reset there; zero3 and fsdp read the base one decoder layer at a time, sharding each before the next), the median
step time after the first, and what the planner predicts for one rank (memory, and step time on this box's
profile, devices/dev-2core-avx512.yaml). The data: plain
text records of the sample task's commands run together, each longer than 256 tokens, so that every batch is
full-length as the planner assumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
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

COMMANDS = REPO / "edgeft" / "tasks" / "home_data" / "train.jsonl"


def long_texts(out: Path, records: int = 64) -> Path:
    """Text records of 40 commands each (well over 256 tokens): full-length batches."""
    lines = [json.loads(x)["messages"][1]["content"] for x in COMMANDS.read_text().splitlines()]
    texts = [" ".join(lines[i * 40:(i + 1) * 40]) for i in range(min(records, len(lines) // 40))]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out
RUNS = ("one process", "ddp", "zero2", "zero3", "fsdp")


def edgeft(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"edgeft {' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def rank_share(profile, ranks: int):
    """The profile of one of `ranks` ranks on this box: its share of the cores and of their peak."""
    cpu = profile.cpu
    peak = dataclasses.replace(cpu.peak_fp32_gflops, value=cpu.peak_fp32_gflops.value / ranks)
    return dataclasses.replace(profile, cpu=dataclasses.replace(cpu, cores=max(1, cpu.cores // ranks),
                                                                peak_fp32_gflops=peak))


def run(name: str, base: Path, ws: Path, data: Path, steps: int, ranks: int) -> dict:
    from edgeft.core.workspace import Workspace
    from edgeft.devices import profiles
    from edgeft.stages import planning

    shutil.copytree(base, ws)
    spread = [] if name == "one process" else ["--nproc", str(ranks), "--strategy", name]
    started = time.time()
    edgeft("train", str(ws), "--data", str(data), "--backend", "torch", "--max-steps", str(steps), "--batch-size", "2",
           "--seq-len", "256", "--truncation", "right", "--val-fraction", "0.01", "--eval-every", str(10 * steps),
           "--lr", "1e-4", "--no-recompute", *spread)
    wall = time.time() - started
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    prog = [r for r in rows if r["event"] == "progress"]
    rec = json.loads((ws / "manifest.json").read_text())["stages"]["train"]
    n = 1 if name == "one process" else ranks
    predicted = planning.for_workspace(Workspace(ws), rank_share(profiles.load("dev-2core-avx512"), n), 256, 2, backend="torch", recompute=False, ranks=n,
                                       strategy="ddp" if n == 1 else name)
    shutil.rmtree(ws)
    peaks = rec.get("rank_peak_rss_mb") or [rec["peak_rss_mb"]]
    training = rec.get("rank_training_peak_rss_mb") or peaks
    return {"run": name, "ranks": n, "rank_peak_rss_mb": peaks, "rank_training_peak_rss_mb": training,
            "step_s_median": statistics.median(r["step_s"] for r in prog[1:]), "wall_s": round(wall, 1),
            "final_loss": prog[-1]["loss"], "predicted_mb": round(predicted.memory.total / 1e6, 1),
            "predicted_step_s": round(predicted.step_s, 2), "predicted_comm_s": round(predicted.comm_s, 2),
            "predicted_breakdown_mb": {k: round(v / 1e6, 1) for k, v in vars(predicted.memory).items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    from tests.tiny_models import phi3_slice

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = phi3_slice("slice", root / "model", args.layers)
        base, data = root / "base", long_texts(root / "long.jsonl")
        edgeft("prepare", str(model), "--out", str(base), "--base-precision", "fp32")
        rows = []
        for name in RUNS:
            rows.append(run(name, base, root / "ws", data, args.steps, args.ranks))
            print(json.dumps(rows[-1]))
        params = json.loads((base / "manifest.json").read_text())["stages"]["prepare"]["params"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "layers": args.layers,
              "steps": args.steps, "base_params": params["base"], "trainable_params": params["trainable"], "rows": rows}
    report.save(args.out, "distributed", result, markdown)


def markdown(r: dict) -> str:
    lines = ["# Data-parallel strategies: memory per rank", "",
             f"Measured {r['date']} by `python benchmarks/distributed.py` on this 2-core CPU box (gloo): a real-width "
             f"Phi-3-mini slice ({r['layers']} layers, {r['base_params'] / 1e6:,.0f} M frozen fp32 parameters, "
             f"{r['trainable_params'] / 1e6:.2f} M trainable), global batch 2 x 256 tokens, {r['steps']} steps, "
             "the same run in one process and on 2 ranks under each strategy.", "",
             "| run | ranks | peak RSS per rank, loading included (MB) | peak RSS per rank while training (MB) | "
             "planner, per rank (MB) | planner vs training peak | step (s) | planner step (s), of it collectives |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        peaks, training = (" / ".join(f"{p:,.0f}" for p in row[k])
                           for k in ("rank_peak_rss_mb", "rank_training_peak_rss_mb"))
        error = row["predicted_mb"] / max(row["rank_training_peak_rss_mb"]) - 1
        lines.append(f"| {row['run']} | {row['ranks']} | {peaks} | {training} | {row['predicted_mb']:,.0f} | "
                     f"{error:+.0%} | {row['step_s_median']:.2f} | {row.get('predicted_step_s', 0):.2f}, "
                     f"{row.get('predicted_comm_s', 0):.2f} |")
    peak = {row["run"]: max(row["rank_training_peak_rss_mb"]) for row in r["rows"]}
    lines += ["", f"Reading: ddp and zero2 keep the whole base on every rank ({peak['ddp']:,.0f} and "
              f"{peak['zero2']:,.0f} MB; with LoRA, zero2's sharded optimizer state is small). zero3 and fsdp shard the "
              f"frozen base and read it one decoder layer at a time, sharding each before the next "
              f"({peak['zero3']:,.0f} and {peak['fsdp']:,.0f} MB, {1 - peak['zero3'] / peak['ddp']:.0%} and "
              f"{1 - peak['fsdp'] / peak['ddp']:.0%} below ddp): each rank holds half the base plus what is gathered "
              "around the layer being computed, about 1.6 layers' worth under ZeRO-3 and 2.6 under FSDP2 on gloo "
              "(the all-gather's output and its copy-out), so the saving grows with depth. Their steps are longer by "
              "the time to gather the base twice a step over gloo; step times on 2 CPU cores shared by 2 ranks are "
              "not a speed-up measure.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
