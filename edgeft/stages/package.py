"""package: build an ONNX Runtime GenAI model of the merged model into `WS/bundle/`, verified and described.

The GenAI builder runs through its public command line (`python -m onnxruntime_genai.models.builder`);
int4 settings (block size, accuracy level, symmetry) come from the device profile. The bundle's
`manifest.json` holds the sha256 of every file, the source model and adapter hashes, the profile,
precision, library versions and the verification figures: greedy tokens on a few prompts against
transformers on the merged model (fp32 must match token for token; int4 reports agreement and the
largest logit error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core import compare, fingerprint, progress, rss, schema, state
from edgeft.core.atomic import atomic_dir, scratch_dir
from edgeft.core.errors import FREE_SPACE, EdgeftError, command, disk_full
from edgeft.core.schema import spec
from edgeft.core.workspace import Workspace, library_versions
from edgeft.devices.profiles import Quantization
from edgeft.quant import prequantize, quantize
from edgeft.runtime import launcher

BUILDER_EPS = ("cpu", "cuda", "dml", "webgpu")
BUILDER_PRECISIONS = ("int4", "int8", "fp16", "fp32")


@dataclass(frozen=True)
class PackageConfig:
    precision: str | None = spec("int4, int8, fp16 or fp32 (default: the device profile's, else int4)", None,
                                 choices=BUILDER_PRECISIONS)
    ep: str = spec("execution provider the model is built for", "cpu", choices=BUILDER_EPS)
    max_new_tokens: int = spec("tokens generated per verification prompt", 16, min=1)
    prompts: int = spec("verification prompts", 3, min=1)
    force: bool = spec("replace an existing bundle", False)
    adapters: bool = spec("build the base model once plus a swappable .onnx_adapter per trained adapter", False)
    add_adapters: list[str] = spec("other workspaces (same base, same targets) whose adapters to ship too",
                                   default_factory=list)
    weights: str = spec("how the transformers reference reads the fp32 weights: 'load' holds the model; 'stream' "
                        "one decoder layer at a time; 'auto' streams past 4 GiB", "auto",
                        choices=("auto", "load", "stream"))

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, not (self.precision == "fp16" and self.ep == "cpu"),
                     "precision: fp16 is for GPU execution providers; use int4 or fp32 on cpu")
        schema.raise_if(problems, "package options")


class BuilderError(EdgeftError):
    pass


def run_builder(src: Path, out: Path, cache: Path, precision: str, ep: str, quant: Quantization,
                extra: dict[str, str] | None = None) -> float:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", ep, "-c", str(cache)]
    options = dict(extra or {})
    if precision in ("int4", "int8"):
        options.update(block_size=quant.block_size, accuracy_level=quant.accuracy_level,
                       is_symmetric=str(quant.symmetric).lower())
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        hint = ("the builder needs a tokenizer in the merged folder and a supported architecture; check "
                f"{src}/config.json, or try another --precision")
        if disk_full(proc.stderr + proc.stdout):
            raise BuilderError(f"no space left on the device of {out.parent} while the GenAI builder wrote the model. "
                               f"{FREE_SPACE}: the builder wrote into a temporary that was removed")
        raise BuilderError(f"the ONNX Runtime GenAI builder failed (exit {proc.returncode}):\n{tail}\nhint: {hint}")
    return time.time() - started


def build(merged: Path, out: Path, cache: Path, precision: str, ep: str, quant: Quantization) -> dict:
    """Build the merged model into `out`. int4 and int8 for the CPU are built from a copy quantized one weight at
    a time (prequantize.py), so that no process holds the fp32 model; the builder quantizes the fp32 folder
    itself where that copy cannot be made (the reason is printed and recorded). GPU builds quantize fp16
    weights, so the builder quantizes those itself too."""
    why: dict[str, str] = {}
    if precision in ("int4", "int8"):
        reason = (prequantize.unsupported(merged, quant.block_size) if ep == "cpu" else
                  f"a {ep} build quantizes the weights in fp16, as only the builder does")
        if reason is None:
            with scratch_dir(out.parent, "prequantized") as work:
                started = time.time()
                info = prequantize.write(merged, work, 4 if precision == "int4" else 8, quant.block_size,
                                         quant.symmetric)
                info["seconds"] = round(time.time() - started, 1)
                seconds = run_builder(work, out, cache, precision, ep, quant)
            return {"builder_input": "prequantized", "prequantize": info, "builder_seconds": round(seconds, 1)}
        print(f"package: the builder quantizes the fp32 model itself: {reason}")
        why = {"why": reason}
    seconds = run_builder(merged, out, cache, precision, ep, quant)
    return {"builder_input": "fp32", **why, "builder_seconds": round(seconds, 1)}


def set_cpu_threads(bundle: Path, threads: int) -> int:
    """Run the bundle on every core of the target. The builder leaves `intra_op_num_threads` unset, and
    onnxruntime-genai then ran one thread here: on the 2-core dev box, int4 decode of the Phi-3-mini slice went
    from 22.7 to 42.5 tokens/s and time to first token from 1600 to 870 ms with both cores."""
    path = bundle / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(config, indent=4) + "\n")
    return int(threads)


def _prompts(merged: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from edgeft.tasks.home import DATA_DIR

    tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    rows = [json.loads(x) for x in (DATA_DIR / "test.jsonl").read_text().splitlines()[:n]]
    out = []
    for row in rows:
        msgs = row["messages"][:-1]
        if tok.chat_template:
            out.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        else:
            out.append(tok(msgs[-1]["content"])["input_ids"])
    return [list(map(int, ids)) for ids in out]


def reference(model_dir: Path, prompts: list[list[int]], max_new: int, trust_remote_code: bool = False,
              weights: str = "auto", steps: progress.Steps | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' greedy tokens and last-prompt-position logits in fp32 for each prompt. Past 4 GiB of fp32
    weights (or `weights="stream"`) the model computes one decoder layer at a time from its files
    (lazy.streamed), so a Phi-3-mini is checked without holding its 15 GB of fp32 weights."""
    import torch

    from edgeft.models import lazy

    model, shards = lazy.base_model(model_dir, trust_remote_code, weights)
    tokens, logits = [], []
    passes = len(prompts) * (1 + max_new) * len(lazy.decoder_layers(model))  # at most: generation may stop early
    step = steps.step(f"transformers' greedy tokens on {model_dir.name} (fp32"
                      f"{', one decoder layer at a time' if shards else ''})", passes if shards else None) \
        if steps else contextlib.nullcontext()
    with step as tick, torch.no_grad(), lazy.streamed(model, shards, on_layer=tick) if shards else contextlib.nullcontext():
        for ids in prompts:
            x = torch.tensor([ids])
            logits.append(model(x).logits[0, -1].numpy())
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                 pad_token_id=model.config.pad_token_id)
            tokens.append(out[0, len(ids):].tolist())
    return tokens, logits


def provider_here(ep: str) -> bool:
    """Whether onnxruntime-genai on this machine runs the execution provider a bundle was built for."""
    import onnxruntime_genai as og

    return ep == "cpu" or bool(getattr(og, f"is_{ep}_available", lambda: False)())


def own_adapter(bundle: Path) -> Path | None:
    """The `.onnx_adapter` of the workspace a base+adapters bundle was packaged from (the manifest lists it first);
    None for a merged bundle. eval and bench run the bundle as the app runs that fine-tune: with it active."""
    manifest = Path(bundle) / "manifest.json"
    adapters = state.read_json(manifest, "the bundle's manifest", REBUILD).get("adapters") if manifest.is_file() else None
    if not adapters:
        return None
    try:
        return Path(bundle) / str(next(iter(adapters.values()))["file"])
    except (AttributeError, TypeError, KeyError):
        raise EdgeftError(f"the bundle's manifest {manifest} is damaged (its adapters are not described); "
                          f"{REBUILD}") from None


REBUILD = "rebuild the bundle with `edgeft package WS --force`"


def open_model(bundle: Path):
    """An og.Model of a bundle; a bundle that onnxruntime-genai cannot load (a damaged genai_config.json, cut-short
    weights) is a user error that names it."""
    import onnxruntime_genai as og

    bundle = Path(bundle)
    config = bundle / "genai_config.json"
    state.read_json(config, "the bundle's genai_config.json", REBUILD, keys=("model",))
    try:
        return og.Model(str(bundle))
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError (or OrtException) with its reason
        raise EdgeftError(f"onnxruntime-genai cannot load the bundle {bundle}: {str(e)[:300]}; the bundle is damaged "
                          f"or incomplete: {REBUILD}") from None


def context_length(bundle: Path) -> int | None:
    """The longest sequence (prompt and reply) the bundle's model takes, from its genai_config.json."""
    config = state.read_json(Path(bundle) / "genai_config.json", "the bundle's genai_config.json", REBUILD,
                             keys=("model",))
    length = config["model"].get("context_length") if isinstance(config["model"], dict) else None
    return int(length) if isinstance(length, int) and length > 0 else None


def load_adapter(model, path: Path) -> tuple:
    """An `.onnx_adapter` loaded into an og.Model, as (og.Adapters, name) for `generator`."""
    import onnxruntime_genai as og

    adapters = og.Adapters(model)
    try:
        adapters.load(str(path), path.stem)
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError with its reason
        raise EdgeftError(f"onnxruntime-genai cannot load the adapter {path}: {str(e)[:300]}; it is damaged or was "
                          f"built for another base model: {REBUILD}") from None
    return adapters, path.stem


def generator(model, params, adapter: tuple | None = None):
    """An og.Generator, with `adapter` (from `load_adapter`) active if given."""
    import onnxruntime_genai as og

    gen = og.Generator(model, params)
    if adapter is not None:
        gen.set_active_adapter(*adapter)
    return gen


def genai_generate(model_dir: Path, prompts: list[list[int]], max_new: int,
                   adapter: Path | None = None, cpu: bool = False) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy tokens and first-step logits from onnxruntime-genai, with an `.onnx_adapter` active if given;
    `cpu`: on the CPU provider whatever the bundle was built for (the same graph and weights)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if cpu:
        config.clear_providers()
    model = og.Model(config)
    active = load_adapter(model, adapter) if adapter is not None else None
    tokens, logits = [], []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        gen = generator(model, params, active)
        gen.append_tokens(ids)
        logits.append(np.asarray(gen.get_logits()).reshape(-1))
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        tokens.append(out)
    return tokens, logits


def max_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest absolute logit difference over the prompts; infinite if either side is not finite."""
    return max(compare.max_abs_diff(a, b) for a, b in zip(reference, got, strict=True))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    return same / max(total, 1)


USAGE = """# {name}

An ONNX Runtime GenAI model ({precision}, {ep}) packaged by edgeft {version}. Load it in an app:

```python
import onnxruntime_genai as og

model = og.Model("{name}")
tokenizer = og.Tokenizer(model)
stream = tokenizer.create_stream()
prompt = tokenizer.apply_chat_template('[{{"role": "user", "content": "turn on the porch light"}}]',
                                       add_generation_prompt=True)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
```

Or from a shell: `edgeft chat {name}`. `manifest.json` lists every file with its sha256, the source model
and adapter, the build settings and the verification figures.
"""


def _check_merged(ws: Workspace) -> dict:
    merged_rec = ws.require("merge", f"merge it first: `edgeft merge {ws.root}`")
    merged = ws.root / "merged"
    recorded = merged_rec["outputs"]["merged"]
    actual = ws.hashes.folder(merged, ws.root) if merged.is_dir() else {}
    if actual != recorded:
        changed = sorted(set(recorded) ^ set(actual) | {k for k in recorded if actual.get(k) != recorded[k]})
        raise EdgeftError(f"{merged} no longer matches what merge wrote ({', '.join(changed[:3])}); run "
                          f"`{command('edgeft', 'merge', ws.root)}` again")
    return merged_rec


def _adapter_sources(ws: Workspace, cfg: PackageConfig) -> list[Workspace]:
    """This workspace and the --add-adapters ones, checked to fit one base graph."""
    prep = ws.stage("prepare")
    sources = [ws, *(Workspace(Path(p)) for p in cfg.add_adapters)]
    for other in sources:
        if not (other.root / "manifest.json").is_file():
            raise EdgeftError(f"--add-adapters {other.root}: not an edgeft workspace")
        _check_merged(other)
        c = other.stage("prepare")["config"]
        if c["dora"] or c["train_modules"] or c["trainable_token_indices"]:
            what = "DoRA" if c["dora"] else "whole trained modules" if c["train_modules"] else "trainable token rows"
            raise EdgeftError(f"{other.root} trains {what}; an .onnx_adapter holds plain LoRA weights only. Package "
                              "it merged (without --adapters), or prepare it without that option")
        if other is not ws:
            if other.stage("prepare")["inputs"] != prep["inputs"]:
                raise EdgeftError(f"--add-adapters {other.root} was prepared from another base model than {ws.root}")
            if other.stage("prepare")["targets"] != prep["targets"]:
                raise EdgeftError(f"--add-adapters {other.root} adapts {other.stage('prepare')['targets']}, "
                                  f"{ws.root} adapts {prep['targets']}; one base graph needs the same targets")
    names = [s.root.name for s in sources]
    if len(set(names)) != len(names):
        raise EdgeftError(f"adapters are named after their workspace folders, and these repeat: {names}")
    return sources


def _build_adapters(ws: Workspace, sources: list[Workspace], tmp: Path, cache: Path, precision: str, ep: str,
                    quant: Quantization) -> tuple[float, dict[str, Path]]:
    """The base once (LoRA branches as inputs), then one .onnx_adapter per source workspace."""
    from edgeft.graph import adapters

    prep = ws.stage("prepare")
    base_dir = Path(prep["config"]["model_dir"])
    exclude = ",".join(adapters.lora_node_names(prep["num_hidden_layers"]))
    files, build_s = {}, 0.0
    (tmp / "adapters").mkdir()
    for i, source in enumerate(sources):
        out = tmp if i == 0 else tmp / f".build-{i}"
        build_s += run_builder(base_dir, out, cache, precision, ep, quant,
                               {"adapter_path": source.root / "adapter", "nodes_to_exclude": exclude})
        values = adapters.extract(out / "model.onnx")
        files[source.root.name] = adapters.write(values, tmp / "adapters" / f"{source.root.name}.onnx_adapter")
        if i:
            shutil.rmtree(out)
    return build_s, files


SHIPPED_TOLERANCE = 1e-3


@dataclass
class NBitsBlocks:
    """One MatMulNBits of a bundle as stored: codes [N, blocks, block * bits / 8] (int4: two per byte),
    scales [N, blocks] and zero points [N, blocks], one per byte (implied: 8 for int4, 128 for int8)."""
    name: str
    bits: int
    block_size: int
    K: int
    N: int
    accuracy_level: int
    packed: np.ndarray
    scales: np.ndarray
    zero: np.ndarray

    def dequantized(self) -> np.ndarray:
        """The [N, K] fp32 weight the blocks stand for."""
        codes = quantize.unpack_nibbles(self.packed) if self.bits == 4 else self.packed
        codes = codes.reshape(self.N, self.scales.shape[1], -1).astype(np.int32)
        values = (codes - self.zero[..., None].astype(np.int32)) * self.scales[..., None]
        return values.reshape(self.N, -1)[:, :self.K]


def matmul_nbits(bundle: Path) -> list[NBitsBlocks]:
    """Every MatMulNBits of `bundle`/model.onnx, in graph order, read from its initializers."""
    import onnx

    from edgeft.graph import frozen_base

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in node.attribute}
        n, bits = a["N"], a["bits"]
        packed = frozen_base.initializer_array(inits[node.input[1]], bundle)
        scales = frozen_base.initializer_array(inits[node.input[2]], bundle).reshape(n, -1).astype(np.float32)
        blocks = scales.shape[1]
        if len(node.input) > 3 and node.input[3]:
            zero = frozen_base.initializer_array(inits[node.input[3]], bundle).reshape(n, -1)
            zero = (quantize.unpack_nibbles(zero) if bits == 4 else zero)[:, :blocks]
        else:
            zero = np.full((n, blocks), 1 << (bits - 1), np.uint8)
        out.append(NBitsBlocks(node.name, bits, a["block_size"], a["K"], n, a.get("accuracy_level", 0),
                               packed.reshape(n, blocks, -1), scales, zero))
    return out


def shipped_base_check(ws: Workspace, bundle: Path, prompts: list[list[int]], adapter: Path | None,
                       merged_rec: dict, accuracy_level: int, cpu: bool = False) -> dict:
    """Train what you ship: the int4 blocks the workspace trained against must be the bundle's, byte for
    byte, and the bundle with the trained adapter active must reproduce the training runtime's eval logits
    (within SHIPPED_TOLERANCE where MatMulNBits computes in fp32, accuracy level 0/1; at level 4 it rounds
    activations to int8, and the error is reported)."""
    import hashlib

    from edgeft.graph import frozen_base

    def rows(packed, scales, zero) -> set[bytes]:
        """One digest per output row (codes, scales and zero points of its blocks). The builder may split or
        fuse projections along the output dimension (Phi-3's gate_up into gate and up): rows survive that."""
        n = packed.shape[0]
        flat = [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in (packed, scales, zero)]
        return {hashlib.blake2b(b"".join(a[i].tobytes() for a in flat), digest_size=16).digest() for i in range(n)}

    trained = {name: rows(*blocks) for name, blocks in frozen_base.stored_int4(ws.root / "artifacts").items()}
    shipped = {b.name: rows(b.packed, b.scales, b.zero) for b in matmul_nbits(bundle) if b.bits == 4}
    shipped_rows = set().union(*shipped.values()) if shipped else set()
    missing = sorted(name for name, digests in trained.items() if not digests <= shipped_rows)
    result = {"trained_int4_weights": len(trained), "bundle_int4_matmuls": len(shipped),
              "trained_rows": sum(len(d) for d in trained.values()), "bundle_rows": len(shipped_rows),
              "identical_weights": len(trained) - len(missing), "not_in_bundle": missing}
    if missing:
        raise EdgeftError(f"package verification failed: {len(missing)} of the {len(trained)} int4 weights this "
                          f"workspace trained against are not in the bundle byte for byte (first: {missing[0]}); "
                          "nothing was written. The profile's int4 settings or the builder changed since export: "
                          "export and train again, or package without --adapters")
    checkpoint = ws.root / "train" / "checkpoints" / merged_rec["checkpoint"] / "ort_checkpoint"
    if adapter is not None and checkpoint.exists():
        with scratch_dir(ws.root, "package-work") as work:
            out = work / "logits.npy"
            launcher.run("edgeft.trainer.artifacts:prompt_logits", {
                "artifacts": str(ws.root / "artifacts"), "prompts": prompts, "out": str(out),
                "checkpoint": str(checkpoint)},
                log_path=ws.root / "logs" / "package-runtime.log")
            ort_logits = np.load(out)
        _, got = genai_generate(bundle, prompts, 1, adapter, cpu)
        error = max_error(ort_logits, got)
        result["adapter_vs_training_runtime_max_logit_error"] = error
        if not compare.within(error, SHIPPED_TOLERANCE if accuracy_level in (0, 1) else math.inf):
            raise EdgeftError(f"package verification failed: the int4 base with the trained adapter differs from the "
                              f"training runtime's eval logits by {compare.describe(error)} (tolerance "
                              f"{SHIPPED_TOLERANCE:g} with fp32 compute); nothing was written")
    return result


def package(ws_path: Path, cfg: PackageConfig = PackageConfig(), device=None) -> Path:
    """Build, verify and describe `WS/bundle/` (holding the workspace's lock); returns the bundle."""
    ws = Workspace(ws_path)
    if not ws.root.is_dir():
        raise EdgeftError(f"workspace {ws.root} does not exist")
    with ws.lock("package"):
        return _package(ws, cfg, device)


def _package(ws: Workspace, cfg: PackageConfig, device) -> Path:
    from edgeft import __version__
    from edgeft.models import lazy

    merged_rec = _check_merged(ws)
    merged = ws.root / "merged"
    sources = _adapter_sources(ws, cfg) if cfg.adapters else []
    if cfg.add_adapters and not cfg.adapters:
        raise EdgeftError("--add-adapters needs --adapters")
    quant = device.quantization if device else Quantization()
    precision = cfg.precision or quant.precision
    trained = quantize.settings(ws.stage("prepare")["config"])
    ships_trained_base = cfg.adapters and precision == "int4" and trained["precision"] == "int4"
    if ships_trained_base and (quant.block_size, quant.symmetric) != (trained["block_size"], trained["symmetric"]):
        print(f"package: building the int4 base with the blocks it was trained against (block {trained['block_size']}, "
              f"symmetric {trained['symmetric']}), not the profile's (block {quant.block_size}, "
              f"symmetric {quant.symmetric})")
        quant = dataclasses.replace(quant, block_size=trained["block_size"], symmetric=trained["symmetric"])
    if device and cfg.ep not in device.execution_providers.inference:
        raise EdgeftError(f"--ep {cfg.ep} is not an inference provider of {device.name} "
                          f"({', '.join(device.execution_providers.inference)})")
    out = ws.root / "bundle"
    if out.exists() and not cfg.force:
        raise EdgeftError(f"{out} exists; pass --force to replace it")
    started = time.time()
    rss.reset_peak()
    with atomic_dir(out) as tmp:
        cache = ws.root / ".builder-cache"
        prompts = _prompts(merged, cfg.prompts)
        adapter_files: dict[str, Path] = {}
        steps = progress.Steps("package", 3 + (2 if cfg.adapters else 0) + (1 if ships_trained_base else 0))
        if cfg.adapters:
            with steps.step(f"{precision} base with LoRA inputs, and {len(sources)} .onnx_adapter (GenAI builder)"):
                build_s, adapter_files = _build_adapters(ws, sources, tmp, cache, precision, cfg.ep, quant)
            built = {"builder_input": "fp32 base with the LoRA branches", "builder_seconds": round(build_s, 1)}
        else:
            with steps.step(f"{precision} model for {cfg.ep} (GenAI builder)"):
                built = build(merged, tmp, cache, precision, cfg.ep, quant)
            build_s = built["builder_seconds"] + built.get("prequantize", {}).get("seconds", 0.0)
        threads = set_cpu_threads(tmp, device.cpu.cores if device else os.cpu_count() or 1) if cfg.ep == "cpu" else None
        trust = ws.stage("prepare")["config"]["trust_remote_code"]
        ref_tokens, ref_logits = reference(merged, prompts, cfg.max_new_tokens, trust, cfg.weights, steps)
        active = adapter_files.get(ws.root.name)
        on_cpu = not provider_here(cfg.ep)  # a bundle for a GPU provider this machine lacks: its graph, on the CPU
        try:
            with steps.step("the bundle's greedy tokens (onnxruntime-genai" + (", adapter active)" if active else ")")):
                got_tokens, got_logits = genai_generate(tmp, prompts, cfg.max_new_tokens, active, on_cpu)
        except RuntimeError as e:  # onnxruntime-genai refuses the model it was given
            hint = (f"package verifies the bundle by running it: build for --ep {cfg.ep} on a machine where "
                    f"onnxruntime-genai has that provider" if cfg.ep != "cpu" else
                    "onnxruntime-genai 0.18 builds an invalid embedding for asymmetric int4 with tied embeddings; "
                    "package with a symmetric profile or another --precision")
            raise BuilderError(f"the built model does not load in onnxruntime-genai here: {str(e)[:300]}\n"
                               f"hint: {hint}") from None
        verification = {
            "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
            "token_agreement": agreement(ref_tokens, got_tokens),
            "max_logit_error": max_error(ref_logits, got_logits),
            "reference": f"transformers greedy generate on WS/merged (fp32, "
                         f"{'streamed' if lazy.streams(merged, cfg.weights) else 'loaded'})"
                         + (f"; bundle with adapter {ws.root.name!r} active" if active else ""),
            "ran_on": f"cpu (no {cfg.ep} provider on this machine)" if on_cpu else cfg.ep,
        }
        if active:
            base_tokens, base_logits = reference(Path(ws.stage("prepare")["config"]["model_dir"]), prompts,
                                                 cfg.max_new_tokens, trust, cfg.weights, steps)
            with steps.step("the bundle's greedy tokens with no adapter active (the base model)"):
                plain_tokens, plain_logits = genai_generate(tmp, prompts, cfg.max_new_tokens, cpu=on_cpu)
            verification["no_adapter_vs_base"] = {
                "token_agreement": agreement(base_tokens, plain_tokens),
                "max_logit_error": max_error(base_logits, plain_logits)}
        if ships_trained_base:
            with steps.step("the trained int4 base against the bundle's, byte for byte"):
                verification["shipped_base"] = shipped_base_check(ws, tmp, prompts, active, merged_rec,
                                                                  quant.accuracy_level, on_cpu)
        if not compare.finite(ref_logits) or not compare.finite(got_logits):
            side = "transformers' on the merged model" if not compare.finite(ref_logits) else "the bundle's"
            raise EdgeftError(f"package verification failed: {side} logits are not finite (NaN or infinity): the "
                              f"merged model holds non-finite weights; nothing was written. Merge a checkpoint "
                              f"from before the run diverged (`edgeft merge {ws.root} --checkpoint STEP`)")
        if precision == "fp32" and verification["token_agreement"] < 1.0:
            raise EdgeftError(f"package verification failed: the fp32 model's greedy tokens differ from transformers' "
                              f"(agreement {verification['token_agreement']:.1%}); nothing was written")
        files = {p.relative_to(tmp).as_posix(): p for p in tmp.rglob("*") if p.is_file()}
        (tmp / "README.md").write_text(USAGE.format(name=out.name, precision=precision, ep=cfg.ep, version=__version__)
                                       + (ADAPTER_USAGE.format(names=", ".join(adapter_files)) if adapter_files else ""))
        manifest = {
            "edgeft": __version__, "kind": "base+adapters" if cfg.adapters else "merged",
            "precision": precision, "execution_provider": cfg.ep, "cpu_threads": threads,
            "quantization": dataclasses.asdict(quant) if precision in ("int4", "int8") else None, "build": built,
            "device": device.name if device else None,
            "source": {"model_dir": ws.stage("prepare")["config"]["model_dir"], "model_sha256": ws.stage("prepare")["inputs"],
                       "adapter_sha256": merged_rec["outputs"]["adapter"], "checkpoint": merged_rec["checkpoint"]},
            "adapters": {name: {"file": f"adapters/{path.name}", "workspace": str(src.root),
                                "adapter_sha256": src.stage("merge")["outputs"]["adapter"]}
                         for (name, path), src in zip(adapter_files.items(), sources, strict=True)},
            "verification": verification, "versions": library_versions(),
            "files": fingerprint.Hashes().files([tmp / "README.md", *files.values()], tmp),
            "bytes": sum(p.stat().st_size for p in files.values()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    peak = rss.peak_mb()
    ws.record("package", {"config": dataclasses.asdict(cfg), "precision": precision, "bundle": str(out),
                          "merged_at": merged_rec["finished_at"], "verification": verification,
                          "bytes": manifest["bytes"], "seconds": round(time.time() - started, 1),
                          "build_seconds": round(build_s, 1), "peak_rss_mb": round(peak, 1)})
    return out


ADAPTER_USAGE = """
## Swappable adapters ({names})

The base model's LoRA branches are inputs; with no adapter active it is the base model. Switch per
generator:

```python
adapters = og.Adapters(model)
adapters.load("adapters/NAME.onnx_adapter", "NAME")
generator = og.Generator(model, params)
generator.set_active_adapter(adapters, "NAME")
```
"""


@dataclass(frozen=True)
class ChatConfig:
    max_new_tokens: int = spec("longest reply in tokens (capped at what the model's context leaves)", 256, min=1)
    system: str | None = spec("system prompt (use the one the model was fine-tuned with)", None)
    adapter: str | None = spec("a swappable adapter of the bundle to chat with (its name, or an .onnx_adapter file)",
                               None)


def _reply_length(prompt_tokens: int, wanted: int, context: int | None, warned: set) -> int:
    """The generator's max_length for a prompt: prompt plus `wanted` new tokens, capped at the context (said once);
    a prompt that fills the context is refused."""
    if context is None:
        return prompt_tokens + wanted
    if prompt_tokens >= context:
        raise EdgeftError(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: nothing is "
                          "left for a reply; shorten the prompt (or the system prompt)")
    if prompt_tokens + wanted > context and "cap" not in warned:
        warned.add("cap")
        print(f"chat: replies are capped at {context - prompt_tokens} tokens: the model's context is {context} tokens "
              f"(--max-new-tokens {wanted})", file=sys.stderr)
    return min(prompt_tokens + wanted, context)


def chat(bundle: Path, prompt: str | None = None, cfg: ChatConfig = ChatConfig()) -> None:
    """Stream replies from a packaged model (one prompt, or an interactive loop). `bundle` may be a workspace
    (its bundle/); `cfg.adapter` names one of the bundle's `.onnx_adapter` files (a name or a path)."""
    import onnxruntime_genai as og

    bundle = Path(bundle)
    if not (bundle / "genai_config.json").is_file() and (bundle / "bundle" / "genai_config.json").is_file():
        bundle = bundle / "bundle"
    if not (bundle / "genai_config.json").is_file():
        raise EdgeftError(f"{bundle} is not an ONNX Runtime GenAI bundle (no genai_config.json); "
                          "build one with `edgeft package WS`")
    shipped = sorted(p.stem for p in (bundle / "adapters").glob("*.onnx_adapter"))
    adapter_file = None
    if (adapter := cfg.adapter) is not None:
        adapter_file = Path(adapter) if adapter.endswith(".onnx_adapter") else bundle / "adapters" / f"{adapter}.onnx_adapter"
        if not adapter_file.is_file():
            raise EdgeftError(f"no adapter {adapter!r} in {bundle}: "
                              + (f"it ships {', '.join(shipped)}" if shipped else "it was built without adapters "
                                 "(`edgeft package WS --adapters`)"))
    elif shipped:
        print(f"chat: the base model, no adapter active; this bundle ships {', '.join(shipped)} "
              f"(--adapter {shipped[0]})", file=sys.stderr)
    context = context_length(bundle)
    model = open_model(bundle)
    tok = og.Tokenizer(model)
    active = load_adapter(model, adapter_file) if adapter_file is not None else None
    warned: set = set()

    def reply(text: str) -> None:
        turns = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": text}]
        messages = json.dumps(turns)
        try:
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a bundle without a chat template: send the text as it is
            rendered = text
        ids = tok.encode(rendered)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=_reply_length(len(ids), cfg.max_new_tokens, context, warned),
                                  do_sample=False)
        gen = generator(model, params, active)
        gen.append_tokens(ids)
        new: list[int] = []
        shown = ""
        while not gen.is_done():  # decode the whole reply each step and print what is new: exact for any tokenizer
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
            text_now = tok.decode(np.asarray(new, dtype=np.int32))
            if text_now.startswith(shown) and not text_now.endswith("\ufffd"):
                print(text_now[len(shown):], end="", flush=True)
                shown = text_now
        print()

    if prompt is not None:
        reply(prompt)
        return
    while True:
        try:
            text = input("> ")
        except EOFError:
            return
        except UnicodeDecodeError:
            raise EdgeftError("standard input is not UTF-8 text; type or pipe UTF-8 prompts") from None
        if text.strip():
            try:
                reply(text)
            except EdgeftError as e:  # this prompt only: the session goes on
                print(f"error: {e}", file=sys.stderr)
