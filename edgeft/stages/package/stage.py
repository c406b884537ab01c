"""package: the stage. Builds the bundle (builder.py), verifies it (verify.py), describes it (manifest.json,
readme.py) and records it; nothing is written unless every check passes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeft.core import fingerprint, progress, rss, schema, state
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError, command
from edgeft.core.schema import spec
from edgeft.core.workspace import Record, Workspace, key_of, library_versions
from edgeft.devices.profiles import Quantization
from edgeft.stages.bundle import REBUILD, context_length
from edgeft.stages.merge import Merged
from edgeft.stages.package import chat_defaults, readme, verify
from edgeft.stages.package.builder import (
    BUILDER_EPS,
    BUILDER_PRECISIONS,
    build,
    build_adapters,
    set_cpu_threads,
)
from edgeft.stages.prepare import Prepared
from edgeft.stages.train import Trained
from edgeft.trainer.ort_engine import CHECKPOINT


@dataclass(frozen=True)
class PackageConfig:
    precision: str | None = spec("int4, int8, fp16 or fp32 (default: the device profile's, else int4)", None,
                                 choices=BUILDER_PRECISIONS)
    ep: str = spec("execution provider the model is built for", "cpu", choices=BUILDER_EPS)
    max_new_tokens: int = spec("tokens generated per verification prompt", 16, min=1)
    prompts: int = spec("verification prompts", 3, min=1)
    force: bool = spec("replace an existing bundle", False)
    adapters: bool = spec("build the base model once plus a swappable .onnx_adapter per trained adapter", False)
    add_adapters: list[str] = spec("another workspace (same base, same targets) whose adapter to ship too "
                                   "(repeatable)", default_factory=list, repeat=True, metavar="WS")
    weights: str = spec("how the transformers reference reads the fp32 weights: 'load' holds the model; 'stream' "
                        "one decoder layer at a time; 'auto' streams past 4 GiB", "auto",
                        choices=("auto", "load", "stream"))
    system: str | None = spec("the bundle's default system prompt, rendered when a conversation brings none "
                              "(default: the training data's, when one is in most of its records; '' for none)", None)

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, not (self.precision == "fp16" and self.ep == "cpu"),
                     "precision: fp16 is for GPU execution providers; use int4 or fp32 on cpu")
        schema.raise_if(problems, "package options")



@dataclass(frozen=True)
class Packaged(Record):
    """What package recorded: the bundle, how it was built and verified."""

    STAGE: ClassVar[str] = "package"
    config: PackageConfig = spec("the options")
    precision: str = spec("the bundle's precision")
    bundle: str = spec("the bundle's folder")
    merged_at: str = spec("when the merge it packaged finished")
    verification: dict = spec("the bundle against transformers (and the trained base, for adapters)")
    bytes: int = spec("the bundle's size")
    seconds: float = spec("wall time", 0.0)
    build_seconds: float = spec("the builder's time", 0.0)
    peak_rss_mb: float = spec("peak memory of the package process", 0.0)


def _quantization(ws: Workspace, cfg: PackageConfig, device) -> Quantization:
    """The quantization to build with: the profile's (the defaults without one), except that an int4 base with
    adapters ships the very blocks it was trained against."""
    quant = device.quantization if device else Quantization()
    trained = ws.require(Prepared, "prepare it first").config.base_quant
    if _ships_trained_base(cfg, quant, trained) and \
            (quant.block_size, quant.symmetric) != (trained["block_size"], trained["symmetric"]):
        print(f"package: building the int4 base with the blocks it was trained against (block {trained['block_size']}, "
              f"symmetric {trained['symmetric']}), not the profile's (block {quant.block_size}, "
              f"symmetric {quant.symmetric})")
        quant = dataclasses.replace(quant, block_size=trained["block_size"], symmetric=trained["symmetric"])
    return quant


def _ships_trained_base(cfg: PackageConfig, quant: Quantization, trained: dict) -> bool:
    return cfg.adapters and (cfg.precision or quant.precision) == "int4" and trained["precision"] == "int4"


def key(ws: Workspace, cfg: PackageConfig, device) -> str:
    """The package stage's key: its options, the quantization it builds with, the execution provider's profile, and
    the merge (or merges, with --add-adapters) it packages."""
    quant = _quantization(ws, cfg, device)
    merges = [Workspace(w).read(Merged) for w in [ws.root, *cfg.add_adapters]]
    return key_of("package", dataclasses.asdict(cfg) | {"force": None}, dataclasses.asdict(quant),
                  getattr(device, "name", None), [m.key if m else None for m in merges])


def unchanged(ws: Workspace, cfg: PackageConfig = PackageConfig(), device=None) -> Packaged | None:
    """The package record if packaging again would build the same bundle, and the bundle is intact."""
    record = ws.read(Packaged) if ws.read(Merged) else None
    if record is None or record.key != key(ws, cfg, device):
        return None
    return record if _bundle_intact(Path(record.bundle)) else None


def _bundle_intact(bundle: Path) -> bool:
    """Whether every file the bundle's manifest lists still hashes as listed."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    files = state.read_json(manifest, "the bundle's manifest", REBUILD).get("files", {})
    return not fingerprint.Hashes().changed(files, bundle)


def _check_merged(ws: Workspace) -> Merged:
    """The merge record, if the merged model is still what merge wrote."""
    merged_rec = ws.require(Merged, f"merge it first: `edgeft merge {ws.root}`")
    merged = ws.merged
    recorded = merged_rec.outputs["merged"]
    actual = ws.hashes.folder(merged, ws.root) if merged.is_dir() else {}
    if actual != recorded:
        changed = sorted(set(recorded) ^ set(actual) | {k for k in recorded if actual.get(k) != recorded[k]})
        raise EdgeftError(f"{merged} no longer matches what merge wrote ({', '.join(changed[:3])}); run "
                          f"`{command('edgeft', 'merge', ws.root)}` again")
    return merged_rec



def _adapter_sources(ws: Workspace, cfg: PackageConfig) -> list[Workspace]:
    """This workspace and the --add-adapters ones, checked to fit one base graph."""
    prep = ws.read(Prepared)
    sources = [ws, *(Workspace(Path(p)) for p in cfg.add_adapters)]
    for other in sources:
        if not other.manifest_path.is_file():
            raise EdgeftError(f"--add-adapters {other.root}: not an edgeft workspace")
        _check_merged(other)
        theirs = other.read(Prepared)
        c = theirs.config
        if c.dora or c.train_modules or c.trainable_token_indices:
            what = "DoRA" if c.dora else "whole trained modules" if c.train_modules else "trainable token rows"
            raise EdgeftError(f"{other.root} trains {what}; an .onnx_adapter holds plain LoRA weights only. Package "
                              "it merged (without --adapters), or prepare it without that option")
        if other is not ws:
            if theirs.inputs != prep.inputs:
                raise EdgeftError(f"--add-adapters {other.root} was prepared from another base model than {ws.root}")
            if theirs.targets != prep.targets:
                raise EdgeftError(f"--add-adapters {other.root} adapts {theirs.targets}, "
                                  f"{ws.root} adapts {prep.targets}; one base graph needs the same targets")
    names = [s.root.name for s in sources]
    if len(set(names)) != len(names):
        raise EdgeftError(f"adapters are named after their workspace folders, and these repeat: {names}")
    return sources


def package(ws_path: Path, cfg: PackageConfig = PackageConfig(), device=None) -> Path:
    """Build, verify and describe `WS/bundle/` (holding the workspace's lock); returns the bundle. An existing bundle
    is replaced only with `force`."""
    from edgeft import __version__

    ws = Workspace.existing(ws_path)
    with ws.lock("package"):
        merged_rec = _check_merged(ws)
        prep = ws.read(Prepared)
        sources = _adapter_sources(ws, cfg) if cfg.adapters else []
        if cfg.add_adapters and not cfg.adapters:
            raise EdgeftError("--add-adapters needs --adapters")
        quant = _quantization(ws, cfg, device)
        precision = cfg.precision or quant.precision
        if device and cfg.ep not in device.execution_providers.inference:
            raise EdgeftError(f"--ep {cfg.ep} is not an inference provider of {device.name} "
                              f"({', '.join(device.execution_providers.inference)})")
        if ws.bundle.exists() and not cfg.force:
            raise EdgeftError(f"{ws.bundle} exists; pass --force to replace it")
        started = time.time()
        rss.reset_peak()
        ships_trained_base = _ships_trained_base(cfg, quant, prep.config.base_quant)
        steps = progress.Steps("package", 3 + (2 if cfg.adapters else 0) + (1 if ships_trained_base else 0))
        with atomic_dir(ws.bundle) as tmp:
            prompts = verify.prompts_of(ws.merged, cfg.prompts)
            built, adapter_files = _build(ws, prep, cfg, sources, tmp, precision, quant, steps)
            threads = set_cpu_threads(tmp, device.cpu.cores if device else os.cpu_count() or 1) \
                if cfg.ep == "cpu" else None
            active = adapter_files.get(ws.root.name)
            verification = verify.check_bundle(tmp, ws.merged, prep.model_dir, prompts, cfg,
                                               prep.config.trust_remote_code, active, steps)
            if ships_trained_base:
                with steps.step("the trained int4 base against the bundle's, byte for byte"):
                    verification["shipped_base"] = verify.shipped_base_check(
                        ws, tmp, prompts, active, ws.checkpoints / merged_rec.checkpoint / CHECKPOINT,
                        quant.accuracy_level, verification["ran_on"] != cfg.ep)
            if precision == "fp32" and verification["token_agreement"] < 1.0:
                raise EdgeftError(f"package verification failed: the fp32 model's greedy tokens differ from "
                                  f"transformers' (agreement {verification['token_agreement']:.1%}); nothing was "
                                  "written")
            trained = ws.read(Trained)
            system, source = chat_defaults.choose(cfg.system, trained.data if trained else {})
            chat = chat_defaults.apply(tmp, system, source, trained.config.seq_len if trained else None,
                                       context_length(tmp), chat_defaults.tools_of(trained.data if trained else {}))
            files = [p for p in tmp.rglob("*") if p.is_file()]
            (tmp / "README.md").write_text(readme.readme(ws.bundle.name, precision, cfg.ep, __version__,
                                                         list(adapter_files), system))
            manifest = {
                "edgeft": __version__, "kind": "base+adapters" if cfg.adapters else "merged",
                "precision": precision, "execution_provider": cfg.ep, "cpu_threads": threads,
                "quantization": dataclasses.asdict(quant) if precision in ("int4", "int8") else None,
                "build": built, "device": device.name if device else None, "chat_defaults": chat,
                **_sources(prep, merged_rec, adapter_files, sources), "verification": verification,
                "versions": library_versions(), "files": fingerprint.Hashes().files([tmp / "README.md", *files], tmp),
                "bytes": sum(p.stat().st_size for p in files),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        build_s = built["builder_seconds"] + built.get("prequantize", {}).get("seconds", 0.0)
        ws.write(Packaged(config=cfg, precision=precision, bundle=str(ws.bundle), merged_at=merged_rec.finished_at,
                          verification=verification, bytes=manifest["bytes"], key=key(ws, cfg, device),
                          seconds=round(time.time() - started, 1), build_seconds=round(build_s, 1),
                          peak_rss_mb=round(rss.peak_mb(), 1)))
    return ws.bundle


def base_bundle(ws_path: Path, out: Path, device=None) -> Path:
    """The bundle `package --adapters` builds for this workspace's adapters, before any is trained: the int4 base
    with its LoRA inputs, and the untrained adapter (zero: with or without it active, exactly the base). The
    service answers a base model with it, and loads that base's fine-tuned adapters into it."""
    ws = Workspace.existing(ws_path)
    prep = ws.require(Prepared, f"prepare it first: `edgeft prepare MODEL_DIR --out {ws.root}`")
    quant = _quantization(ws, PackageConfig(adapters=True, precision="int4"), device)
    with ws.lock("package"), atomic_dir(Path(out)) as tmp:
        build_adapters(prep.model_dir, prep.num_hidden_layers, {"base": ws.adapter_init}, tmp, ws.builder_cache,
                       "int4", "cpu", quant)
        set_cpu_threads(tmp, device.cpu.cores if device else os.cpu_count() or 1)
    return Path(out)


def _sources(prep: Prepared, merged: Merged, adapter_files: dict[str, Path], sources: list[Workspace]) -> dict:
    """What the bundle was built from, for its manifest: the model, the merged adapter, and each shipped adapter."""
    return {
        "source": {"model_dir": str(prep.model_dir), "model_sha256": prep.inputs,
                   "adapter_sha256": merged.outputs["adapter"], "checkpoint": merged.checkpoint},
        "adapters": {name: {"file": f"adapters/{path.name}", "workspace": str(src.root),
                            "adapter_sha256": src.read(Merged).outputs["adapter"]}
                     for (name, path), src in zip(adapter_files.items(), sources, strict=True)}}


def _build(ws: Workspace, prep: Prepared, cfg: PackageConfig, sources: list[Workspace], tmp: Path, precision: str,
           quant: Quantization, steps: progress.Steps) -> tuple[dict, dict[str, Path]]:
    """The bundle into `tmp`: the merged model, or the base with one .onnx_adapter per source workspace. How it was
    built, and the adapter files by name."""
    if cfg.adapters:
        with steps.step(f"{precision} base with LoRA inputs, and {len(sources)} .onnx_adapter (GenAI builder)"):
            build_s, files = build_adapters(prep.model_dir, prep.num_hidden_layers,
                                            {s.root.name: s.adapter for s in sources}, tmp, ws.builder_cache,
                                            precision, cfg.ep, quant)
        return {"builder_input": "fp32 base with the LoRA branches", "builder_seconds": round(build_s, 1)}, files
    with steps.step(f"{precision} model for {cfg.ep} (GenAI builder)"):
        return build(ws.merged, tmp, ws.builder_cache, precision, cfg.ep, quant), {}
