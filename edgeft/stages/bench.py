"""bench: speed and memory on this machine, with the real runtimes, judged against a device profile.

- training (a workspace with training artifacts, or a prepared one for the torch backend): the training
  runtime runs one warm-up step and N timed steps on full-length batches: step time, tokens/s, MFU against
  the profile's peak, the process's peak RSS, and the planner's prediction beside them;
- inference (a bundle, or a workspace's bundle): onnxruntime-genai in its own process; per run a fresh
  generator takes a prompt of `--prompt-tokens` tokens and generates `--new-tokens`: time to first token,
  prompt tokens/s, decode tokens/s, peak RSS.
Figures are median / min / max over the runs, each marked pass or fail against the profile's budgets
(or "not judged" where the profile sets none). Writes bench.md, bench.json and bench.png.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeft.core import atomic, plots, rss
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.devices import genai_bench
from edgeft.devices.profiles import Profile
from edgeft.runtime import jobs, launcher
from edgeft.stages import planning
from edgeft.stages.bundle import own_adapter
from edgeft.stages.export import Exported, check_artifacts
from edgeft.stages.package.stage import Packaged
from edgeft.stages.prepare import Prepared


@dataclass(frozen=True)
class BenchConfig:
    runs: int = spec("timed runs per figure (after one warm-up)", 5, min=1, max=1000)
    seq_len: int = spec("training bench: tokens per sequence", 256, min=8)
    batch_size: int = spec("training bench: sequences per batch", 1, min=1)
    prompt_tokens: int = spec("inference bench: prompt length in tokens", 128, min=1)
    new_tokens: int = spec("inference bench: tokens generated per run (decode speed needs at least 2)", 64, min=2)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _tokens(model_dir: Path, data: Path | None) -> np.ndarray:
    """Real token ids to fill the batches and prompts: the data's text (the sample task by default)."""
    from edgeft.data.tokenize import load_tokenizer
    from edgeft.tasks.home import DATA_DIR

    tok = load_tokenizer(model_dir)
    path = Path(data or DATA_DIR / "train.jsonl")
    if not path.is_file():
        raise EdgeftError(f"--data {path} is not a file; pass a text or JSONL file to fill the batches and prompts")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[:400]
    except UnicodeDecodeError:
        raise EdgeftError(f"--data {path} is not UTF-8 text (a binary file?); pass a text or JSONL file") from None
    ids = np.asarray([i for row in tok(lines, add_special_tokens=False)["input_ids"] for i in row], dtype=np.int32)
    if not len(ids):
        raise EdgeftError(f"--data {path} holds no text to fill the batches and prompts with")
    return ids


def bench_training(ws: Workspace, profile: Profile | None, runs: int, seq_len: int, batch_size: int,
                   backend: str, work: Path, data: Path | None) -> dict:
    """The training side of a workspace: timed steps of its engine, the plan's prediction beside them."""
    prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    if backend == "ort":
        check_artifacts(ws, ws.require(Exported, f"the ort backend benches exported artifacts; run "
                                                 f"`edgeft export {ws.root}`"))
    if seq_len > prep.max_seq_len:
        raise EdgeftError(f"--seq-len {seq_len} exceeds {prep.max_seq_len}, the longest sequence this model was "
                          f"exported for; use <= {prep.max_seq_len}")
    predicted = planning.for_workspace(ws, profile, seq_len, batch_size, backend=backend)
    tokens_path = work / "tokens.npy"
    np.save(tokens_path, _tokens(prep.model_dir, data))
    job = jobs.BenchTraining(backend=backend, batch_size=batch_size, seq_len=seq_len, runs=runs,
                             tokens=str(tokens_path), artifacts=str(ws.artifacts), model_dir=str(prep.model_dir),
                             adapter_init=str(ws.adapter_init), base_quant=prep.config.base_quant,
                             recompute=predicted.run.recompute)
    result = launcher.run(job, log_path=ws.log("bench-train"), cwd=work)
    step = _stats(result["step_s"])
    tokens = batch_size * seq_len
    out = {"backend": backend, "batch_size": batch_size, "seq_len": seq_len, "step_s": step,
           "tokens_per_s": _stats([tokens / s for s in result["step_s"]]),
           "peak_rss_mb": result["peak_rss_mb"],
           "predicted": {"peak_rss_mb": predicted.memory.total / 2**20, "step_s": predicted.step_s}}
    if profile:
        out["mfu"] = predicted.flops_per_step / step["median"] / (predicted.peak_gflops * 1e9)
        out["peak_gflops"] = predicted.peak_gflops
        if profile.cpu.peak_int8_gops:  # against the int8 kernels' peak too (an int4 base's matmuls can run there)
            out["mfu_int8"] = predicted.flops_per_step / step["median"] / (profile.cpu.peak_int8_gops.value * 1e9)
            out["peak_int8_gops"] = profile.cpu.peak_int8_gops.value
    return out


def bench_inference(bundle: Path, runs: int, prompt_tokens: int, new_tokens: int, data: Path | None,
                    log_dir: Path) -> dict:
    """The bundle's time to first token and decode speed, in a process of its own (its adapter active)."""
    adapter = own_adapter(bundle)
    job = jobs.BenchInference(bundle=str(bundle), prompt=bench_prompt(bundle, prompt_tokens, data), new_tokens=new_tokens,
                              runs=runs, adapter=adapter.relative_to(bundle).as_posix() if adapter else None)
    result = launcher.run(job, log_path=log_dir / "bench-inference.log")
    return inference_figures(result, prompt_tokens, new_tokens, job.adapter, bundle)


def bench_prompt(bundle: Path, prompt_tokens: int, data: Path | None) -> list[int]:
    """`prompt_tokens` real token ids (the data's text, repeated if short)."""
    ids = _tokens(bundle, data)
    if len(ids) < prompt_tokens:
        ids = np.tile(ids, -(-prompt_tokens // max(len(ids), 1)))
    return ids[:prompt_tokens].tolist()


def inference_figures(result: dict, prompt_tokens: int, new_tokens: int, adapter: str | None, bundle) -> dict:
    """genai_bench's timings as the report's figures."""
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "adapter": adapter,
            "ttft_ms": _stats([1000 * t for t in result["ttft_s"]]),
            "prompt_tokens_per_s": _stats([prompt_tokens / t for t in result["ttft_s"]]),
            "decode_tokens_per_s": _stats([(new_tokens - 1) / t for t in result["decode_s"]]),
            "peak_rss_mb": result["peak_rss_mb"], "bundle": str(bundle)}


def genai_child(job: jobs.BenchInference) -> dict:
    """Runs in its own process so that its peak RSS is the app's: model load, prefill, decode (with the bundle's
    adapter active, if it ships swappable ones)."""
    from edgeft.stages.bundle import load_adapter, open_model
    from edgeft.trainer import events

    model = open_model(Path(job.bundle))
    active = load_adapter(model, Path(job.bundle) / job.adapter) if job.adapter else None
    timed = genai_bench.time_generation(model, job.prompt, job.new_tokens, job.runs, active,
                                        lambda i, t: events.progress(step=i, total=job.runs, ttft_s=t))
    return timed | {"peak_rss_mb": rss.peak_mb()}


# -- judging and writing ----------------------------------------------------------------------------------

def judge(report: dict, profile: Profile | None) -> list[dict]:
    """One row per figure: value, budget, pass/fail (or not judged)."""
    b = profile.budgets if profile else None
    rows = []

    def row(name, value, unit, budget, higher_is_better):
        entry = {"figure": name, "value": value, "unit": unit, "budget": None, "verdict": "not judged"}
        if budget is not None:
            ok = value >= budget if higher_is_better else value <= budget
            entry.update(budget=budget, verdict="pass" if ok else "fail")
        rows.append(entry)

    def budget(field, scale=1.0):
        figure = getattr(b, field, None) if b else None
        return figure.value * scale if figure else None

    mem = budget("peak_memory_gb", 1e9 / 2**20)
    if "training" in report:
        t = report["training"]
        row("training tokens/s (median)", t["tokens_per_s"]["median"], "tokens/s", budget("train_tokens_per_s"), True)
        row("training step time (median)", t["step_s"]["median"], "s", None, False)
        row("training peak RSS", t["peak_rss_mb"], "MiB", mem, False)
        if "mfu" in t:
            row("training MFU", t["mfu"], "of peak", None, True)
        if "mfu_int8" in t:
            row("training MFU against the int8 peak", t["mfu_int8"], "of peak", None, True)
    if "inference" in report:
        i = report["inference"]
        row("time to first token (median)", i["ttft_ms"]["median"], "ms", budget("ttft_ms"), False)
        row("prompt tokens/s (median)", i["prompt_tokens_per_s"]["median"], "tokens/s", None, True)
        row("decode tokens/s (median)", i["decode_tokens_per_s"]["median"], "tokens/s", budget("decode_tokens_per_s"),
            True)
        row("inference peak RSS", i["peak_rss_mb"], "MiB", mem, False)
    return rows


def markdown(report: dict) -> str:
    """The report as markdown: what was measured, and each figure against its budget."""
    lines = [f"# Bench on {report['device'] or 'no profile'}", "",
             f"Measured {report['date']} on {report['machine']}: median / min / max over {report['runs']} runs after "
             "one warm-up.", ""]
    if "training" in report:
        t = report["training"]
        lines += [f"Training: {t['backend']} backend, batch {t['batch_size']} x {t['seq_len']} tokens; step "
                  f"{t['step_s']['median']:.3f} s ({t['step_s']['min']:.3f}-{t['step_s']['max']:.3f}); planner "
                  f"predicted {t['predicted']['step_s']:.3f} s and {t['predicted']['peak_rss_mb']:.0f} MiB peak.", ""]
    if "inference" in report:
        i = report["inference"]
        active = f" with {i['adapter']} active" if i.get("adapter") else ""
        lines += [f"Inference: {i['bundle']}{active}, prompt {i['prompt_tokens']} tokens, {i['new_tokens']} new tokens; "
                  f"decode {i['decode_tokens_per_s']['min']:.1f}-{i['decode_tokens_per_s']['max']:.1f} tokens/s, "
                  f"TTFT {i['ttft_ms']['min']:.1f}-{i['ttft_ms']['max']:.1f} ms.", ""]
    lines += ["| figure | value | budget | verdict |", "|---|---|---|---|"]
    for r in report["judged"]:
        budget = f"{r['budget']:g} {r['unit']}" if r["budget"] is not None else "-"
        lines.append(f"| {r['figure']} | {r['value']:.4g} {r['unit']} | {budget} | **{r['verdict']}** |")
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


# panel field -> (title, the judged figure whose budget it shows)
PANELS = {("training", "tokens_per_s"): ("training tokens/s", "training tokens/s (median)"),
          ("inference", "decode_tokens_per_s"): ("decode tokens/s", "decode tokens/s (median)"),
          ("inference", "ttft_ms"): ("TTFT (ms)", "time to first token (median)")}


def chart(report: dict, out: Path) -> Path:
    """The report's figures as bars, with the budgets drawn in."""
    plt = plots.pyplot()
    panels = [key for key in PANELS if key[0] in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    budgets = {r["figure"]: r["budget"] for r in report["judged"]}
    for ax, (kind, field) in zip(axes[0], panels, strict=True):
        s = report[kind][field]
        title, figure = PANELS[kind, field]
        ax.bar(["min", "median", "max"], [s["min"], s["median"], s["max"]], color="tab:blue")
        if budgets.get(figure):
            ax.axhline(budgets[figure], color="tab:red", ls="--", label="budget")
            ax.legend()
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return plots.save(fig, out)


@dataclass(frozen=True)
class Benched(Record):
    """What bench recorded of a workspace: the profile, each figure's verdict, and the report."""

    STAGE: ClassVar[str] = "bench"
    device: str | None = spec("the profile judged against", None)
    report: str = spec("the report's markdown file", "")
    judged: dict = spec("figure -> pass, fail or not judged", default_factory=dict)


def key(ws: Workspace, profile: Profile | None, cfg: BenchConfig, backend: str | None, data: Path | None) -> str:
    """The bench stage's key: its options, the profile, the data's content and what it measures (the artifacts
    and the bundle)."""
    upstream = [r.key if r else None for r in (ws.read(Prepared), ws.read(Exported), ws.read(Packaged))]
    return key_of("bench", dataclasses.asdict(cfg), getattr(profile, "name", None), backend, ws.content(data),
                  upstream)


def unchanged(ws: Workspace, profile: Profile | None, cfg: BenchConfig = BenchConfig(), backend: str | None = None,
              data: Path | None = None) -> Benched | None:
    """The bench record if the same figures were measured of the same artifacts and bundle (edgeft run skips it;
    `edgeft bench` always measures)."""
    return ws.unchanged(Benched, key(ws, profile, cfg, backend, data))


def bench(target: Path, profile: Profile | None, cfg: BenchConfig = BenchConfig(), backend: str | None = None,
          data: Path | None = None, out: Path | None = None, what: tuple[str, ...] = ("training", "inference"),
          device=None) -> dict:
    """Bench a workspace (holding its lock: the report goes into it) or a bundle; the report. `device`: where the
    bundle runs instead of here (targets.bench.OnDevice: a device over SSH); training is then not measured."""
    target = Path(target).absolute()
    if not target.exists():
        raise EdgeftError(f"{target} does not exist; pass a workspace or a bundle folder")
    if (target / "genai_config.json").is_file():
        return _bench(target, None, profile, cfg, backend, data, Path(out or f"{target}-bench"), what, device)
    ws = Workspace(target)
    if not ws.manifest_path.is_file():
        raise EdgeftError(f"{target} is neither a workspace (no manifest.json) nor a bundle (no genai_config.json)")
    with ws.lock("bench"):
        out = Path(out or ws.bench_reports)
        report = _bench(target, ws, profile, cfg, backend, data, out, what, device)
        ws.write(Benched(device=report["device"], report=str(out / "bench.md"),
                         judged={r["figure"]: r["verdict"] for r in report["judged"]},
                         key=key(ws, profile, cfg, backend, data)))
    return report


def _bench(target: Path, ws: Workspace | None, profile: Profile | None, cfg: BenchConfig, backend: str | None,
           data: Path | None, out: Path, what: tuple[str, ...], device=None) -> dict:
    import platform

    if device is not None:
        what = tuple(w for w in what if w == "inference")  # training on the device is `train --on`
    runs, seq_len, batch_size = cfg.runs, cfg.seq_len, cfg.batch_size
    prompt_tokens, new_tokens = cfg.prompt_tokens, cfg.new_tokens
    is_bundle = ws is None
    backend = backend or (profile.execution_providers.training_backend if profile else "ort")
    report: dict = {"device": profile.name if profile else None,
                    "machine": device.name if device is not None else platform.node(),
                    "date": time.strftime("%Y-%m-%d"), "runs": runs, "target": str(target)}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if ws is not None and "training" in what and ws.read(Prepared) and (backend == "torch" or ws.read(Exported)):
        report["training"] = bench_training(ws, profile, runs, seq_len, batch_size, backend, work, data)
    bundle = target if is_bundle else ws.bundle
    if "inference" in what and (bundle / "genai_config.json").is_file():
        if device is not None:
            report["inference"] = device.bench_inference(bundle, runs, prompt_tokens, new_tokens, data)
        else:
            report["inference"] = bench_inference(bundle, runs, prompt_tokens, new_tokens, data, out)
    if "training" not in report and "inference" not in report:
        raise EdgeftError(f"nothing to bench in {target}: no training artifacts (`edgeft export`) and no bundle "
                          "(`edgeft package`)")
    report["judged"] = judge(report, profile)
    if not profile or not profile.budgets:
        report["note"] = (f"{profile.name if profile else 'No profile was given'}"
                          f"{' sets no budgets' if profile else ''}: every figure was measured, none was judged. "
                          "Add a `budgets:` section to the profile to judge them.")
    atomic.write_json(out / "bench.json", report)
    atomic.write_text(out / "bench.md", markdown(report))
    chart(report, out / "bench.png")
    return report
