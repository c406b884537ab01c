"""eval: quality of the base, the fine-tuned adapter, the merged model and the packaged bundle, side by side.

For every variant the workspace has, on the same test file:
- loss and perplexity over the target tokens (assistant / completion tokens, masked exactly as training
  masks them), teacher-forced;
- the task metric from greedy answers: exact match of the parsed JSON action and per-field accuracy when
  every expected answer is a JSON object (the sample task), else exact match of the stripped text.

Variants: `base` zero-shot and `base few-shot` (k solved examples from the training data as earlier turns),
run by transformers; `adapter` (PEFT on the base) and `merged` by transformers; `bundle` by
onnxruntime-genai, the way an app runs it. Writes `WS/eval/report.{md,json}` and a bar chart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core import atomic, plots, state
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import Workspace
from edgeft.data import formats
from edgeft.data.tokenize import encode, load_tokenizer
from edgeft.tasks import home

VARIANTS = ("base", "base few-shot", "adapter", "merged", "bundle")


@dataclass(frozen=True)
class EvalConfig:
    shots: int = spec("solved examples in the few-shot baseline", 3, min=0, max=64)
    limit: int | None = spec("evaluate the first N test records only", None, min=1)
    max_new_tokens: int = spec("tokens generated per answer", 64, min=1)
    variants: list[str] | None = spec(f"which variants to evaluate: {', '.join(VARIANTS)} (default: all the "
                                      "workspace has)", None, choices=VARIANTS)


@dataclass
class Item:
    """One test sample: the prompt turns, the expected answer, and its tokenized full form."""

    prompt: list[dict] | str
    answer: str
    ids: np.ndarray
    mask: np.ndarray


def load_items(tok, path: Path, limit: int | None = None) -> list[Item]:
    read = formats.read(Path(path))
    if read.problems:
        p = read.problems[0]
        raise EdgeftError(f"{path}: {len(read.problems)} problem(s), first at line {p.line}: {p.message}; "
                          f"run `edgeft data check {path}`")
    items = []
    for record in read.records[:limit]:
        if record.format == "chat":
            msgs = record.data["messages"]
            if msgs[-1]["role"] != "assistant":
                raise EdgeftError(f"{path} line {record.line}: the last turn must be the assistant's answer to score")
            prompt, answer = msgs[:-1], msgs[-1]["content"]
        elif record.format == "prompt_completion":
            prompt, answer = record.data["prompt"], record.data["completion"]
        else:
            raise EdgeftError(f"{path}: eval needs chat or prompt/completion records (an answer to score), not text")
        enc = encode(tok, record)
        items.append(Item(prompt, answer, enc.input_ids, enc.loss_mask))
    if not items:
        raise EdgeftError(f"{path} has no records to evaluate")
    return items


def with_shots(prompt: list[dict] | str, shots: list[Item]) -> list[dict] | str:
    if isinstance(prompt, str):
        return "".join(f"{s.prompt}{s.answer}\n\n" for s in shots) + prompt
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = [m for s in shots for m in (*[m for m in s.prompt if m["role"] != "system"],
                                        {"role": "assistant", "content": s.answer})]
    return [*system, *turns, *prompt[len(system):]]


def shot_item(tok, x: Item, shots: list[Item]) -> Item:
    """The same sample with solved examples before it, tokenized as training would."""
    prompt = with_shots(x.prompt, shots)
    if isinstance(prompt, str):
        record = formats.Record(0, "prompt_completion", {"prompt": prompt, "completion": x.answer})
    else:
        record = formats.Record(0, "chat", {"messages": [*prompt, {"role": "assistant", "content": x.answer}]})
    enc = encode(tok, record)
    return Item(prompt, x.answer, enc.input_ids, enc.loss_mask)


def render_prompt(tok, prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def stop_ids(tok, config_eos) -> list[int]:
    ids = set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    for special in ("<|end|>", "<|eot_id|>", "<|im_end|>"):
        i = tok.convert_tokens_to_ids(special)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)


# -- transformers -----------------------------------------------------------------------------------------

def torch_answers(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    import torch

    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    try:
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=stop_ids(tok, model.config.eos_token_id))
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def torch_loss(model, items: list[Item], batch: int = 16) -> tuple[float, int]:
    """Mean NLL over target tokens, and their count."""
    import torch

    nll, count = 0.0, 0
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        width = max(len(x.ids) for x in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, x in enumerate(chunk):
            n = len(x.ids)
            ids[r, :n] = torch.from_numpy(x.ids.astype(np.int64))
            att[r, :n] = 1
            labels[r, :n] = torch.from_numpy(np.where(x.mask, x.ids, -100).astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return nll / max(count, 1), count


# -- onnxruntime-genai ------------------------------------------------------------------------------------

def genai_answers(model, tok, prompts: list[str], max_new_tokens: int, stop: list[int],
                  adapter: tuple | None = None) -> list[str]:
    import onnxruntime_genai as og

    from edgeft.stages.package import generator

    out = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = generator(model, params, adapter)
        gen.append_tokens(ids)
        new = []
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in stop:
                break
            new.append(token)
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


def genai_loss(model, items: list[Item], adapter: tuple | None = None) -> tuple[float, int]:
    """Teacher-forced NLL through the generator, one token at a time from the first target token."""
    import onnxruntime_genai as og

    from edgeft.stages.package import generator

    nll, count = 0.0, 0
    for x in items:
        targets = np.flatnonzero(x.mask)
        first = int(targets[0])
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(x.ids) + 1, do_sample=False)
        gen = generator(model, params, adapter)
        gen.append_tokens(x.ids[:first].astype(np.int32))
        for t in range(first, len(x.ids)):
            logits = np.asarray(gen.get_logits(), dtype=np.float64).reshape(-1)
            if x.mask[t]:
                top = logits.max()
                nll += top + math.log(np.exp(logits - top).sum()) - logits[x.ids[t]]
                count += 1
            if t + 1 < len(x.ids):
                gen.append_tokens(x.ids[t: t + 1].astype(np.int32))
    return nll / max(count, 1), count


# -- scoring ----------------------------------------------------------------------------------------------

def score(answers: list[str], items: list[Item]) -> dict:
    gold = [home.parse_action(x.answer) for x in items]
    if all(g is not None for g in gold) and all(x.answer.strip().startswith("{") for x in items):
        return home.score(answers, gold) | {"metric": "json_exact_match"}
    exact = sum(a.strip() == x.answer.strip() for a, x in zip(answers, items, strict=True))
    return {"samples": len(items), "exact_match": exact / len(items), "metric": "text_exact_match"}


def variant(name: str, runner: str, loss: tuple[float, int], answers: list[str], items: list[Item], seconds: float) -> dict:
    metrics = score(answers, items)
    return {"variant": name, "runner": runner, "loss": loss[0], "perplexity": math.exp(min(loss[0], 50)),
            "target_tokens": loss[1], **metrics, "seconds": round(seconds, 1),
            "examples": [{"expected": x.answer, "got": a} for x, a in list(zip(items, answers, strict=True))[:3]]}


def run(ws_path: Path, data: Path, cfg: EvalConfig = EvalConfig(), shots_from: Path | None = None, log=print) -> dict:
    """Evaluate every variant the workspace has on `data` (holding the workspace's lock: the report is written
    into it); the report."""
    ws = Workspace(ws_path)
    ws.require("prepare", f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    data = formats.check_path(Path(data), "--data")
    if shots_from is not None:
        shots_from = formats.check_path(Path(shots_from), "--shots-from")
    with ws.lock("eval"):
        return _run(ws, data, cfg, shots_from, log)


def _run(ws: Workspace, data: Path, cfg: EvalConfig, shots_from: Path | None, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    shots, limit, max_new_tokens, only = cfg.shots, cfg.limit, cfg.max_new_tokens, cfg.variants
    prep = ws.stage("prepare")
    model_dir = Path(prep["config"]["model_dir"])
    tok = load_tokenizer(model_dir)
    items = load_items(tok, Path(data), limit)
    prompts = [render_prompt(tok, x.prompt) for x in items]
    wanted = set(only or VARIANTS)
    results, skipped = [], {}

    def hf(name: str, load) -> None:
        if name not in wanted:
            return
        started = time.time()
        use_items, use_prompts = items, prompts
        if name == "base few-shot":
            source = shots_from or _train_data(ws)
            if source is None:
                skipped[name] = "no training data recorded; pass --shots-from FILE"
                return
            examples = load_items(tok, source, shots)
            use_items = [shot_item(tok, x, examples) for x in items]
            use_prompts = [render_prompt(tok, x.prompt) for x in use_items]
        log(f"eval: {name} ({len(items)} samples)")
        model = load().eval()
        with torch.no_grad():
            loss = torch_loss(model, use_items)
            answers = torch_answers(model, tok, use_prompts, max_new_tokens)
        results.append(variant(name, "transformers", loss, answers, items, time.time() - started))

    loaded: dict = {}

    def base():
        """The base model, loaded once for both base variants."""
        if "base" not in loaded:
            from edgeft.models.lazy import load_base

            loaded["base"] = load_base(model_dir)
        return loaded["base"]

    def take_base():
        """The base for PEFT, which injects the adapter in place: the base variants are done, the cache lets go."""
        model = base()
        loaded.clear()
        return model

    hf("base", base)
    hf("base few-shot", base)
    if (ws.root / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        def adapted():
            """The adapter on the base it was trained against: a quantized base's dequantized values."""
            from edgeft.quant import quantize

            model = PeftModel.from_pretrained(take_base(), ws.root / "adapter")
            quantize.fake_quantize_(model, quantize.settings(ws.stage("prepare")["config"]))
            return model

        hf("adapter", adapted)
        hf("merged", lambda: AutoModelForCausalLM.from_pretrained(ws.root / "merged", dtype=torch.float32,
                                                                  local_files_only=True))
    else:
        skipped["adapter"] = skipped["merged"] = f"not merged yet: `edgeft merge {ws.root}`"
    bundle = ws.root / "bundle"
    if "bundle" in wanted and (bundle / "genai_config.json").is_file():

        from edgeft.stages.package import REBUILD, load_adapter, open_model, own_adapter

        started = time.time()
        log(f"eval: bundle ({len(items)} samples, onnxruntime-genai)")
        model = open_model(bundle)
        manifest = bundle / "manifest.json"
        precision = state.read_json(manifest, "the bundle's manifest", REBUILD).get("precision", "?") \
            if manifest.is_file() else "?"
        name = f"bundle {precision}"
        active = None
        if (adapter := own_adapter(bundle)) is not None:  # a base+adapters bundle: its fine-tune is this adapter
            name, active = f"{name} + {adapter.name}", load_adapter(model, adapter)
        config_eos = state.read_json(bundle / "genai_config.json", "the bundle's genai_config.json", REBUILD,
                                     keys=("model",))["model"].get("eos_token_id")
        loss = genai_loss(model, items, active)
        answers = genai_answers(model, tok, prompts, max_new_tokens, stop_ids(tok, config_eos), active)
        results.append(variant(name, "onnxruntime-genai", loss, answers, items, time.time() - started))
    elif "bundle" in wanted:
        skipped["bundle"] = f"not packaged yet: `edgeft package {ws.root}`"
    report = {"data": str(Path(data).resolve()), "samples": len(items), "shots": shots, "results": results,
              "skipped": skipped}
    out = ws.root / "eval"
    with atomic.atomic_dir(out) as tmp:  # the three files of one report, or the previous report: never a mix
        atomic.write_json(tmp / "report.json", report)
        atomic.write_text(tmp / "report.md", markdown(report))
        chart(report, tmp / "report.png")
    ws.record("eval", {"data": report["data"], "samples": len(items),
                       "results": {r["variant"]: {k: r[k] for k in ("loss", "exact_match")} for r in results},
                       "report": str(out / "report.md")})
    return report


def _train_data(ws: Workspace) -> Path | None:
    rec = ws.stage("train")
    path = rec and rec.get("data", {}).get("data")
    return Path(path) if path and Path(path).is_file() else None


def markdown(report: dict) -> str:
    lines = [f"# Evaluation on {Path(report['data']).name} ({report['samples']} samples)", "",
             "| variant | runner | loss | perplexity | exact match | field accuracy | valid JSON | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        field = f"{r['field_accuracy']:.1%}" if "field_accuracy" in r else "-"
        valid = f"{r['valid_json']:.1%}" if "valid_json" in r else "-"
        lines.append(f"| {r['variant']} | {r['runner']} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
                     f"**{r['exact_match']:.1%}** | {field} | {valid} | {r['seconds']:.0f} s |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    lines += ["", f"Few-shot: {report['shots']} solved examples from the training data as earlier turns. Loss: mean "
              "NLL over the answer tokens (as trained), teacher-forced."]
    return "\n".join(lines) + "\n"


def chart(report: dict, out: Path) -> Path:
    plt = plots.pyplot()
    rows = report["results"]
    names = [r["variant"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar(names, [100 * r["exact_match"] for r in rows], color="tab:blue")
    ax1.set_ylabel("exact match (%)")
    ax1.set_ylim(0, 100)
    ax2.bar(names, [r["loss"] for r in rows], color="tab:orange")
    ax2.set_ylabel("answer loss (nats/token)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return plots.save(fig, out)
