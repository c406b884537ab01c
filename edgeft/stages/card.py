"""The trained adapter as it travels: its base named portably, and a model card that says what it is.

PEFT writes `base_model_name_or_path` as the path the base was loaded from, an absolute path into this machine,
and a README that is its blank template. `describe_adapter` replaces both in WS/adapter/: the base is named by
the hub id its folder came from when the folder says (the Hugging Face cache's models--ORG--NAME/snapshots/REV
layout, or a config.json `_name_or_path` of the form ORG/NAME), else by the folder's name; the local path stays
in the workspace's manifest. The card gives the base, the data (file, sha256, size, samples, tokens), the
training settings and results, how to load the adapter with PEFT and in a bundle, and, once `edgeft eval` has
run, its results (`add_evaluation`: the card is documentation, left out of merge's recorded hashes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgeft.core import atomic, fingerprint

CARD = "README.md"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def portable_base_name(model_dir: Path) -> str:
    model_dir = Path(model_dir).resolve()
    parts = model_dir.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/", 1)
    try:
        recorded = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and HUB_ID.fullmatch(recorded) and not Path(recorded).is_absolute():
        return recorded
    return model_dir.name


def describe_adapter(adapter: Path, ws_name: str, model_dir: Path, prep, trained, step: int, checkpoint: str) -> str:
    """Rewrites `adapter`'s adapter_config.json (the base's portable name) and README.md (the card); the name."""
    from edgeft import __version__

    base = portable_base_name(model_dir)
    config_path = Path(adapter) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    atomic.write_json(config_path, config)
    atomic.write_text(Path(adapter) / CARD, card(ws_name, base, model_dir, prep, trained, step, checkpoint,
                                                       config, __version__))
    return base


def _data_line(label: str, path: str | None, split: dict | None) -> str:
    if not path:
        return f"- {label}: a {split and 'split of the training file' or 'none'}" + (
            f" ({split['samples']:,} samples, {split['tokens']:,} tokens)" if split else "")
    file = Path(path)
    about = (f"sha256 `{fingerprint.sha256_file(file)}`, {file.stat().st_size:,} bytes" if file.is_file()
             else "no longer at its path")
    counts = f", {split['samples']:,} samples, {split['tokens']:,} tokens" if split else ""
    return f"- {label}: `{file.name}` ({about}{counts})"


def card(ws_name: str, base: str, model_dir: Path, prep, trained, step: int, checkpoint: str, config: dict,
         version: str) -> str:
    t, data = trained.config, trained.data
    splits = data.get("splits", {})
    lora = prep.config
    best = f"{trained.best_eval_loss:.4f}" if trained.best_eval_loss is not None else "not evaluated"
    return "\n".join([
        "---", f"base_model: {base}", "library_name: peft", "pipeline_tag: text-generation",
        f"tags:\n- base_model:adapter:{base}\n- lora\n- edgeft", "---", "",
        f"# {ws_name}: a LoRA adapter of {base}", "",
        f"Fine-tuned with edgeft {version} ({t.backend} backend, "
        f"{prep.config.base_precision or 'fp32'} frozen base) on {trained.finished_at}.", "",
        "## Base model", "",
        f"`{base}` ({prep.architecture}, {prep.num_hidden_layers} decoder layers). It was read from `{model_dir.name}` "
        "on the machine that trained it; the workspace manifest keeps that path and each weight file's sha256.", "",
        "## Data", "",
        _data_line("training", data.get("data"), splits.get("train")),
        _data_line("validation", data.get("eval_data"), splits.get("val")),
        f"- format: {data.get('format')}; loss on {'every token' if t.train_on_prompt else 'the answers only'}; "
        f"sequences up to {t.seq_len} tokens (over-long ones: {t.truncation})", "",
        "## Training", "",
        f"- LoRA r {lora.lora_r}, alpha {lora.lora_alpha:g}, dropout {lora.lora_dropout:g}, targets "
        f"{', '.join(config.get('target_modules') or prep.targets)}"
        + (", DoRA" if lora.dora else "")
        + (f"; trained whole: {', '.join(lora.train_modules)}" if lora.train_modules else ""),
        f"- {trained.step} steps of {t.batch_size} x {t.grad_accum} samples, AdamW lr {t.lr:g} "
        f"({t.schedule}, {t.warmup_steps} warmup), weight decay {t.weight_decay:g}, gradient clip "
        f"{t.max_grad_norm if t.max_grad_norm else 'none'}, seed {t.seed}",
        f"- {trained.tokens_seen:,} tokens trained; best validation loss {best}; this adapter is checkpoint "
        f"{checkpoint} (step {step})", "",
        "## Use it", "",
        "With PEFT:", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")  # or the folder you keep it in',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")', "```", "",
        "In an onnxruntime-genai bundle: `edgeft package WS --adapters` writes "
        f"`bundle/adapters/{ws_name}.onnx_adapter` beside the int4 base; an app loads it with "
        "`og.Adapters(model).load(path, name)` and makes it active per generator with `set_active_adapter`.", ""])


def add_evaluation(adapter: Path, report: dict, finished_at: str) -> None:
    """Put eval's results into the adapter's card (replacing an earlier evaluation's), before "## Use it"."""
    path = Path(adapter) / CARD
    if not path.is_file():
        return
    rows = report["results"]
    metric = rows[0].get("metric", "exact_match").replace("_", " ") if rows else "exact match"
    section = ["## Evaluation", "", f"On `{Path(report['data']).name}` ({report['samples']} samples), "
               f"{finished_at}, by `edgeft eval`: {metric} of the greedy answers, and the loss on the answers' "
               "tokens.", "", f"| variant | runner | {metric} | loss |", "|---|---|---|---|",
               *[f"| {r['variant']} | {r['runner']} | {r['exact_match']:.1%} | {r['loss']:.4f} |" for r in rows], "", ""]
    text = path.read_text()
    start = text.find("## Evaluation")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 if end >= 0 else len(text):]
    at = text.find("## Use it")
    at = at if at >= 0 else len(text)
    atomic.write_text(path, text[:at] + "\n".join(section) + text[at:])
