"""Predictions before anything heavy runs: peak memory and step time of a LoRA run on a device profile.

Everything comes from `config.json` and the safetensors headers (no tensor data is read):
- memory = frozen weights + adapters, their gradients and AdamW moments + saved activations + the
  runtime's own footprint. Activations per token are linear in hidden size, MLP width and vocabulary, plus
  the attention probabilities (heads x sequence length); the coefficients and the runtime footprint were
  fitted to peak RSS measured on this project's dev machine (`benchmarks/plan_accuracy.py`, which also
  checks the fit on configurations it was not fitted to).
- time = model FLOPs per step against the profile's peak compute at a calibrated efficiency, plus a
  per-layer overhead that dominates for tiny models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.devices.profiles import Profile
from edgeft.models import families
from edgeft.models.shapes import TILE_BYTES, linear_shapes, matmul_params, safetensors_params
from edgeft.runtime.torchrun import SHARDS_BASE, SHARDS_STATE, STRATEGIES

# Fitted to measured peak RSS and step time (benchmarks/plan_accuracy.py, results/plan.md) on the `fit`
# configurations; the `check` ones were not used. Saved activations per token:
#   layers * (act_width * (width + ffn) + act_attn * heads * seq) + act_vocab * vocab   bytes,
# width = (hidden + 2 * kv_dim) / 3 (the q/o and k/v projections; = hidden without GQA). Step time:
#   matmul FLOPs / (peak * efficiency) + attention FLOPs / (peak * attn_efficiency) + layers * layer_overhead_s.
# A quantized base under ORT is dequantized just before each use (frozen_base.dequantize_at_use), a tile of
# at most shapes.TILE_BYTES at a time, so what is in flight scales with the largest quantized weight up to a
# tile, not the model: `dequant_live` x that fp32 size, per precision; its fp32 input embedding is memory-mapped
# and only the rows in use are resident. Checked on the real-width slice, 4 layers, int4, batch 1 x 256
# (results/quantized_base.md of 2026-12-04, tiles): predicted 1.78 GB, measured 1.50 GB (1433 MiB); before tiles
# (2026-11-23) 2.15 against 1.92 GB: the activation terms, fitted then, now over-predict this row by about 0.3 GB.
# The torch backend holds a quantized base quantized too (torch_linear.QuantizedLinear) and dequantizes inside
# each matmul; its temporaries (unpacked codes, then values) are `dequant_live` x the largest weight's fp32 size.
# A quantized base costs time too: every use dequantizes its weight (once in the forward pass, once more in
# the backward pass, and again when recomputed), a chain of element-wise ops that runs at memory speed:
# `dequant_bytes` of traffic per value and pass, against the profile's bandwidth. ORT's, fitted as a ratio to fp32
# on the slice (results/quantized_base.md of 2026-12-04, int4 forward on MatMulNBits, tiles, CPU arena: int8 1.23x,
# int4 1.33x the fp32 step, two passes over 0.55 B values at the profile's 21 GB/s; that box is faster than the
# profile's, so the ratio, not the seconds, is what carries over) and checked recomputed: 1.83x predicted, 1.80x
# measured. With the arena off int4 took 1.44x (38.7), and recomputed 3.13x, most of it page faults; before tiles,
# 2026-11-23: 1.60x and 1.99x, 43.6 and 66.0.
# The torch backend's int4 chain (quant/torch_linear.py) runs more ops: 107, fitted on the same slice
# without recomputation (8.66 s per step) and checked with it: predicted 12.5 s; results/quantized_base.md of
# 2026-11-23 measured 8.88 / 12.58 s, and peaks of 2701 / 2486 MiB against 2880 / 2358 MiB predicted. Its int8 figure
# is the ORT one before tiles: not measured.
CALIBRATION = {
    "ort": {"act_width": 71.2, "act_attn": 17.9, "act_vocab": 15.9, "runtime_mb": 260.0,
            "efficiency": 0.519, "attn_efficiency": 0.176, "layer_overhead_s": 0.030,
            "dequant_live": {"int8": 1.0, "int4": 1.0}, "dequant_bytes": {"int8": 20.3, "int4": 29.1}},
    "torch": {"act_width": 62.7, "act_attn": 2.92, "act_vocab": 0.0, "runtime_mb": 301.6,
              "efficiency": 0.811, "attn_efficiency": 0.130, "layer_overhead_s": 0.0127,
              "dequant_live": {"int8": 2.0, "int4": 3.0}, "dequant_bytes": {"int8": 43.6, "int4": 107.0}},
}
# What a rank adds to the engine's runtime (process group; DeepSpeed's engine and its imports), MB: measured by
# benchmarks/distributed.py (2 ranks, real-width Phi-3 slice, CPU).
DISTRIBUTED_RUNTIME_MB = {"ddp": 60.0, "zero2": 150.0, "zero3": 150.0, "fsdp": 60.0}
# Frozen weights a rank of a strategy sharding the base holds whole at its peak, in decoder layers' worth: the
# layer being computed, the collective's buffers (FSDP2 on gloo: the all-gather's output and its copy-out into
# the parameters), and whatever of the next layer is already gathered. Fitted to benchmarks/distributed.py at 4
# layers of the real-width Phi-3 slice (zero3 1.6, fsdp 2.6) and checked at 8 (results/distributed.md).
GATHERED_LAYERS = {"zero3": 1.6, "fsdp": 2.6}
# Effective bandwidth of the ranks' collectives, GB/s received per rank: gloo between 2 ranks on this 2-core box
# over loopback (zero3 and fsdp steps 13.2 and 13.5 s longer than ddp's for 2 x 1.3 GB gathered, fitted at 4
# layers). Between machines the network bounds it; NCCL over NVLink is two to three orders of magnitude faster.
LINK_GBS = 0.19
OPTIMIZER_BYTES = 16  # per trainable parameter: fp32 weight, gradient, AdamW first and second moments
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4 / 128, "int4": 0.5 + 4 / 32}


@dataclass(frozen=True)
class Shape:
    """What the planner needs from config.json."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_seq_len: int

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        
        def need(key):
            if key not in config:
                raise EdgeftError(f"config.json has no {key!r}; the planner needs it")
            return int(config[key])

        heads = need("num_attention_heads")
        return cls(need("hidden_size"), need("num_hidden_layers"), need("intermediate_size"), heads,
                   int(config.get("num_key_value_heads") or heads), need("vocab_size"),
                   bool(config.get("tie_word_embeddings")), families.max_train_seq_len(config))


def trainable_params(model_dir: Path, targets: list[str], lora_r: int, train_modules: list[str] = (),
                     dora: bool = False) -> int:
    """LoRA (r x (in + out) per targeted Linear, + out for DoRA's magnitude) and whole trained modules."""
    shapes = linear_shapes(model_dir)
    leaves = {module.rsplit(".", 1)[-1]: shape for module, shape in shapes.items()}
    if "lm_head" not in leaves and "embed_tokens" in leaves:  # tied: the LM head is the embedding table
        leaves["lm_head"] = leaves["embed_tokens"]
    n = sum(lora_r * (rows + cols) + (rows if dora else 0) for module, (rows, cols) in shapes.items()
            if module.rsplit(".", 1)[-1] in targets and ".layers." in module)
    return n + sum(leaves[m][0] * leaves[m][1] for m in train_modules if m in leaves)


@dataclass(frozen=True)
class PlanOptions:
    """What `edgeft plan` is asked for; what is left out comes from the workspace, or from what `prepare --device`
    would pick for a model folder."""

    seq_len: int = spec("tokens per sequence", 512, min=1)
    batch_size: int = spec("sequences per micro-batch", 1, min=1)
    lora_r: int | None = spec("LoRA rank", None, gt=0)
    targets: list[str] | None = spec("module names to adapt", None)
    train_modules: list[str] | None = spec("whole modules trained too, e.g. lm_head", None)
    backend: str | None = spec("training backend (default: the profile's)", None, choices=("ort", "torch"))
    base_precision: str | None = spec("frozen base precision", None, choices=("fp32", "int8", "int4"))
    recompute: bool | None = spec("activations recomputed in the backward pass", None)
    ranks: int = spec("data-parallel ranks (train --nproc x --nnodes); figures are per rank", 1, min=1, max=4096)
    strategy: str = spec("how the ranks share the model (train --strategy)", "ddp", choices=STRATEGIES)


@dataclass(frozen=True)
class Run:
    """What a plan is for."""

    seq_len: int
    batch_size: int
    lora_r: int = 16
    targets: tuple[str, ...] = ()
    train_modules: tuple[str, ...] = ()
    backend: str = "ort"
    base_precision: str = "fp32"
    recompute: bool = False  # each layer's activations recomputed in the backward pass (ORT: export --recompute)
    ranks: int = 1  # data-parallel ranks: the memory and time are one rank's
    strategy: str = "ddp"


@dataclass(frozen=True)
class Memory:
    frozen: float
    adapters: float
    optimizer: float
    activations: float
    runtime: float
    dequantized: float = 0.0  # a quantized base: fp32 copies of the weights in flight (one consumer at a time)

    @property
    def total(self) -> float:
        return self.frozen + self.adapters + self.optimizer + self.activations + self.runtime + self.dequantized


@dataclass(frozen=True)
class Plan:
    model_dir: Path
    shape: Shape
    run: Run
    base_params: int
    trainable: int
    memory: Memory
    budget_bytes: float | None
    flops_per_step: float
    step_s: float
    tokens_per_s: float
    peak_gflops: float
    compute: str
    dequant_s: float = 0.0  # of step_s: dequantizing a quantized base
    comm_s: float = 0.0  # of step_s: the ranks' collectives (gathering a sharded base, reducing gradients)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.memory.total <= self.budget_bytes


def activation_bytes(shape: Shape, seq_len: int, batch: int, backend: str, recompute: bool = False) -> float:
    """Saved activations. With recomputation (ORT: recompute.py; torch: checkpointing per decoder layer) every
    layer keeps its input (fp32 hidden state) and one layer's activations are alive at a time."""
    c = CALIBRATION[backend]
    kv_dim = shape.kv_heads * shape.hidden // shape.heads
    width = (shape.hidden + 2 * kv_dim) / 3
    layer = c["act_width"] * (width + shape.ffn) + c["act_attn"] * shape.heads * seq_len
    if recompute:
        per_token = layer + shape.layers * 4 * shape.hidden + c["act_vocab"] * shape.vocab
    else:
        per_token = shape.layers * layer + c["act_vocab"] * shape.vocab
    return per_token * seq_len * batch


def memory(shape: Shape, run: Run, base_params: int, trainable: int, largest_linear: int = 0) -> Memory:
    """One rank's peak: under zero3/fsdp the frozen base and the adapter are sharded (plus GATHERED_LAYERS decoder
    layers held whole), under zero2 too the gradients and the AdamW state; each rank runs its share of the batch."""
    c = CALIBRATION[run.backend]
    ranks = run.ranks if run.ranks > 1 else 1
    shard_base = ranks if run.strategy in SHARDS_BASE else 1
    shard_state = ranks if run.strategy in SHARDS_STATE else 1
    embed = shape.vocab * shape.hidden
    # Quantized bases keep the input embedding in fp32 unless tied (it is a lookup, not a MatMul).
    quantized = base_params - (0 if shape.tied else embed)
    frozen = quantized * PRECISION_BYTES[run.base_precision] + (base_params - quantized) * 4
    if run.base_precision != "fp32" and run.backend == "ort" and not shape.tied:
        frozen -= embed * 4  # memory-mapped from base.data: only the rows of the batch's tokens are ever read
    # Both backends dequantize each weight at its use (see CALIBRATION); ORT a tile of it at a time.
    in_flight = 4 * largest_linear if run.backend == "torch" else min(4 * largest_linear, TILE_BYTES)
    dequantized = 0.0 if run.base_precision == "fp32" else c["dequant_live"][run.base_precision] * in_flight
    if shard_base > 1:  # a shard, and what is gathered whole around the decoder layer being computed
        layer = (base_params - shape.vocab * shape.hidden * (1 if shape.tied else 2)) / shape.layers
        frozen = frozen / shard_base + GATHERED_LAYERS[run.strategy] * layer * PRECISION_BYTES[run.base_precision]
    runtime = c["runtime_mb"] + (DISTRIBUTED_RUNTIME_MB[run.strategy] if ranks > 1 else 0.0)
    return Memory(frozen=frozen, adapters=4.0 * trainable / shard_base,
                  optimizer=(OPTIMIZER_BYTES - 4.0) * trainable / shard_state,
                  activations=activation_bytes(shape, run.seq_len, -(-run.batch_size // ranks), run.backend,
                                               run.recompute),
                  runtime=runtime * 1e6, dequantized=dequantized)


def dequant_seconds(shape: Shape, run: Run, matmul: int, bandwidth_gbs: float) -> float:
    """Time per step spent dequantizing a quantized base (see CALIBRATION). `matmul`: the matmul parameters,
    all stored quantized but an LM head tied to the (fp32) embedding."""
    if run.base_precision == "fp32":
        return 0.0
    quantized = matmul - (shape.vocab * shape.hidden if shape.tied else 0)
    passes = 3 if run.recompute else 2
    return quantized * passes * CALIBRATION[run.backend]["dequant_bytes"][run.base_precision] / (bandwidth_gbs * 1e9)


def step_seconds(shape: Shape, run: Run, matmul: int, trainable: int, peak_gflops: float) -> tuple[float, float]:
    """(FLOPs per step, predicted seconds per step of compute)."""
    c = CALIBRATION[run.backend]
    tokens = run.seq_len * -(-run.batch_size // max(run.ranks, 1))  # one rank's share
    matmuls = tokens * training_flops_per_token(matmul, trainable)
    attention = tokens * 4.0 * 3 * shape.layers * shape.hidden * run.seq_len  # QK^T and PV, forward + backward
    if run.recompute:  # the forward pass runs twice: 2M of the 6M per token again
        matmuls, attention = matmuls * 4 / 3, attention * 4 / 3
    seconds = (matmuls / (peak_gflops * 1e9 * c["efficiency"]) + attention / (peak_gflops * 1e9 * c["attn_efficiency"])
               + c["layer_overhead_s"] * shape.layers)
    return matmuls + attention, seconds


def comm_seconds(run: Run, base_params: int, trainable: int, link_gbs: float = LINK_GBS) -> float:
    """Time per step in the ranks' collectives: every strategy reduces the adapter's gradients; zero3 and fsdp also
    gather the rest of the base for each pass over it (forward, backward, and the forward again when recomputed)."""
    if run.ranks <= 1:
        return 0.0
    elsewhere = (run.ranks - 1) / run.ranks  # of each tensor, the part other ranks hold
    moved = 2 * 4.0 * trainable * elsewhere  # a ring all-reduce of fp32 gradients
    if run.strategy in SHARDS_BASE:
        passes = 3 if run.recompute else 2
        moved += passes * base_params * PRECISION_BYTES[run.base_precision] * elsewhere
    return moved / (link_gbs * 1e9)


def make(model_dir: Path, run: Run, profile: Profile | None, trainable: int | None = None) -> Plan:
    model_dir = Path(model_dir)
    config = families.read_config(model_dir)
    family = families.detect(config, model_dir)
    shape = Shape.from_config(config)
    targets = list(run.targets or family.default_targets)
    if trainable is None:
        trainable = trainable_params(model_dir, targets, run.lora_r, list(run.train_modules))
    base = safetensors_params(model_dir)  # a trained whole module is a copy: PEFT keeps the original, frozen
    peak, compute = peak_gflops(profile) if profile else (None, "no profile")
    matmul = matmul_params(model_dir)
    flops, seconds = step_seconds(shape, run, matmul, trainable, peak) if peak else (0.0, 0.0)
    dequant = dequant_seconds(shape, run, matmul, profile.memory.bandwidth_gbs.value) if peak else 0.0
    comm = comm_seconds(run, base, trainable) if peak else 0.0
    seconds += dequant + comm
    tokens = run.seq_len * run.batch_size
    largest = max((r * c for r, c in linear_shapes(model_dir).values()), default=0)
    return Plan(model_dir=model_dir, shape=shape, run=run, base_params=base, trainable=trainable,
                memory=memory(shape, run, base, trainable, largest),
                budget_bytes=profile.memory_budget_bytes if profile else None, flops_per_step=flops,
                step_s=seconds, tokens_per_s=tokens / seconds if seconds else 0.0, peak_gflops=peak or 0.0,
                compute=compute, dequant_s=dequant, comm_s=comm)


CHOICE_SEQ_LEN = 256  # the run a profile's defaults are picked for: batch 1 x this many tokens


def choose(model_dir: Path, run: Run, profile: Profile, base_precision: str | None = None,
           recompute: bool | None = None) -> Plan:
    """The run a profile trains when the base precision or recomputation is not given (None): the first of
    fp32; fp32 with recomputed activations; the precision the profile packages (the base the app ships);
    that with recomputation, that fits the budget. Returns the first plan that fits, or the leanest if none
    does."""
    shipped = profile.quantization.precision
    precisions = [base_precision] if base_precision else ["fp32"] + ([shipped] if shipped in ("int8", "int4") else [])
    recomputes = [recompute] if recompute is not None else [False, True]
    trainable = None
    for precision in precisions:
        for again in recomputes:
            p = make(model_dir, dataclasses.replace(run, base_precision=precision, recompute=again), profile, trainable)
            trainable = p.trainable
            if p.fits:
                return p
    return p


def largest_fit(model_dir: Path, run: Run, profile: Profile, trainable: int) -> tuple[int, int] | None:
    """The largest (seq_len, batch) that fits the budget: longest sequence at batch 1, then the largest batch
    at the requested sequence length (or that longest one, if the requested length does not fit)."""
    fits = lambda s, b: make(model_dir, dataclasses.replace(run, seq_len=s, batch_size=b), profile,  # noqa: E731
                             trainable).fits
    if not fits(16, 1):
        return None
    lo, hi = 16, make(model_dir, run, None, trainable).shape.max_seq_len
    while lo < hi:  # longest power-of-two-free length at batch 1, to 16 tokens
        mid = (lo + hi + 16) // 32 * 16
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid, 1) else (lo, mid - 16)
    seq = min(run.seq_len, lo)
    batch = 1
    while batch < 4096 and fits(seq, batch * 2):
        batch *= 2
    return seq, batch
def training_flops_per_token(matmul: int, trainable_params: int = 0) -> float:
    """Forward 2M, backward to the activations 2M (M: matmul parameters), weight gradients only for
    what trains (2T). Attention's own products are left out (under 2 % at the lengths edge runs use)."""
    return 4.0 * matmul + 2.0 * trainable_params


def peak_gflops(profile: Profile) -> tuple[float, str]:
    eps = profile.execution_providers.training
    gpus = [a for a in profile.accelerators if a.kind == "gpu" and a.fp32_tflops]
    if eps and eps[0] == "cuda" and gpus:
        return gpus[0].fp32_tflops.value * 1000, f"{gpus[0].name} fp32"
    return profile.cpu.peak_fp32_gflops.value, f"{profile.cpu.model} fp32"


def epoch_estimate(model_dir: Path, profile: Profile, lengths) -> dict:
    """Time per epoch over samples of `lengths` tokens on `profile`, as `prepare --device` would set the run up
    (`choose`): batches of the largest size that fits at the longest sample, each step priced as the plan
    prices a full batch of that length (the trainer pads a batch to its longest row)."""
    longest = int(max(lengths))
    p = for_model(Path(model_dir), profile, seq_len=longest, batch_size=1)
    best = largest_fit(p.model_dir, p.run, profile, p.trainable)
    batch = best[1] if best and best[0] >= longest else 1
    p = make(p.model_dir, dataclasses.replace(p.run, batch_size=batch), profile, p.trainable)
    steps = -(-len(lengths) // batch)
    return {"device": profile.name, "seconds_per_epoch": round(steps * p.step_s, 1), "steps": steps,
            "batch_size": batch, "seq_len": longest, "step_s": p.step_s, "base_precision": p.run.base_precision,
            "recompute": p.run.recompute, "backend": p.run.backend, "fits": p.fits, "compute": p.compute}


# -- the `plan` command and the checks prepare and train make ---------------------------------------------

def _check_modules(model_dir: Path, targets: list[str] | None, train_modules: list[str] | None) -> None:
    """Refuse module names the model does not have: a plan for them would count nothing and say it fits."""
    shapes = linear_shapes(model_dir)
    leaves = {module.rsplit(".", 1)[-1] for module in shapes}
    layer_leaves = {module.rsplit(".", 1)[-1] for module in shapes if ".layers." in module}
    if unknown := [t for t in targets or () if t not in layer_leaves]:
        raise EdgeftError(f"--targets {','.join(unknown)}: not a Linear layer of the decoder layers in {model_dir}; "
                          f"they have {', '.join(sorted(layer_leaves))}")
    if unknown := [m for m in train_modules or () if m not in leaves | {"lm_head"}]:
        raise EdgeftError(f"--train-modules {','.join(unknown)}: not a module of {model_dir}; try lm_head or "
                          "embed_tokens")


def for_model(model_dir: Path, profile: Profile | None, seq_len: int = 512, batch_size: int = 1,
              lora_r: int | None = None, targets: list[str] | None = None, backend: str | None = None,
              train_modules: list[str] | None = None, base_precision: str | None = None,
              recompute: bool | None = None, trainable: int | None = None, ranks: int = 1,
              strategy: str = "ddp") -> Plan:
    """A plan for a model folder. What is not given is what `prepare --device` would pick (`choose`); `trainable`,
    when known (a prepared workspace's count), replaces the count worked out from the shapes."""
    model_dir = Path(model_dir)
    _check_modules(model_dir, targets, train_modules)
    if backend is None:
        backend = profile.execution_providers.training_backend if profile else "ort"
    run = Run(seq_len=seq_len, batch_size=batch_size, lora_r=lora_r or 16, targets=tuple(targets or ()),
              train_modules=tuple(train_modules or ()), backend=backend, base_precision=base_precision or "fp32",
              recompute=bool(recompute), ranks=ranks, strategy=strategy)
    if profile is not None and (base_precision is None or recompute is None):
        return choose(model_dir, run, profile, base_precision, recompute)
    return make(model_dir, run, profile, trainable)


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def advice(p: Plan, profile: Profile) -> str:
    """What fits instead, in one sentence."""
    best = largest_fit(p.model_dir, p.run, profile, p.trainable)
    if best is None:
        m = p.memory
        held = f", dequantized weights in flight {_gb(m.dequantized)}" if m.dequantized else ""
        return (f"nothing fits: the fixed costs alone (frozen weights {_gb(m.frozen)}{held}, runtime {_gb(m.runtime)}) "
                f"exceed the {_gb(p.budget_bytes)} budget; use a smaller model"
                + ("" if m.dequantized else " or a quantized base"))
    seq, batch = best
    if not p.run.recompute:
        lean = dataclasses.replace(p.run, recompute=True)
        if make(p.model_dir, lean, profile, p.trainable).fits:
            how = "`edgeft export WS --recompute`" if p.run.backend == "ort" else "`edgeft train WS --recompute`"
            return f"it fits with recomputed activations ({how}, about a third more compute)"
    if seq < p.run.seq_len:
        return f"the longest sequence that fits is {seq} tokens at batch 1 (use --seq-len {seq} --batch-size 1)"
    accum = -(-p.run.batch_size // batch)
    return (f"at {seq} tokens the largest batch that fits is {batch} (use --batch-size {batch} --grad-accum {accum} "
            "for the same effective batch)")


def render(p: Plan, profile: Profile | None) -> str:
    s, m = p.shape, p.memory
    lines = [f"model: {s.layers} layers x hidden {s.hidden}, ffn {s.ffn}, vocab {s.vocab}: {p.base_params / 1e6:,.1f} M "
             f"frozen, {p.trainable / 1e6:,.2f} M trainable (LoRA r{p.run.lora_r}"
             + (f" on {','.join(p.run.targets)}" if p.run.targets else "") + ")",
             f"run: batch {p.run.batch_size} x {p.run.seq_len} tokens, {p.run.backend} backend, "
             f"{p.run.base_precision} base" + (", activations recomputed" if p.run.recompute else "")
             + (f"; {p.run.ranks} ranks, {p.run.strategy} (memory and step time per rank)" if p.run.ranks > 1 else "")]
    budget = f" of a {_gb(p.budget_bytes)} budget" if p.budget_bytes else ""
    lines.append(f"peak memory: {_gb(m.total)}{budget}")
    for label, value in (("frozen weights", m.frozen), ("adapters", m.adapters),
                         ("gradients + AdamW state", m.optimizer), ("activations", m.activations),
                         ("runtime", m.runtime), *((("dequantized weights in flight", m.dequantized),)
                                                   if m.dequantized else ())):
        lines.append(f"  {label:<31} {_gb(value):>10}")
    if profile:
        lines.append(f"step time: {p.step_s:.3g} s ({p.flops_per_step / 1e12:.3g} TFLOP at "
                     f"{CALIBRATION[p.run.backend]['efficiency']:.0%} of {p.peak_gflops:g} GFLOP/s, {p.compute}"
                     + (f"; {p.dequant_s:.3g} s of it dequantizing the {p.run.base_precision} base" if p.dequant_s else "")
                     + (f"; {p.comm_s:.3g} s in the ranks' collectives at {LINK_GBS:g} GB/s" if p.comm_s else "")
                     + f") -> {p.tokens_per_s:,.1f} tokens/s")
        b = profile.budgets
        if b and b.train_tokens_per_s:
            ok = p.tokens_per_s >= b.train_tokens_per_s.value
            lines.append(f"  throughput budget {b.train_tokens_per_s.value:g} tokens/s: {'meets' if ok else 'misses'} "
                         f"(budget basis: {b.basis})")
        lines.append(f"fits {profile.name}: yes" if p.fits else f"fits {profile.name}: NO; {advice(p, profile)}")
        if not p.fits or p.run.ranks > 1:
            lines.append(ranks_line(p, profile))
    return "\n".join(lines)


def ranks_needed(p: Plan, profile: Profile, strategy: str, most: int = 1024) -> int | None:
    """The fewest ranks, each a `profile`, on which the run fits under `strategy` (None: not up to `most`)."""
    for ranks in range(1, most + 1):
        run = dataclasses.replace(p.run, ranks=ranks, strategy=strategy,
                                  batch_size=max(p.run.batch_size, ranks))  # at least a sample per rank
        if memory(p.shape, run, p.base_params, p.trainable).total <= profile.memory_budget_bytes:
            return ranks
        if strategy not in SHARDS_BASE and ranks > 1:
            return None  # more ranks of a whole base do not help
    return None


def ranks_line(p: Plan, profile: Profile) -> str:
    """How many ranks of this profile the run needs under each strategy."""
    found = {s: ranks_needed(p, profile, s) for s in ("zero3", "fsdp", "zero2", "ddp")}
    said = [f"{s} {n}" if n else f"{s} none" + ("" if s in SHARDS_BASE else " (each rank holds the whole base)")
            for s, n in found.items()]
    return f"ranks of {profile.name} it needs: " + ", ".join(said)


def to_dict(p: Plan, profile: Profile | None) -> dict:
    out = {"shape": dataclasses.asdict(p.shape), "run": dataclasses.asdict(p.run), "base_params": p.base_params,
           "trainable_params": p.trainable, "memory_bytes": {**dataclasses.asdict(p.memory), "total": p.memory.total},
           "budget_bytes": p.budget_bytes, "fits": p.fits, "flops_per_step": p.flops_per_step, "step_s": p.step_s,
           "tokens_per_s": p.tokens_per_s, "dequant_s": p.dequant_s, "comm_s": p.comm_s, "peak_gflops": p.peak_gflops,
           "compute": p.compute,
           "device": profile.name if profile else None, "model_dir": str(p.model_dir)}
    if profile and not p.fits:
        best = largest_fit(p.model_dir, p.run, profile, p.trainable)
        out["largest_fit"] = {"seq_len": best[0], "batch_size": best[1]} if best else None
    return out


def require_fit(p: Plan, profile: Profile, what: str) -> None:
    if p.fits is False:
        raise EdgeftError(f"{what} needs about {_gb(p.memory.total)} at batch {p.run.batch_size} x "
                          f"{p.run.seq_len} tokens, over {profile.name}'s {_gb(p.budget_bytes)} budget "
                          f"(frozen weights {_gb(p.memory.frozen)}, activations {_gb(p.memory.activations)}); "
                          f"{advice(p, profile)}; `edgeft plan` shows the breakdown")
