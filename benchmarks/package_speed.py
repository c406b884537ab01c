"""Packaging and inference: builder time and peak memory, bundle size per precision, and the int4 bundle's
decode speed and time to first token against transformers fp32 generate, on the same CPU.

    python benchmarks/package_speed.py [--layers 4] [--runs 3] [--out benchmarks/results]

The model is a real-width Phi-3-mini slice (hidden 3072, ffn 8192, vocab 32064, 32 heads; random weights,
`--layers` layers). Each build runs in its own process, as `edgeft package` builds it (int4 and int8 from
a copy quantized one weight at a time) and, for comparison, as the builder quantizes the fp32 folder itself;
the peak is the larger of that process's VmHWM and its builder child's. Inference: `edgeft bench`'s genai child (its own process) and a transformers
child, each with the same 128-token prompt and 64 new tokens (no early stop), median over runs after a
warm-up. Goals: builder peak <= 2x the fp32 model size; int4 decode >= 3x transformers fp32.
"""

from __future__ import annotations

import argparse
import json
import os
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

BUILD_CHILD = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from edgeft.stages.package import builder as package
from edgeft.devices.profiles import Quantization
args = json.loads(sys.argv[1])
quant = Quantization(precision=args["precision"])
out, cache = Path(args["out"]), Path(args["cache"])
if args["route"] == "edgeft":
    info = package.build(Path(args["model"]), out, cache, args["precision"], "cpu", quant)
else:
    info = {{"builder_input": "fp32", "builder_seconds": package.run_builder(Path(args["model"]), out, cache,
                                                                          args["precision"], "cpu", quant)}}
own = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
builder = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{**info, "own_peak_kb": own, "builder_peak_kb": builder}}))
"""

TRANSFORMERS_CHILD = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32, local_files_only=True).eval()
ids = torch.tensor([args["prompt"]])
ttft, decode = [], []
with torch.no_grad():
    for i in range(args["runs"] + 1):
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["new"], min_new_tokens=args["new"],
                       do_sample=False)
        t2 = time.perf_counter()
        if i:
            ttft.append(t1 - t0)
            decode.append((t2 - t1) - (t1 - t0))  # the full generate minus its prefill + first token
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"ttft_s": ttft, "decode_s": decode, "peak_rss_mb": peak / 1024}))
"""


def build_model(out: Path, layers: int) -> Path:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.tiny_models import phi3_slice as build; "
            f"build('slice', __import__('pathlib').Path({str(out)!r}), {layers})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return out


def build_bundle(model: Path, out: Path, precision: str, route: str, cache: Path) -> dict:
    """One build in its own process: `edgeft package`'s (route "edgeft": int4/int8 from the quantized copy) or the
    builder left to quantize the fp32 folder itself (route "builder"). Peak: the larger of that process and the
    builder it runs."""
    from edgeft.stages.package import builder as package

    t = time.time()
    proc = subprocess.run([sys.executable, "-c", BUILD_CHILD.format(repo=str(REPO)), json.dumps(
        {"model": str(model), "out": str(out), "cache": str(cache), "precision": precision, "route": route})],
        capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    package.set_cpu_threads(out, os.cpu_count() or 1)  # as `edgeft package` leaves a bundle
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"precision": precision, "route": route, "builder_input": info["builder_input"],
            "seconds": round(time.time() - t, 1), "peak_rss_mb": max(info["own_peak_kb"], info["builder_peak_kb"]) / 1024,
            "prequantize_peak_mb": info["own_peak_kb"] / 1024 if info["builder_input"] == "prequantized" else None,
            "builder_peak_mb": info["builder_peak_kb"] / 1024, "bundle_mb": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    from edgeft.models.shapes import safetensors_params
    from edgeft.stages import bench

    (REPO / "artifacts").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "artifacts") as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model", args.layers)
        fp32_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        builds = []
        for precision, route in (("fp32", "edgeft"), ("int8", "builder"), ("int8", "edgeft"), ("int4", "builder"),
                                 ("int4", "edgeft")):
            bundle = tmp / f"bundle-{precision}-{route}"
            builds.append(build_bundle(model, bundle, precision, route, tmp / "cache"))
            print(json.dumps(builds[-1]), flush=True)
            if (precision, route) != ("int4", "edgeft"):
                shutil.rmtree(bundle)
        prompt = [int(x) for x in bench._tokens(model, None)[:128]]
        genai = bench.bench_inference(tmp / "bundle-int4-edgeft", args.runs, 128, 64, None, tmp)
        proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_CHILD,
                               json.dumps({"model": str(model), "prompt": prompt, "new": 64, "runs": args.runs})],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        hf = json.loads(proc.stdout.strip().splitlines()[-1])
        params = safetensors_params(model)
    hf_decode = statistics.median(63 / d for d in hf["decode_s"])
    hf_ttft = 1000 * statistics.median(hf["ttft_s"])
    result = {
        "machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "params": params,
        "fp32_model_mb": fp32_mb, "builds": builds, "runs": args.runs,
        "int4_genai": {"decode_tokens_per_s": genai["decode_tokens_per_s"]["median"], "ttft_ms": genai["ttft_ms"]["median"],
                       "peak_rss_mb": genai["peak_rss_mb"]},
        "transformers_fp32": {"decode_tokens_per_s": hf_decode, "ttft_ms": hf_ttft, "peak_rss_mb": hf["peak_rss_mb"]},
    }
    result["decode_speedup"] = result["int4_genai"]["decode_tokens_per_s"] / hf_decode
    result["ttft_speedup"] = hf_ttft / result["int4_genai"]["ttft_ms"]
    report.save(args.out, "package", result, markdown)


def markdown(r: dict) -> str:
    lines = ["# Packaging and inference", "",
             f"Measured {r['date']} on {r['machine']} by `python benchmarks/package_speed.py`: a real-width Phi-3-mini "
             f"slice with {r['layers']} layers ({r['params'] / 1e9:.2f} B parameters, {r['fp32_model_mb']:.0f} MiB fp32 "
             "safetensors), random weights. Goals: builder peak <= 2x the fp32 model; int4 decode >= 3x transformers "
             "fp32 generate.", "",
             "Each build runs in its own process; its peak is the larger of that process (which writes the "
             "quantized copy) and the builder process it starts. `edgeft package` builds int4 and int8 from a copy it "
             "quantizes one weight at a time (edgeft/quant/prequantize.py); the builder rows are the builder left to "
             "quantize the fp32 folder itself, as package did before.", "",
             "| precision | route | build time | peak RSS | peak / fp32 model | bundle size |",
             "|---|---|---|---|---|---|"]
    for b in r["builds"]:
        ratio = b["peak_rss_mb"] / r["fp32_model_mb"]
        route = ("`edgeft package`" + (" (quantized copy)" if b["builder_input"] == "prequantized" else "")
                 if b["route"] == "edgeft" else "builder from fp32")
        lines.append(f"| {b['precision']} | {route} | {b['seconds']:.0f} s | {b['peak_rss_mb']:.0f} MiB | "
                     f"**{ratio:.2f}x** {'ok' if ratio <= 2 else 'over'} | {b['bundle_mb']:.0f} MiB |")
    g, h = r["int4_genai"], r["transformers_fp32"]
    lines += ["", f"Inference, 128-token prompt, 64 new tokens, median of {r['runs']} runs after a warm-up:", "",
              "| runner | decode tokens/s | time to first token | peak RSS |", "|---|---|---|---|",
              f"| int4 bundle, onnxruntime-genai | {g['decode_tokens_per_s']:.1f} | {g['ttft_ms']:.0f} ms | "
              f"{g['peak_rss_mb']:.0f} MiB |",
              f"| fp32, transformers generate | {h['decode_tokens_per_s']:.1f} | {h['ttft_ms']:.0f} ms | "
              f"{h['peak_rss_mb']:.0f} MiB |", "",
              f"Decode speed-up **{r['decode_speedup']:.1f}x** (goal >= 3x); time to first token "
              f"{r['ttft_speedup']:.1f}x faster."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
