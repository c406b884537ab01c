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

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeft.core import atomic, plots, state
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.data import formats
from edgeft.data.calls import arguments, parse_calls
from edgeft.data.tokenize import encode, load_tokenizer, template_message
from edgeft.models.lazy import load_base
from edgeft.quant import quantize
from edgeft.stages import card, tracking
from edgeft.stages.bundle import REBUILD, load_adapter, open_model, own_adapter
from edgeft.stages.merge import Merged
from edgeft.stages.package.stage import Packaged
from edgeft.stages.prepare import Prepared
from edgeft.stages.train import Trained
from edgeft.tasks import home

VARIANTS = ("base", "base few-shot", "adapter", "merged", "bundle")


@dataclass(frozen=True)
class EvalConfig:
    shots: int = spec("solved examples in the few-shot baseline", 3, min=0, max=64)
    limit: int | None = spec("evaluate the first N test records only", None, min=1)
    max_new_tokens: int = spec("tokens generated per answer", 64, min=1)
    variants: list[str] | None = spec(f"which variants to evaluate: {', '.join(VARIANTS)} (default: all the "
                                      "workspace has)", None, choices=VARIANTS, flag="--only")


@dataclass
class Item:
    """One test sample: the prompt turns, the expected answer, and its tokenized full form."""

    prompt: list[dict] | str
    answer: str
    ids: np.ndarray
    mask: np.ndarray
    tools: list | None = None  # the record's declared tools, rendered with the prompt
    calls: list | None = None  # the expected tool calls ({"name", "arguments"}), when the answer calls tools


def load_items(tok, path: Path, limit: int | None = None) -> list[Item]:
    """The test records of `path` (chat or prompt/completion) as scored items, the first `limit` of them."""
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
            prompt, answer = msgs[:-1], msgs[-1].get("content") or ""
            calls = [{"name": c["function"]["name"], "arguments": arguments(c["function"].get("arguments"))}
                     for c in msgs[-1].get("tool_calls") or []] or None
        elif record.format == "prompt_completion":
            prompt, answer = record.data["prompt"], record.data["completion"]
        else:
            raise EdgeftError(f"{path}: eval needs chat or prompt/completion records (an answer to score), not text")
        enc = encode(tok, record)
        items.append(Item(prompt, answer, enc.input_ids, enc.loss_mask, record.data.get("tools"),
                          calls if record.format == "chat" else None))
    if not items:
        raise EdgeftError(f"{path} has no records to evaluate")
    return items


def with_shots(prompt: list[dict] | str, shots: list[Item]) -> list[dict] | str:
    """The prompt with solved examples before it, as earlier turns (or text)."""
    if isinstance(prompt, str):
        return "".join(f"{s.prompt}{s.answer}\n\n" for s in shots) + prompt
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = [m for s in shots for m in (*[m for m in s.prompt if m["role"] != "system"], reply(s))]
    return [*system, *turns, *prompt[len(system):]]


def shot_item(tok, x: Item, shots: list[Item]) -> Item:
    """The same sample with solved examples before it, tokenized as training would."""
    prompt = with_shots(x.prompt, shots)
    if isinstance(prompt, str):
        record = formats.Record(0, "prompt_completion", {"prompt": prompt, "completion": x.answer})
    else:
        record = formats.Record(0, "chat", {"messages": [*prompt, reply(x)], **({"tools": x.tools} if x.tools else {})})
    enc = encode(tok, record)
    return dataclasses.replace(x, prompt=prompt, ids=enc.input_ids, mask=enc.loss_mask)


def reply(x: Item) -> dict:
    """The item's expected answer as an assistant message (its tool calls included)."""
    calls = [{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
             for c in x.calls or []]
    return {"role": "assistant", "content": x.answer, **({"tool_calls": calls} if calls else {})}


def render_prompt(tok, x: Item) -> str:
    """The prompt as the model sees it: chat turns (and the declared tools) through the template, ending where the
    answer starts."""
    if isinstance(x.prompt, str):
        return x.prompt
    return tok.apply_chat_template([template_message(m) for m in x.prompt], tools=x.tools, tokenize=False,
                                   add_generation_prompt=True)


def stop_ids(tok, config_eos) -> list[int]:
    """Token ids that end an answer: the config's EOS and the chat templates' end-of-turn tokens."""
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
    """transformers' greedy answers to `prompts`, in left-padded batches."""
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
    """onnxruntime-genai's greedy answers to `prompts`, as an app gets them."""
    import onnxruntime_genai as og

    from edgeft.stages.bundle import generator

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

    from edgeft.stages.bundle import generator

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
    """Exact match (and per-field accuracy for JSON actions) of the answers against the items'; for answers that
    call tools, call exact match: the calls parsed from the reply equal the expected ones (names and arguments,
    in any order)."""
    if any(x.calls for x in items):
        got = [sorted(json.dumps(c, sort_keys=True) for c in parse_calls(a)) for a in answers]
        want = [sorted(json.dumps(c, sort_keys=True) for c in x.calls or []) for x in items]
        names = sum(sorted(json.loads(c)["name"] for c in g) == sorted(json.loads(c)["name"] for c in w)
                    for g, w in zip(got, want, strict=True))
        return {"samples": len(items), "exact_match": sum(g == w for g, w in zip(got, want, strict=True)) / len(items),
                "name_match": names / len(items), "metric": "call_exact_match"}
    gold = [home.parse_action(x.answer) for x in items]
    if all(g is not None for g in gold) and all(x.answer.strip().startswith("{") for x in items):
        return home.score(answers, gold) | {"metric": "json_exact_match"}
    exact = sum(a.strip() == x.answer.strip() for a, x in zip(answers, items, strict=True))
    return {"samples": len(items), "exact_match": exact / len(items), "metric": "text_exact_match"}


def variant(name: str, runner: str, loss: tuple[float, int], answers: list[str], items: list[Item], seconds: float) -> dict:
    """One variant's row of the report: loss, perplexity, the task metric, time and a few examples."""
    metrics = score(answers, items)
    return {"variant": name, "runner": runner, "loss": loss[0], "perplexity": math.exp(min(loss[0], 50)),
            "target_tokens": loss[1], **metrics, "seconds": round(seconds, 1),
            "examples": [{"expected": x.answer or json.dumps(x.calls), "got": a}
                         for x, a in list(zip(items, answers, strict=True))[:3]]}


@dataclass(frozen=True)
class Evaluated(Record):
    """What eval recorded: the test data, and each variant's loss and exact match (the report has the rest)."""

    STAGE: ClassVar[str] = "eval"
    data: str = spec("the test data")
    samples: int = spec("records evaluated")
    results: dict = spec("variant -> loss and exact match")
    report: str = spec("the report's markdown file")


def key(ws: Workspace, data: Path, cfg: EvalConfig, shots_from: Path | None) -> str:
    """The eval stage's key: its options, the test data's and few-shot examples' content, and the keys of the
    stages whose outputs it evaluates."""
    shots = shots_from or _Models(ws, ws.read(Prepared)).train_data()
    upstream = [r.key if r else None for r in (ws.read(Prepared), ws.read(Merged), ws.read(Packaged))]
    return key_of("eval", dataclasses.asdict(cfg), ws.content(data), ws.content(shots), upstream)


def unchanged(ws: Workspace, data: Path, cfg: EvalConfig = EvalConfig(), shots_from: Path | None = None
              ) -> Evaluated | None:
    """The eval record if evaluating again would score the same variants on the same data."""
    return ws.unchanged(Evaluated, key(ws, data, cfg, shots_from)) if ws.read(Prepared) else None


def evaluate(ws_path: Path, data: Path, cfg: EvalConfig = EvalConfig(), shots_from: Path | None = None,
             log=print) -> dict:
    """Evaluate every variant the workspace has on `data` (holding the workspace's lock: the report is written
    into it); the report. `shots_from`: the few-shot examples (default: the training data)."""
    ws = Workspace(ws_path)
    prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    data = formats.check_path(Path(data), "--data")
    if shots_from is not None:
        shots_from = formats.check_path(Path(shots_from), "--shots-from")
    with ws.lock("eval"):
        tok = load_tokenizer(prep.model_dir)
        items = load_items(tok, data, cfg.limit)
        wanted = set(cfg.variants or VARIANTS)
        models = _Models(ws, prep)
        results, skipped = [], {}
        for name in ("base", "base few-shot", "adapter", "merged"):
            if name not in wanted:
                continue
            if why := models.missing(name, shots_from):
                skipped[name] = why
                continue
            log(f"eval: {name} ({len(items)} samples)")
            results.append(_transformers_variant(name, models, tok, items, cfg, shots_from))
        if "bundle" in wanted:
            if (ws.bundle / "genai_config.json").is_file():
                log(f"eval: bundle ({len(items)} samples, onnxruntime-genai)")
                results.append(_bundle_variant(ws.bundle, tok, items, cfg))
            else:
                skipped["bundle"] = f"not packaged yet: `edgeft package {ws.root}`"
        report = {"data": str(data.resolve()), "samples": len(items), "shots": cfg.shots, "results": results,
                  "skipped": skipped}
        with atomic.atomic_dir(ws.eval_reports) as tmp:  # the three files of one report, or the previous one
            atomic.write_json(tmp / "report.json", report)
            atomic.write_text(tmp / "report.md", markdown(report))
            chart(report, tmp / "report.png")
        ws.write(Evaluated(data=report["data"], samples=len(items), report=str(ws.eval_reports / "report.md"),
                           key=key(ws, data, cfg, shots_from),
                           results={r["variant"]: {k: r[k] for k in ("loss", "exact_match")} for r in results}))
        if results:
            card.add_evaluation(ws.adapter, report, ws.read(Evaluated).finished_at)
        if results and (trackers := tracking.Trackers.of_run(ws.training, ws.root.name)):
            with contextlib.closing(trackers):  # the training run's trackers get the table (train --report-to)
                trackers.table("eval", [{k: v for k, v in r.items() if isinstance(v, str | int | float)}
                                        for r in results])
    return report


class _Models:
    """The transformers variants of a workspace. The base is loaded once for both base variants, then handed to
    PEFT, which injects the adapter in place."""

    def __init__(self, ws: Workspace, prep: Prepared):
        self.ws, self.prep, self._base = ws, prep, None

    def missing(self, name: str, shots_from: Path | None) -> str | None:
        """Why a variant cannot run, or None."""
        if name == "base few-shot" and (shots_from or self.train_data()) is None:
            return "no training data recorded; pass --shots-from FILE"
        if name in ("adapter", "merged") and not (self.ws.adapter / "adapter_config.json").is_file():
            return f"not merged yet: `edgeft merge {self.ws.root}`"
        return None

    def train_data(self) -> Path | None:
        trained = self.ws.read(Trained)
        path = trained and trained.data.get("data")
        return Path(path) if path and Path(path).is_file() else None

    def load(self, name: str):
        import torch
        from transformers import AutoModelForCausalLM

        if name in ("base", "base few-shot"):
            if self._base is None:
                self._base = load_base(self.prep.model_dir)
            return self._base
        if name == "adapter":  # on the base it was trained against: a quantized base's dequantized values
            from peft import PeftModel

            base = self._base if self._base is not None else load_base(self.prep.model_dir)
            self._base = None  # PEFT changes it in place: not the base any more
            model = PeftModel.from_pretrained(base, self.ws.adapter)
            quantize.fake_quantize_(model, self.prep.config.base_quant)
            return model
        return AutoModelForCausalLM.from_pretrained(self.ws.merged, dtype=torch.float32, local_files_only=True)


def _transformers_variant(name: str, models: _Models, tok, items: list[Item], cfg: EvalConfig,
                          shots_from: Path | None) -> dict:
    import torch

    started = time.time()
    use_items = items
    if name == "base few-shot":
        examples = load_items(tok, shots_from or models.train_data(), cfg.shots)
        use_items = [shot_item(tok, x, examples) for x in items]
    model = models.load(name).eval()
    with torch.no_grad():
        loss = torch_loss(model, use_items)
        answers = torch_answers(model, tok, [render_prompt(tok, x) for x in use_items], cfg.max_new_tokens)
    return variant(name, "transformers", loss, answers, items, time.time() - started)


def _bundle_variant(bundle: Path, tok, items: list[Item], cfg: EvalConfig) -> dict:
    """The bundle as an app runs it (onnxruntime-genai); a base+adapters bundle with its fine-tune's adapter active."""
    started = time.time()
    model = open_model(bundle)
    manifest = bundle / "manifest.json"
    precision = state.read_json(manifest, "the bundle's manifest", REBUILD).get("precision", "?") \
        if manifest.is_file() else "?"
    name, active = f"bundle {precision}", None
    if (adapter := own_adapter(bundle)) is not None:
        name, active = f"{name} + {adapter.name}", load_adapter(model, adapter)
    config_eos = state.read_json(bundle / "genai_config.json", "the bundle's genai_config.json", REBUILD,
                                 keys=("model",))["model"].get("eos_token_id")
    loss = genai_loss(model, items, active)
    prompts = [render_prompt(tok, x) for x in items]
    answers = genai_answers(model, tok, prompts, cfg.max_new_tokens, stop_ids(tok, config_eos), active)
    return variant(name, "onnxruntime-genai", loss, answers, items, time.time() - started)


def markdown(report: dict) -> str:
    """The report as a markdown table."""
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
    """Exact match and answer loss per variant, as bars."""
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
