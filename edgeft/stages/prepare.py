"""prepare: load a Hugging Face model folder, add PEFT LoRA/DoRA adapters, start the workspace.

Writes `WS/adapter_init/` (the freshly initialised adapter, PEFT format) so that export and the torch
backend start from the very same weights, and the `prepare` record of `WS/manifest.json`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeft.core import schema
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError, command
from edgeft.core.lock import LOCK
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of
from edgeft.models import families, lazy
from edgeft.quant import quantize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class PrepareConfig:
    model_dir: str = spec("Hugging Face causal-LM folder (config.json, safetensors, tokenizer); in a recipe also "
                          "edgeft:home_base, the demo's", recipe="model.path", cli=False)
    lora_r: int = spec("LoRA rank", 16, gt=0, recipe="lora.r")
    lora_alpha: float = spec("LoRA alpha (scale = alpha / r)", 32.0, gt=0, recipe="lora.alpha")
    lora_dropout: float = spec("dropout on the LoRA input during training", 0.0, min=0.0, max=0.9,
                               recipe="lora.dropout")
    targets: list[str] | None = spec("module names to adapt (default: the family's attention and MLP Linears)", None,
                                     recipe="lora.targets")
    dora: bool = spec("DoRA (weight-decomposed LoRA) instead of plain LoRA", False, recipe="lora.dora")
    train_modules: list[str] = spec("whole modules to train as well (PEFT modules_to_save): lm_head, embed_tokens",
                                    default_factory=list, recipe="lora.train_modules")
    trainable_token_indices: list[int] = spec("embedding rows to train (new tokens)", default_factory=list,
                                              recipe="lora.trainable_tokens", flag="--trainable-tokens")
    base_precision: str | None = spec("frozen base stored as fp32, int8 (per channel) or int4 (the int4 bundle's "
                                      "blocks), dequantized in the graph at each use (default: with a device "
                                      "profile, what its plan picks; fp32 without)", None, choices=quantize.CHOICES,
                                      recipe="model.base_precision")
    int4_block_size: int = spec("int4 base: block size along the input dimension (the device profile's when one "
                                "is given)", 32, choices=quantize.INT4_BLOCK_SIZES, recipe="model.int4_block_size")
    int4_symmetric: bool = spec("int4 base: symmetric blocks (the device profile's when one is given)", True,
                                recipe="model.int4_symmetric")
    trust_remote_code: bool = spec("allow the folder's own Python code (never needed for supported families)", False,
                                   recipe="model.trust_remote_code")
    seed: int = spec("seed for the adapter initialisation", 0, recipe="lora.seed")

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, all(i >= 0 for i in self.trainable_token_indices),
                     "trainable_token_indices: indices must be >= 0")
        schema.check(problems, not (self.trainable_token_indices and {"lm_head", "embed_tokens"} & set(self.train_modules)),
                     "trainable_token_indices: not with --train-modules lm_head/embed_tokens, which already train "
                     "every row; drop one of the two")
        schema.check(problems, not self.targets or all(t.strip() for t in self.targets),
                     "targets: empty module name; pass names like q_proj,v_proj")
        schema.raise_if(problems, "prepare options")

    @property
    def base_quant(self) -> dict:
        """The frozen base's quantization, as export, the engines and the references apply it."""
        return quantize.settings(self.base_precision or "fp32", self.int4_block_size, self.int4_symmetric)


@dataclass(frozen=True)
class Prepared(Record):
    """What prepare recorded: the model and adapter every later stage starts from."""

    STAGE: ClassVar[str] = "prepare"
    config: PrepareConfig = spec("the options, with model_dir resolved and the precision the plan picked")
    inputs: dict[str, str] = spec("sha256 of the model folder's config, weights and tokenizer files")
    family: str = spec("model family (models/families.py)")
    architecture: str = spec("transformers architecture")
    targets: list[str] = spec("the adapted module names")
    num_hidden_layers: int = spec("decoder layers")
    vocab_size: int = spec("embedding rows")
    max_seq_len: int = spec("longest sequence the exported graph is exact for")
    device: str | None = spec("the device profile prepare planned for", None)
    params: dict = spec("trainable, total and base parameter counts", default_factory=dict)
    plan: dict | None = spec("the device plan's choice: base precision, recomputation, peak", None)
    seconds: float = spec("wall time", 0.0)

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir)

    @property
    def recompute(self) -> bool:
        """Whether the device plan chose recomputed activations (False without a device)."""
        return bool((self.plan or {}).get("recompute"))


def lora_config(cfg: PrepareConfig, family: families.Family):
    """PEFT's LoraConfig for these options (the family's default targets when none are given)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.targets or family.default_targets), use_dora=cfg.dora,
        modules_to_save=list(cfg.train_modules) or None,
        trainable_token_indices=list(cfg.trainable_token_indices) or None,
        task_type="CAUSAL_LM", bias="none")


def linear_names(model) -> list[str]:
    """The distinct names of the model's Linear modules (what --targets may name)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_out_dir(out: Path) -> None:
    """Refuse an output that is a file, or a folder of other files (a workspace may be prepared again)."""
    if out.exists() and not out.is_dir():
        raise EdgeftError(f"--out {out} is a file; pass a folder for the workspace")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / "manifest.json").is_file():
        raise EdgeftError(f"--out {out} exists and holds other files; pass a new or empty folder "
                          "(or an existing edgeft workspace)")


def input_files(model_dir: Path) -> list[Path]:
    """The files of a model folder that a workspace is prepared from: config, weights, tokenizer."""
    files = [model_dir / "config.json", *families.weight_files(model_dir)]
    return files + [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]


def check_tokenizer(model_dir: Path, vocab_size: int | None) -> None:
    """The tokenizer loads, and every id it makes has a row in the embedding: a tokenizer from another model
    would otherwise fail only when training reads past the table."""
    from edgeft.data.tokenize import load_tokenizer

    tok = load_tokenizer(model_dir)
    if vocab_size and len(tok) > vocab_size:
        raise EdgeftError(f"the tokenizer of {model_dir} has {len(tok):,} tokens but the model's embedding only "
                          f"{vocab_size:,} rows (config.json vocab_size): the tokenizer files belong to another model. "
                          "Use the tokenizer that came with these weights")


def dora_magnitudes_(peft_model, shards: lazy.Shards) -> None:
    """DoRA's magnitude vectors from the real weights (PEFT computed them from placeholders), one Linear at a
    time, with PEFT's own code."""
    import torch

    for module in peft_model.modules():
        for adapter, magnitude in getattr(module, "lora_magnitude_vector", {}).items():
            base_layer = module.get_base_layer()
            lazy.load_(base_layer, shards)
            with torch.no_grad():
                magnitude.update_layer(base_layer=base_layer, lora_A=module.lora_A[adapter].weight,
                                       lora_B=module.lora_B[adapter].weight, scaling=module.scaling[adapter])
            lazy.unload_(base_layer)


@dataclass(frozen=True)
class _Target:
    """A prepare run resolved against its model folder and device: the options as recorded, and the plan."""

    cfg: PrepareConfig
    config: dict
    family: families.Family
    chosen: object | None  # plan.Plan, when a device was given
    picked: bool  # the plan picked the precision (none was given)


def resolve(cfg: PrepareConfig, device=None) -> _Target:
    """The options as prepare records them: model_dir resolved, the base precision the device plan picks (when
    none is given) and the profile's int4 blocks; refused when the model cannot fit the device."""
    model_dir = Path(cfg.model_dir).resolve()
    config = families.read_config(model_dir)
    family = families.detect(config, model_dir)
    chosen, picked = None, cfg.base_precision is None
    if device is not None:
        from edgeft.devices import plan

        run = plan.Run(seq_len=min(plan.CHOICE_SEQ_LEN, families.max_train_seq_len(config)), batch_size=1,
                       lora_r=cfg.lora_r, targets=tuple(cfg.targets or family.default_targets),
                       train_modules=tuple(cfg.train_modules), backend=device.execution_providers.training_backend)
        chosen = plan.choose(model_dir, run, device, cfg.base_precision)
        if plan.largest_fit(model_dir, chosen.run, device, chosen.trainable) is None:
            plan.require_fit(chosen, device, "this model")
        cfg = dataclasses.replace(cfg, base_precision=chosen.run.base_precision)
    cfg = dataclasses.replace(cfg, model_dir=str(model_dir), base_precision=cfg.base_precision or "fp32")
    quantize.check(cfg.base_precision)
    if device is not None and cfg.base_precision == "int4":  # train against the blocks this profile's bundle ships
        cfg = dataclasses.replace(cfg, int4_block_size=device.quantization.block_size,
                                  int4_symmetric=device.quantization.symmetric)
    return _Target(cfg, config, family, chosen, picked)


def key(ws: Workspace, target: _Target) -> str:
    """The prepare stage's key: its options and the content of the model folder's files."""
    model_dir = Path(target.cfg.model_dir)
    return key_of("prepare", dataclasses.asdict(target.cfg), ws.hashes.files(input_files(model_dir), model_dir))


def unchanged(ws: Workspace, cfg: PrepareConfig, device=None) -> Prepared | None:
    """The prepare record if preparing again would write the same workspace."""
    return ws.unchanged(Prepared, key(ws, resolve(cfg, device)))


def prepare(cfg: PrepareConfig, out: Path, device=None) -> Path:
    """Validate the model folder and options, initialise the adapter, record the workspace `out`. Nothing to do
    when its options and the model's files are unchanged."""
    out = Path(out)
    check_out_dir(out)
    with Workspace(out).lock("prepare") as ws:
        target = resolve(cfg, device)
        if previous := ws.unchanged(Prepared, key(ws, target)):
            print(f"prepare: inputs and options unchanged since {previous.finished_at}; nothing to do")
            return out
        _check_inputs(target)
        if target.chosen is not None:
            _say_plan(target, device, out)
        started = time.time()
        peft_model, targets = _init_adapter(target)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        with atomic_dir(ws.adapter_init) as tmp:
            peft_model.save_pretrained(tmp)
        record = _record(ws, target, targets, device, {"trainable": trainable, "total": total,
                                                          "base": total - trainable}, time.time() - started)
        if previous := ws.read(Prepared):
            changed = sorted(k for k in previous.inputs.keys() | record.inputs.keys()
                             if previous.inputs.get(k) != record.inputs.get(k))
            what = f"inputs changed: {', '.join(changed)}" if changed else "options changed"
            print(f"prepare: {what}; later stages will run again")
        ws.write(record)
    return out


def _check_inputs(target: _Target) -> None:
    """The tokenizer fits the embedding, and the trainable token rows exist."""
    model_dir, vocab = Path(target.cfg.model_dir), target.config.get("vocab_size")
    check_tokenizer(model_dir, vocab)
    if bad := [i for i in target.cfg.trainable_token_indices if vocab and i >= vocab]:
        raise EdgeftError(f"trainable_token_indices {bad} are outside the vocabulary (size {vocab})")


def _say_plan(target: _Target, device, out: Path) -> None:
    p = target.chosen
    how = "picked to fit" if target.picked else "given"
    print(f"plan for {device.name}: {p.run.base_precision} base ({how})"
          f"{', activations recomputed' if p.run.recompute else ''}, peak {p.memory.total / 1e9:.2f} GB at batch 1 x "
          f"{p.run.seq_len} tokens (budget {device.memory_budget_bytes / 1e9:.2f} GB), ~{p.tokens_per_s:,.1f} "
          f"tokens/s; `{command('edgeft', 'plan', out, '--device', device.name)}` for other settings")


def _init_adapter(target: _Target):
    """The PEFT model with its adapter initialised, on placeholder weights (LoRA's init needs shapes and the seed
    only): the modules PEFT copies (whole trained modules, token rows) and DoRA's magnitudes get real ones. Bad
    targets, modules and ranks are refused before anything is allocated. Returns it and the targets."""
    import torch
    from peft import get_peft_model

    cfg, family = target.cfg, target.family
    model_dir = Path(cfg.model_dir)
    base, shards = lazy.empty_model(model_dir, cfg.trust_remote_code)
    targets = list(cfg.targets or family.default_targets)
    _check_modules(base, cfg, targets, model_dir)
    copied = [m for name, m in base.named_modules()  # copied by PEFT (modules_to_save, token rows): real weights
              if name.rsplit(".", 1)[-1] in cfg.train_modules
              or (cfg.trainable_token_indices and m is base.get_input_embeddings())]
    lazy.load_(base, shards, only={id(p) for m in copied for p in m.parameters()})  # once, so tied ones stay tied
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(base, lora_config(cfg, family))
    if cfg.dora:
        dora_magnitudes_(peft_model, shards)
    return peft_model, targets


def _check_modules(base, cfg: PrepareConfig, targets: list[str], model_dir: Path) -> None:
    import torch

    linears = linear_names(base)
    if missing := [t for t in targets if t not in linears]:
        raise EdgeftError(f"target modules {missing} not found in {model_dir.name}; Linear layers there: "
                          f"{', '.join(linears)}")
    smallest = min(min(m.in_features, m.out_features) for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    if cfg.lora_r > smallest:
        raise EdgeftError(f"--lora-r {cfg.lora_r} is above {smallest}, the smallest dimension of the targeted layers: "
                          f"a rank past it adds parameters and memory but no capacity; use --lora-r {smallest} or less "
                          "(8 to 64 is usual)")
    modules = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if missing := [m for m in cfg.train_modules if m not in modules]:
        raise EdgeftError(f"--train-modules {missing} not found; try lm_head or embed_tokens")


def _record(ws: Workspace, target: _Target, targets: list[str], device, params: dict, seconds: float) -> Prepared:
    cfg, config, chosen = target.cfg, target.config, target.chosen
    model_dir = Path(cfg.model_dir)
    return Prepared(
        config=cfg, inputs=ws.hashes.files(input_files(model_dir), model_dir), family=target.family.name,
        architecture=target.family.architecture, targets=targets, num_hidden_layers=config.get("num_hidden_layers"),
        vocab_size=config.get("vocab_size"), max_seq_len=families.max_train_seq_len(config),
        device=getattr(device, "name", None), params=params, seconds=round(seconds, 2), key=key(ws, target),
        plan=None if chosen is None else {
            "base_precision": chosen.run.base_precision, "precision_picked": target.picked,
            "recompute": chosen.run.recompute, "seq_len": chosen.run.seq_len, "peak_bytes": round(chosen.memory.total),
            "fits": chosen.fits})
