"""Training speed and memory: ONNX Runtime vs PyTorch eager (PEFT), side by side in one process tree.

    python benchmarks/train_speed_memory.py [--only tiny|slice] [--steps N] [--rounds N] [--out benchmarks/results]
                                            [--profile NAME --name train]   # this machine's profile; results file

For each model (the tiny Phi-3 and a real-width Phi-3-mini slice: hidden 3072, ffn 8192, vocab 32064,
32 heads, 2 layers), one prepared + exported workspace is copied twice and trained with the same data,
options and steps by `edgeft train --backend ort` and `--backend torch`. Each backend runs in its own
subprocess, so its peak RSS (VmHWM) is its own; the backends alternate for --rounds rounds and the fastest
round of each is reported (this 2-core VM is shared and its speed drifts by 20 % between minutes).
Tokens/s is taken over the steps after the first (warm),
MFU is model FLOPs (4N + 2T per token) against the measured peak of this machine's profile (--profile).
The ratio depends on the CPU as much as on the runtimes: ORT's GEMM is MLAS on every CPU, PyTorch's is
Intel's MKL, and which is faster differs by CPU. Results: train.md (Intel Xeon, dev-2core-avx512),
train-epyc.md (AMD EPYC, dev-2core-epyc: `--profile dev-2core-epyc --name train-epyc`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from edgeft.runtime.jobs import Job  # noqa: E402

DATA = REPO / "edgeft" / "tasks" / "home_data" / "train.jsonl"
PROFILE = "dev-2core-avx512"
SETTINGS = {"tiny": {"batch": 8, "seq": 256, "layers": 2}, "slice": {"batch": 1, "seq": 256, "layers": 2}}


def edgeft(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"edgeft {' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def train(kind: str, backend: str, base: Path, ws: Path, steps: int, flops_per_token: float, peak: float) -> dict:
    """One `edgeft train` run on a copy of the exported workspace `base`; its speed and peak memory."""
    s = SETTINGS[kind]
    shutil.copytree(base, ws)
    t = time.time()
    edgeft("train", str(ws), "--data", str(DATA), "--backend", backend, "--max-steps", str(steps),
           "--batch-size", str(s["batch"]), "--seq-len", str(s["seq"]), "--truncation", "right",
           "--val-fraction", "0.01", "--eval-every", str(10 * steps), "--lr", "1e-4")
    wall = time.time() - t
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    prog = [r for r in rows if r["event"] == "progress"][1:]  # the first step includes session start-up
    tokens = sum(r["tokens"] for r in prog)
    seconds = sum(r["step_s"] for r in prog)
    rec = json.loads((ws / "manifest.json").read_text())["stages"]["train"]
    shutil.rmtree(ws)
    return {"tokens_per_s": tokens / seconds, "step_s_median": statistics.median(r["step_s"] for r in prog),
            "peak_rss_mb": rec["peak_rss_mb"], "wall_s": round(wall, 1),
            "mfu": tokens / seconds * flops_per_token / (peak * 1e9),
            "final_loss": prog[-1]["loss"], "step_tokens": [r["tokens"] for r in prog]}


def measure(kind: str, steps: int, rounds: int, root: Path, peak: float) -> dict:
    """`peak`: this machine's measured fp32 GFLOP/s, for MFU."""
    from edgeft.devices import plan
    from edgeft.models import shapes
    from tests.tiny_models import phi3_slice as build

    s = SETTINGS[kind]
    model = build(kind, root / f"{kind}-model", s["layers"])
    base = root / f"{kind}-ws"
    edgeft("prepare", str(model), "--out", str(base))
    edgeft("export", str(base))
    params = json.loads((base / "manifest.json").read_text())["stages"]["prepare"]["params"]
    flops_per_token = plan.training_flops_per_token(shapes.matmul_params(model), params["trainable"])
    row = {"model": kind, "layers": s["layers"], "base_params": params["base"], "trainable_params": params["trainable"],
           "batch": s["batch"], "seq_len": s["seq"], "steps": steps, "rounds": rounds}
    runs = {"ort": [], "torch": []}
    for _ in range(rounds):  # alternating, so that a slow spell of a shared machine hits both backends
        for backend in ("ort", "torch"):
            runs[backend].append(train(kind, backend, base, root / f"{kind}-{backend}", steps, flops_per_token, peak))
    for backend, done in runs.items():
        best = max(done, key=lambda r: r["tokens_per_s"])
        row[backend] = dict(best, peak_rss_mb=max(r["peak_rss_mb"] for r in done),
                            rounds_tokens_per_s=[round(r["tokens_per_s"], 1) for r in done])
    if kind == "slice":
        row["gemm"] = gemm(model, round(statistics.median(row["ort"]["step_tokens"])))
    for backend in ("ort", "torch"):
        row[backend].pop("step_tokens")
    row["speed_ratio"] = row["ort"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
    row["rss_ratio"] = row["ort"]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
    return row


def gemm_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of a Phi-3 layer's base matmuls and of the LM head."""
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    qkv = h + 2 * kv * h // config["num_attention_heads"]
    return [(h, qkv), (h, h), (h, 2 * f), (f, h), (h, config["vocab_size"])]


def _best(run, args: tuple, repeats: int) -> float:
    run(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - t)
    return best


@dataclass(frozen=True)
class OrtGemm(Job):
    ENTRY: ClassVar[str] = "benchmarks.train_speed_memory:ort_gemm"
    shapes: list
    tokens: int
    repeats: int


def ort_gemm(job: OrtGemm) -> dict:
    """Inside the training runtime: GFLOP/s of the frozen-base matmuls as the training graph runs them, the
    weight [in, out] and not prepacked (trainer/session.py hands it over with add_initializer, which ORT does
    not prepack; a graph input measures the same): forward MatMul(x, W), backward FusedMatMul(dy, W, transB)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    m, seconds, flops = job.tokens, 0.0, 0.0
    for k, n in job.shapes:
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        for rows, node in ((k, helper.make_node("MatMul", ["A", "W"], ["Y"])),
                           (n, helper.make_node("FusedMatMul", ["A", "W"], ["Y"], domain="com.microsoft", transB=1))):
            inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, rows]),
                      helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n])]
            graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                            helper.make_opsetid("com.microsoft", 1)])
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            a = rng.standard_normal((m, rows), dtype=np.float32)
            seconds += _best(session.run, (None, {"A": a, "W": w}), job.repeats)
            flops += 2.0 * m * k * n
    return {"gflops": flops / seconds / 1e9, "library": f"onnxruntime {ort.__version__} (MLAS)"}


def reference_gemm(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> dict:
    """The same matmuls with PyTorch (as the torch backend runs them: linear forward, dy @ W backward) and
    with numpy's BLAS."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for name in ("torch", "numpy"):
        seconds = flops = 0.0
        for k, n in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32) * 0.02  # [out, in], as nn.Linear holds it
            x, dy = (rng.standard_normal((tokens, d), dtype=np.float32) for d in (k, n))
            if name == "torch":
                tw, tx, tdy = (torch.from_numpy(v) for v in (w, x, dy))
                runs = ((torch.nn.functional.linear, (tx, tw)), (torch.matmul, (tdy, tw)))
            else:
                runs = ((np.matmul, (x, np.ascontiguousarray(w.T))), (np.matmul, (dy, w)))
            for run, operands in runs:
                seconds += _best(run, operands, repeats)
                flops += 2.0 * tokens * k * n
        out[name] = flops / seconds / 1e9
    out["libraries"] = f"torch {torch.__version__}, numpy {np.__version__}"
    return out


def gemm(model_dir: Path, tokens: int, repeats: int = 7) -> dict:
    """fp32 GEMM rates at the model's shapes and a step's token count, each library in its own process
    (ONNX Runtime: the training runtime child)."""
    from edgeft.runtime import launcher

    shapes = gemm_shapes(json.loads((model_dir / "config.json").read_text()))
    ort = launcher.run(OrtGemm(shapes=shapes, tokens=tokens, repeats=repeats))
    ref = reference_gemm(shapes, tokens, repeats)
    return {"tokens": tokens, "shapes": shapes, "ort": ort["gflops"], "torch": ref["torch"], "numpy": ref["numpy"],
            "libraries": f"{ort['library']}, {ref['libraries']}"}


def markdown(result: dict) -> str:
    lines = ["# Training: ONNX Runtime vs PyTorch eager", "",
             f"Measured {result['date']} on {result['machine']}{', ' + result['cpu'] if result.get('cpu') else ''} "
             f"({result['profile']}: measured peak "
             f"{result['peak_gflops']:g} GFLOP/s) by `python benchmarks/train_speed_memory.py`. Same workspace, data, "
             "options and steps for both; each backend in its own subprocess, the two alternating for "
             f"{result['rows'][0].get('rounds', 1)} rounds, the fastest round reported (all rounds: train.json) and the "
             "highest peak. Goals: ORT tokens/s >= PyTorch's, ORT "
             "peak RSS <= 1.2x PyTorch's. MFU = (4M + 2T) FLOPs/token x tokens/s / peak (M: matmul parameters, T: "
             "trainable).", "",
             "| model | params | batch x seq | ORT tok/s | torch tok/s | speed ORT/torch | ORT peak RSS | "
             "torch peak RSS | RSS ORT/torch | MFU ORT / torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, t = r["ort"], r["torch"]
        lines.append(f"| {r['model']} ({r['layers']} layers) | {r['base_params'] / 1e6:.1f} M | {r['batch']} x {r['seq_len']} "
                     f"| {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | **{r['speed_ratio']:.2f}x** | "
                     f"{o['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB | **{r['rss_ratio']:.2f}x** | "
                     f"{o['mfu']:.1%} / {t['mfu']:.1%} |")
    lines += ["", "The loss runs the LM head on the labelled tokens only, in both backends (trace.CausalLMLoss; "
              "the home task's chat data labels 38 % of its tokens); MFU still counts the head over every token, "
              "as model FLOPs do."]
    for r in result["rows"]:
        if g := r.get("gemm"):
            slower = g["ort"] < g["torch"]
            lines += ["", (f"Why ORT is slower on the {r['model']}: " if r["speed_ratio"] < 1 and slower else
                           f"The GEMM under the {r['model']}: ") +
                      "a training step there is almost all fp32 GEMM (ONNX Runtime's profile: 88 % of kernel time in "
                      "MatMul / FusedMatMul), so the ratio follows ONNX Runtime's MLAS GEMM against the BLAS PyTorch "
                      "uses, on this CPU. Measured in this run at the slice's matmul shapes (forward and backward of "
                      f"the frozen base and the head, {g['tokens']} tokens, as a step runs them):", "",
                      "| library | GFLOP/s |", "|---|---|",
                      f"| ONNX Runtime (MLAS) | {g['ort']:.0f} |", f"| PyTorch | {g['torch']:.0f} |",
                      f"| numpy (OpenBLAS) | {g['numpy']:.0f} |", "",
                      f"ORT / torch: {g['ort'] / g['torch']:.2f}x ({g['libraries']}). The profile's peak measurement: "
                      f"{result.get('peak_ref', '')}."]
            if slower:
                lines += ["", PERF_NOTE]
    return "\n".join(lines) + "\n"


PERF_NOTE = ("Where MLAS loses the time on the Intel Xeon (`perf record` on one MatMul of the training runtime, "
             "153 x 3072 by 3072 x 16384, 2026-11-23): 69 % of its samples are in MLAS's AVX-512 kernel (zmm FMAs, "
             "so the kernel choice is not the problem) and 29 % in copying the weight into packed panels. That copy "
             "is a pass over the whole weight at memory speed, run before the kernel rather than overlapped with "
             "it, and at a step's ~150 rows it is not amortized. Prepacking the frozen weights once removes it but "
             "keeps a packed copy per consumer (about 2x the frozen base), against the 1.2x memory goal; computing "
             "the backward as W @ dY^T, so the weight is read in place as the A operand, measured no faster.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=tuple(SETTINGS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="runs per backend, alternating; the fastest is reported")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--profile", default=PROFILE, help="this machine's device profile (its measured peak gives MFU)")
    ap.add_argument("--name", default="train", help="results file name (NAME.md, NAME.json)")
    args = ap.parse_args()
    from edgeft.devices import profiles

    profile = profiles.load(args.profile)
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO / "artifacts") as tmp:
        for kind in SETTINGS:
            if args.only in (None, kind):
                rows.append(measure(kind, args.steps, args.rounds, Path(tmp), profile.cpu.peak_fp32_gflops.value))
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": platform.node(), "cpu": profile.cpu.model, "date": time.strftime("%Y-%m-%d"),
              "profile": args.profile, "peak_gflops": profile.cpu.peak_fp32_gflops.value,
              "peak_ref": profile.cpu.peak_fp32_gflops.ref, "rows": rows}
    report.save(args.out, args.name, result, markdown)


if __name__ == "__main__":
    main()
