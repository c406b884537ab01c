"""Full-size Phi-3-mini (3.8 B parameters) from prepare to an int4 bundle, trained on an int4 base, on one machine.

    python benchmarks/full_size.py [--model DIR] [--work DIR] [--device intel-n100-mini-pc-8gb]
                                   [--steps 4] [--seq-len 256] [--out benchmarks/results]

The model is the real Phi-3-mini-4k architecture (hidden 3072, 32 layers, ffn 8192, vocab 32064), with random
weights written the way the real checkpoint ships: bfloat16 safetensors shards of at most 2 GB with an index
(`--model` takes a real checkpoint folder instead). Then, each its own process, as a user would run them:
`edgeft plan` (the device profile's prediction), `edgeft prepare --base-precision int4`, `edgeft export
--recompute` (its weights streamed from the shards), `edgeft train` for a few steps at batch 1 x seq-len on
the sample task, `edgeft bench` for the step time, tokens/s and MFU, then `edgeft merge` (streamed) and
`edgeft package` (int4, from edgeft's quantized copy). Measured: the peak RSS of every
stage (the largest process it ran, from getrusage) and its wall time. Writes full_size.json and full_size.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.package_speed import build_bundle  # noqa: E402

SHARD_BYTES = 2 * 10**9
EXPORT_CEILING_GB = 12.0


def phi3_mini_config():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                      tie_word_embeddings=False, dtype="bfloat16", architectures=["Phi3ForCausalLM"])


def build(out: Path, seed: int = 0) -> Path:
    """A random-weight Phi-3-mini folder written one tensor at a time (never the whole model in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_tokenizer

    if (out / "model.safetensors.index.json").is_file():
        return out
    config = phi3_mini_config()
    with init_empty_weights():
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]  # shard contents, planned from the shapes: bf16 is 2 bytes a value
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * config.initializer_range).bfloat16()
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * shape.numel() for shape in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def stage(name: str, *argv: str) -> dict:
    """Run `edgeft ARGV` in a child that reports the peak RSS of the largest process under it."""
    probe = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
             "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "edgeft", *argv],
                          capture_output=True, text=True)
    seconds = time.time() - t
    if proc.returncode:
        raise SystemExit(f"edgeft {' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.rsplit("peak_kb", 1)[1].split()[0])
    print(f"{name}: {seconds:.0f} s, peak {peak_kb / 2**20:.2f} GiB", flush=True)
    return {"stage": name, "seconds": round(seconds, 1), "peak_gib": round(peak_kb / 2**20, 3), "stdout": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Phi-3-mini checkpoint folder (default: random weights, built here)")
    parser.add_argument("--work", help="where the model and workspace go (default: a temporary folder)")
    parser.add_argument("--device", default="intel-n100-mini-pc-8gb", help="the edge profile that plans the run")
    parser.add_argument("--here", default="dev-2core-avx512", help="this machine's profile, for MFU")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    from edgeft.tasks.home import DATA_DIR

    work = Path(args.work or tempfile.mkdtemp(prefix="edgeft-full-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    model = Path(args.model) if args.model else build(work / "phi3-mini")
    build_s = time.time() - t
    ws = work / "ws"
    evals = work / "eval.jsonl"  # a few rows: evaluation here proves the path, the sample task's 150 would take long
    evals.write_text("".join((DATA_DIR / "val.jsonl").read_text().splitlines(keepends=True)[:8]))
    seq, steps = str(args.seq_len), str(args.steps)
    planned = stage("plan", "plan", str(model), "--device", args.device, "--seq-len", seq, "--json")
    planned_here = stage("plan here", "plan", str(model), "--device", args.here, "--seq-len", seq,
                         "--base-precision", "int4", "--recompute", "--json")
    stages = [stage("prepare", "prepare", str(model), "--out", str(ws), "--device", args.device),
              stage("export", "export", str(ws)),
              stage("train", "train", str(ws), "--data", str(DATA_DIR / "train.jsonl"), "--eval-data", str(evals),
                    "--max-steps", steps, "--seq-len", seq, "--batch-size", "1", "--device", args.device,
                    "--eval-every", steps, "--save-every", steps),
              stage("bench", "bench", str(ws), "--device", args.here, "--seq-len", seq, "--batch-size", "1",
                    "--runs", str(args.runs)),
              stage("merge", "merge", str(ws), "--checkpoint", "last"),
              stage("package", "package", str(ws), "--device", args.device, "--force")]
    manifest = json.loads((ws / "manifest.json").read_text())["stages"]
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # the build alone, in its own process
        package_build = build_bundle(ws / "merged", Path(tmp) / "bundle", "int4", "edgeft", Path(tmp) / "cache")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "device": args.device, "here": args.here, "seq_len": args.seq_len, "steps": args.steps,
              "model": str(model) if args.model else "random-weight Phi-3-mini-4k (bf16 shards, built here)",
              "build_s": round(build_s, 1), "plan": json.loads(planned["stdout"]),
              "plan_here": json.loads(planned_here["stdout"]),
              "stages": [{k: v for k, v in s.items() if k != "stdout"} for s in stages],
              "prepare": {k: manifest["prepare"][k] for k in ("params", "plan", "seconds")},
              "export": {k: manifest["export"][k] for k in ("weights", "verification", "timing_s", "memory_mb",
                                                           "recompute", "base_weights")},
              "train": {k: manifest["train"][k] for k in ("step", "best_eval_loss", "tokens_seen", "tokens_per_s",
                                                          "peak_rss_mb", "wall_s")}
              | {"losses": [r["loss"] for r in map(json.loads, (ws / "train" / "metrics.jsonl").read_text().splitlines())
                            if r["event"] == "progress"]},
              "bench": json.loads((ws / "bench" / "bench.json").read_text())["training"],
              "merge": {k: manifest["merge"][k] for k in ("verification", "seconds", "peak_rss_mb")},
              "package": {k: manifest["package"][k] for k in ("precision", "verification", "bytes", "seconds",
                                                              "build_seconds", "peak_rss_mb")}
              | {"build": json.loads((ws / "bundle" / "manifest.json").read_text())["build"]},
              "package_build": package_build}
    report.save(Path(args.out), "full_size", result, markdown)


def markdown(r: dict) -> str:
    gib = 2**30
    plan, here, export, bench = r["plan"], r["plan_here"], r["export"], r["bench"]
    mem = export["memory_mb"]
    lines = [f"# Full-size Phi-3-mini, int4 base: prepare, export, train, merge, package ({r['date']})", "",
             f"{r['model']}; 3.82 B frozen parameters, LoRA r16 on every Linear of the 32 layers. Measured on "
             f"{r['machine']}, 24 GiB, each stage its own process as a user runs it; peaks are the largest "
             "process of each stage (getrusage). `python benchmarks/full_size.py`.", "",
             "| stage | wall time | peak RSS | limit |", "|---|---|---|---|"]
    limits = {"export": f"{EXPORT_CEILING_GB:g} GB", "train": "8 GB", "bench": "8 GB"}
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.0f} s | {s['peak_gib']:.2f} GiB "
                     f"({s['peak_gib'] * gib / 1e9:.2f} GB) | {limits.get(s['stage'], '')} |")
    lines += ["", "Export, step by step (its own record; the PyTorch reference and the trace run in the export "
              f"process, the rest in the training runtime): weights `{export['weights']}`, recomputation "
              f"{'on' if export['recompute'] else 'off'} ({r['prepare']['plan']['base_precision']} base and "
              f"recomputation picked by `prepare --device {r['device']}`).", "",
              "| step | seconds | peak RSS |", "|---|---|---|"]
    t = export["timing_s"]
    for step, secs, peak in (("PyTorch reference: loss and LoRA gradients, one layer loaded at a time", t["reference"],
                              mem["torch_export_peak_rss"]),
                             ("trace (placeholder weights)", t["trace"], mem["torch_export_peak_rss"]),
                             ("weights streamed into base.data, int4", t["externalize"], mem["externalize_peak_rss"]),
                             ("generate_artifacts + recomputation", t["generate_artifacts"],
                              mem["generate_artifacts_peak_rss"]),
                             ("verify (training session, probe batch)", t["verify"], mem["verify_peak_rss"])):
        lines.append(f"| {step} | {secs:.0f} | {peak / 1024:.2f} GiB |")
    v = export["verification"]
    lines += ["", f"Verification against PEFT (the same int4 base, fake-quantized, one layer resident at a time): "
              f"ORT loss {v['ort_eval_loss']:.6f} vs PyTorch {v['torch_loss']:.6f} (relative "
              f"{v['relative_difference']:.1e}), LoRA gradients relative error "
              f"{v['gradient_relative_error']:.1e}. base.data {export['base_weights']['bytes'] / gib:.2f} GiB.", "",
              f"Training: `edgeft train` {r['train']['step']} steps on the sample task (batch 1, up to "
              f"{r['seq_len']} tokens): losses {', '.join(f'{x:.3f}' for x in r['train']['losses'])}; peak "
              f"{r['train']['peak_rss_mb'] / 1024:.2f} GiB.", "",
              f"Full-length steps (`edgeft bench`, batch 1 x {bench['seq_len']}, median of "
              f"{bench['step_s']['runs']}):", "",
              "| | step | tokens/s | peak RSS | MFU |", "|---|---|---|---|---|",
              f"| measured, this machine | {bench['step_s']['median']:.1f} s | {bench['tokens_per_s']['median']:.2f} | "
              f"{bench['peak_rss_mb'] / 1024:.2f} GiB | {bench['mfu']:.1%} of {bench['peak_gflops']:.0f} GFLOP/s fp32"
              + (f", {bench['mfu_int8']:.1%} of the int8 peak" if "mfu_int8" in bench else "") + f" ({r['here']}) |",
              f"| planned, this machine ({r['here']}) | {here['step_s']:.1f} s | {here['tokens_per_s']:.2f} | "
              f"{here['memory_bytes']['total'] / gib:.2f} GiB | |",
              f"| planned, {r['device']} | {plan['step_s']:.1f} s | {plan['tokens_per_s']:.2f} | "
              f"{plan['memory_bytes']['total'] / gib:.2f} GiB of {plan['budget_bytes'] / gib:.2f} | "
              f"fits: {'yes' if plan['fits'] else 'no'} |", ""]
    if "merge" in r:
        m, p = r["merge"], r["package"]
        v, pv, build = m["verification"], p["verification"], p["build"]
        lines += [f"Merge (`edgeft merge`, the base {v['weights']} one decoder layer at a time): PEFT logits vs the "
                  f"training runtime's eval model {v.get('peft_vs_ort_eval_max_abs', float('nan')):.1e}, merged model "
                  f"vs PEFT {v['merged_vs_peft_max_abs']:.1e} (max abs; the largest logit is {v['logit_scale']:.3g}, the "
                  f"tolerance {v['tolerance']:g} of it); "
                  f"{m['seconds']:.0f} s, the merge process peaked at {m['peak_rss_mb'] / 1024:.2f} GiB.", "",
                  f"Package (`edgeft package --device {r['device']}`, {p['precision']}): builder input "
                  f"{build['builder_input']}"
                  + (f" (quantized by edgeft in {build['prequantize']['seconds']:.0f} s)" if "prequantize" in build
                     else "")
                  + f", builder {build['builder_seconds']:.0f} s; bundle {p['bytes'] / gib:.2f} GiB; {p['seconds']:.0f} s "
                  f"in all. Verification against transformers fp32 on the merged model (random weights: logits "
                  f"matter more than tokens): token agreement {pv['token_agreement']:.0%}, max logit error "
                  f"{pv['max_logit_error']:.2e}. The reference: {pv['reference']}; the package process (reference "
                  f"and genai runs, not the builder's process) peaked at {p['peak_rss_mb'] / 1024:.2f} GiB.", ""]
        b = r["package_build"]
        lines += [f"The build alone (`package.build`, its own process, as `benchmarks/package_speed.py` measures it): "
                  f"{b['seconds']:.0f} s, peak {b['peak_rss_mb'] / 1024:.2f} GiB (the quantized copy's writer "
                  f"{b['prequantize_peak_mb'] / 1024:.2f} GiB), **{b['peak_rss_mb'] * 2**20 / (4 * r['prepare']['params']['base']):.2f}x** "
                  f"the fp32 weights; bundle {b['bundle_mb'] / 1024:.2f} GiB.", ""]
    if r.get("note"):  # how this record departs from one run of this script
        lines += [r["note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
