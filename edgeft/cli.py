"""The `edgeft` command: a table of commands, each a short function over a library call.

Heavy libraries (torch, onnxruntime, onnxruntime_genai) are imported inside the command that needs them.
User errors (EdgeftError) print `error: ...` and exit 2 without a traceback; bugs keep theirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeft.core import errors
from edgeft.core.errors import EdgeftError, Terminated, command, storage_problem, terminate_like_interrupt


def _parse(cls, args: argparse.Namespace, source: str, **given):
    """The command's options as the config dataclass `cls` (through schema.parse, the one place numbers are
    checked): every field the command line sets, plus `given`."""
    from edgeft.core import schema

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if f.name not in given and getattr(args, f.name, None) is not None}
    return schema.parse(cls, options | {k: v for k, v in given.items() if v is not None}, source)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# --- commands ---------------------------------------------------------------------------------------

def cmd_doctor(args) -> int:
    """Check everything a run needs; one line per item, with the fix for what is missing."""
    from edgeft.runtime import doctor

    checks = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_json(checks), indent=2))
    else:
        con = _console()
        for c in checks:
            mark = "[green]ok  [/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]warn[/]")
            line = f"{mark} {c.name:<17} {c.version or '-':<12} {c.detail}"
            con.print(line)
            if not c.ok and c.fix:
                con.print(f"     {'':<17} fix: {c.fix}")
    return 0 if all(c.ok for c in checks if c.required) else 1


def cmd_runtime_install(args) -> int:
    """Install the ONNX Runtime training build (1.19.2) and onnx 1.17.0 into edgeft's side directory."""
    from edgeft.runtime import training_build

    variant = "cuda" if args.cuda else "cpu"
    already = training_build.is_complete(variant) and not args.force
    path = training_build.install(cuda=args.cuda, force=args.force)
    print(f"training runtime ({variant}) {'already installed' if already else 'installed'}: {path}")
    if args.cuda and (problem := training_build.cuda_problem()):
        print(f"note: --ep cuda will not run on this machine: {problem}")
    print("next: `edgeft doctor`")
    return 0


def cmd_runtime_path(args) -> int:
    """Print the training runtime's directory (exit 1 when it is not installed)."""
    from edgeft.runtime import training_build

    variant = "cuda" if args.cuda else "cpu"
    print(training_build.runtime_dir(variant))
    return 0 if training_build.is_installed(variant) else 1


def cmd_devices_list(args) -> int:
    """List the device profiles edgeft knows (devices/ and EDGEFT_DEVICES_PATH)."""
    from edgeft.devices import profiles

    con = _console()
    con.print(f"[bold]{'name':<28} {'cpu':<20} {'memory/budget':<14} {'training':<16} inference[/]")
    for name, path in profiles.available().items():
        try:
            p = profiles.load_file(path)
        except EdgeftError as e:
            con.print(f"{name:<28} [red]invalid: {str(e).splitlines()[0]}[/]")
            continue
        eps = p.execution_providers
        mem = f"{p.memory.total_gb.value:g}/{p.memory.budget_gb.value:g} GB"
        con.print(f"{name:<28} {p.cpu.arch + ', ' + str(p.cpu.cores) + ' cores':<20} {mem:<14} "
                  f"{eps.training_backend + ': ' + ','.join(eps.training):<16} {','.join(eps.inference)}")
    return 0


def cmd_devices_show(args) -> int:
    """Show one profile (name or path), every figure with its source."""
    from edgeft.core import schema
    from edgeft.devices import profiles

    profile = profiles.load(args.name)
    if args.json:
        print(json.dumps(schema.to_dict(profile), indent=2))
        return 0
    con = _console()
    con.print(f"[bold]{profile.name}[/]: {profile.description}")
    for path, fig in profiles.figures(profile):
        date = f", {fig.date}" if fig.date else ""
        con.print(f"  {path:<34} {fig.value:>10g}   [dim]{fig.source}{date}: {fig.ref}[/]")
    eps = profile.execution_providers
    con.print(f"  training: {', '.join(eps.training)} (backend {eps.training_backend}); "
              f"inference: {', '.join(eps.inference)}")
    q = profile.quantization
    con.print(f"  package: {q.precision}, block {q.block_size}, accuracy level {q.accuracy_level}, "
              f"{'symmetric' if q.symmetric else 'asymmetric'}")
    for line in profiles.over_ssh(profile):
        con.print(f"  over SSH: {line}")
    for note in profile.notes:
        con.print(f"  [yellow]note:[/] {note}")
    return 0


def cmd_devices_probe(args) -> int:
    """Measure this machine, or a device over SSH (--on), (cores, ISA, memory, fp32 MatMul GFLOP/s, bandwidth) and
    write a profile."""
    from edgeft.devices import probe

    out = Path(args.out)
    if out.is_dir():
        raise EdgeftError(f"--out {out} is a folder; pass the profile file to write, e.g. {out / 'this-box.yaml'}")
    if out.suffix not in (".yaml", ".yml"):
        raise EdgeftError(f"--out {out}: a profile file must end in .yaml")
    if out.exists() and not args.force:
        raise EdgeftError(f"{out} exists; pass --force to overwrite it")
    if not out.absolute().parent.is_dir():
        raise EdgeftError(f"--out {out}: the folder {out.absolute().parent} does not exist; create it first")
    if args.on:
        from edgeft.targets.probe import probe_on

        profile, _ = probe_on(_target(args), args.name or out.stem, args.device_python, args.device_dir)
    else:
        profile = probe.probe(args.name or out.stem)
    if profile.name != out.stem:
        raise EdgeftError(f"--name {profile.name!r} must equal the file name {out.stem!r}")
    probe.write(profile, out)
    int8 = f"{profile.cpu.peak_int8_gops.value:g} GOP/s int8, " if profile.cpu.peak_int8_gops else ""
    print(f"measured: {profile.cpu.cores} cores, {profile.cpu.peak_fp32_gflops.value:g} GFLOP/s fp32 MatMul, {int8}"
          f"{profile.memory.bandwidth_gbs.value:g} GB/s, {profile.memory.total_gb.value:g} GB")
    print(f"wrote {out}\nnext: `{command('edgeft', 'devices', 'show', out)}`")
    return 0


def cmd_prepare(args) -> int:
    """Load a Hugging Face model folder, add LoRA/DoRA adapters with PEFT, and start a workspace."""
    from edgeft.core.workspace import Workspace
    from edgeft.devices import profiles
    from edgeft.stages.prepare import PrepareConfig, Prepared, prepare

    cfg = _parse(PrepareConfig, args, "prepare options")
    device = profiles.load(args.device) if args.device else None
    out = prepare(cfg, Path(args.out), device)
    p = Workspace(out).read(Prepared).params
    print(f"prepared {out}: {p['trainable']:,} trainable of {p['total']:,} parameters "
          f"({100 * p['trainable'] / p['total']:.3f} %)")
    print(f"next: `{command('edgeft', 'export', out)}`")
    return 0


def cmd_export(args) -> int:
    """Export a prepared workspace to ONNX Runtime training artifacts and verify them against PyTorch."""
    from edgeft.core.workspace import Workspace
    from edgeft.stages.export import ExportConfig, Exported, export

    cfg = _parse(ExportConfig, args, "export options")
    out = export(Path(args.workspace), cfg, force=args.force)
    rec = Workspace(args.workspace).read(Exported)
    v, m = rec.verification, rec.memory_mb
    print(f"exported {out}: {', '.join(rec.outputs)}")
    print(f"verified: ORT loss {v['ort_eval_loss']:.6f} vs PyTorch {v['torch_loss']:.6f} "
          f"(relative {v['relative_difference']:.1e}); {rec.timing_s['total']:.1f} s, peak RSS "
          f"{max(m['torch_export_peak_rss'], m['generate_artifacts_peak_rss']):.0f} MB")
    print(f"next: `{command('edgeft', 'train', args.workspace, '--data', 'FILE.jsonl')}`")
    return 0


def cmd_data_check(args) -> int:
    """Check a training file: format errors with line numbers, token statistics, duplicates, time per epoch."""
    from edgeft.data import check
    from edgeft.data.dataset import DataConfig
    from edgeft.devices import profiles

    cfg = _parse(DataConfig, args, "data check options")
    profile = profiles.load(args.device) if args.device else None
    report = check.check(Path(args.file), Path(args.model), cfg.seq_len, profile, cfg.train_on_prompt, cfg.columns)
    print(json.dumps(report, indent=2) if args.json else check.render(report))
    return 0 if report["clean"] else 1


def cmd_train(args) -> int:
    """Fine-tune a workspace's adapter on JSONL data with ONNX Runtime training (or --backend torch)."""
    from edgeft.devices import profiles
    from edgeft.stages.train import Interrupted, Joined, TrainConfig, train

    cfg = _parse(TrainConfig, args, "train options")
    device = profiles.load(args.device) if args.device else None
    on = None
    if args.on:
        from edgeft.targets.train import TrainOn

        on = TrainOn(_target(args), args.device_python, args.device_dir)
    result = train(Path(args.workspace), Path(args.data), cfg, args.eval_data, device, args.resume, on)
    if isinstance(result, Joined):
        print(f"node {result.node_rank} of {result.nnodes}: trained {result.step}/{result.total_steps} steps with the "
              "others; node 0 holds the checkpoints and the record")
        return 0
    if isinstance(result, Interrupted):
        print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}")
        print(f"resume: `{result.resume_command}` (with the same options)")
        return 143 if errors.terminated else 130
    best = result.best_eval_loss
    print(f"trained {result.step} steps" + (f", best eval loss {best:.4f}" if best is not None else "")
          + (f", {result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else "")
          + f", peak RSS {result.peak_rss_mb:.0f} MB")
    print(f"metrics: {result.metrics}  plot: {result.plot}")
    print(f"next: `{command('edgeft', 'merge', args.workspace)}`")
    return 0


def cmd_merge(args) -> int:
    """Write the trained adapter in PEFT format and the merged model, both checked against training."""
    from edgeft.core.workspace import Workspace
    from edgeft.stages.merge import MergeConfig, Merged, merge

    ws = Workspace(merge(Path(args.workspace), _parse(MergeConfig, args, "merge options")))
    rec = ws.read(Merged)
    v = rec.verification
    check = (f"PEFT vs ORT eval logits {v['peft_vs_ort_eval_max_abs']:.1e}, " if "peft_vs_ort_eval_max_abs" in v else "")
    print(f"merged {rec.checkpoint} (step {rec.step}): {ws.adapter} and {ws.merged}")
    print(f"verified: {check}merged vs PEFT {v['merged_vs_peft_max_abs']:.1e} (max abs; the largest logit is "
          f"{v['logit_scale']:.3g}, tolerance {v['tolerance']:g} of it)")
    print(f"next: `{command('edgeft', 'package', args.workspace)}`")
    return 0


def cmd_package(args) -> int:
    """Build an ONNX Runtime GenAI bundle of the merged model (int4 by default), verified against transformers."""
    from edgeft.devices import profiles
    from edgeft.stages.bundle import own_adapter
    from edgeft.stages.package.stage import PackageConfig, package

    cfg = _parse(PackageConfig, args, "package options")
    device = profiles.load(args.device) if args.device else None
    out = package(Path(args.workspace), cfg, device)
    m = json.loads((out / "manifest.json").read_text())  # written just now by package
    v = m["verification"]
    print(f"packaged {out} ({m['precision']}, {m['execution_provider']}, {m['bytes'] / 2**20:.1f} MB)")
    print(f"verified against transformers: greedy token agreement {v['token_agreement']:.0%} on {v['prompts']} prompts, "
          f"max logit error {v['max_logit_error']:.2e}")
    if m.get("adapters"):
        print(f"adapters: {', '.join(a['file'] for a in m['adapters'].values())}; with none active the bundle is the "
              f"base model (vs transformers: agreement {v['no_adapter_vs_base']['token_agreement']:.0%})")
    if shipped := v.get("shipped_base"):
        line = (f"trained base = shipped base: {shipped['identical_weights']} of {shipped['trained_int4_weights']} int4 "
                f"weights byte for byte")
        if "adapter_vs_training_runtime_max_logit_error" in shipped:
            line += (f"; with the adapter, vs the training runtime's eval logits: "
                     f"{shipped['adapter_vs_training_runtime_max_logit_error']:.2e}")
        print(line)
    adapter = own_adapter(out)
    print(f"next: `{command('edgeft', 'chat', out, *(('--adapter', adapter.stem) if adapter else ()))}`")
    return 0


def cmd_eval(args) -> int:
    """Quality side by side: base (zero- and few-shot), adapter, merged model and packaged bundle."""
    from edgeft.stages import evaluate

    cfg = _parse(evaluate.EvalConfig, args, "eval options")
    report = evaluate.evaluate(Path(args.workspace), Path(args.data), cfg, Path(args.shots_from) if args.shots_from
                          else None)
    print(evaluate.markdown(report))
    print(f"report: {Path(args.workspace) / 'eval' / 'report.md'}  chart: {Path(args.workspace) / 'eval' / 'report.png'}")
    return 0


def cmd_bench(args) -> int:
    """Measure training and inference speed and memory with the real runtimes, judged against the budgets."""
    from edgeft.devices import profiles
    from edgeft.stages import bench

    cfg = _parse(bench.BenchConfig, args, "bench options")
    profile = profiles.load(args.device) if args.device else None
    device = None
    if args.on:
        from edgeft.targets.bench import OnDevice

        device = OnDevice(_target(args), args.device_python, args.device_dir)
    report = bench.bench(Path(args.target), profile, cfg, args.backend, Path(args.data) if args.data else None,
                       Path(args.out) if args.out else None, device=device)
    print(json.dumps(report, indent=2) if args.json else bench.markdown(report))
    return 0


def cmd_run(args) -> int:
    """Run the pipeline from a recipe: prepare, export, train, merge, package, eval, bench."""
    from edgeft.pipeline import run

    recipe, base = run.load(Path(args.recipe), args.set or [])
    result = run.run_recipe(recipe, base, force=tuple(_list_of(str)(args.force or "")))
    print(f"done: {result['workspace']}  ({', '.join(f'{k} {v:.0f} s' for k, v in result['timings'].items()) or 'all stages unchanged'})")
    return 0


def cmd_fleet_sim(args) -> int:
    """Federated fine-tuning of a recipe on a simulated fleet (Flower): each device trains on its own data."""
    return _fleet(args)


def cmd_fleet_run(args) -> int:
    """Federated fine-tuning of a recipe on real devices: Flower's SuperLink at --superlink, a SuperNode per device."""
    link = {"superlink": args.superlink, "insecure": args.insecure,
            "root_certificates": Path(args.root_certificates) if args.root_certificates else None}
    return _fleet(args, link)


def cmd_fleet_node(args) -> int:
    """A device's folder for a deployed fleet: the artifacts, its data tokenized, and node.json."""
    from edgeft.fleet import deploy
    from edgeft.stages.train import TrainConfig

    path = deploy.node(Path(args.workspace), Path(args.data), Path(args.out), _parse(TrainConfig, args, "train options"))
    print(f"wrote {path.parent}; copy it to the device and start its node there:\n"
          f"  flower-supernode --superlink HOST:PORT --root-certificates CA.pem "
          f"--auth-supernode-private-key KEY --node-config \"federation='{path}'\"")
    return 0


def cmd_fleet_personalize(args) -> int:
    """Each device's personal adapter: a few steps from the fleet's global adapter on its own data."""
    from edgeft.fleet.personalize import personalize

    made = personalize(Path(args.workspace), args.steps, Path(args.out))
    print(f"{len(made)} personal workspaces in {args.out}; merge each, then ship them with one base: "
          f"`edgeft package {args.workspace} --adapters --add-adapters {made[0]} ...`")
    return 0


def _fleet(args, superlink: dict | None = None) -> int:
    from edgeft.core import schema
    from edgeft.pipeline import run

    fleet = _config(FLEET)
    recipe, base = run.load(Path(args.recipe), args.set or [])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(fleet) if getattr(args, f.name) is not None}
    if given.get("data_dir"):  # a flag's path is the shell's, not the recipe's
        given["data_dir"] = str(Path(given["data_dir"]).resolve())
    options = schema.parse(fleet, schema.to_dict(recipe.fleet) | given, "fleet options")
    result = run.run_fleet(dataclasses.replace(recipe, fleet=options), base, superlink=superlink)
    print(f"done: {result['workspace']}")
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: fine-tune, package int4, evaluate and bench, no downloads."""
    from edgeft.pipeline import demo

    demo.demo(args.seed, Path(args.workspace) if args.workspace else None, args.device)
    return 0


def cmd_plan(args) -> int:
    """Predict peak memory and step time of a LoRA run on a device profile, before anything heavy runs."""
    from edgeft.devices import plan, profiles

    o = _parse(plan.PlanOptions, args, "plan options")
    profile = profiles.load(args.device)
    target = Path(args.target)
    if not target.is_dir():
        raise EdgeftError(f"{target} is not a folder; pass a Hugging Face model folder or a prepared workspace")
    if (target / "manifest.json").is_file() and not (target / "config.json").is_file():  # a workspace
        from edgeft.core.workspace import Workspace
        from edgeft.stages import planning

        p = planning.for_workspace(Workspace(target), profile, o.seq_len, o.batch_size, o.lora_r, o.targets,
                                   o.backend, o.train_modules, o.recompute, ranks=o.ranks, strategy=o.strategy)
    else:
        p = plan.for_model(target, profile, o.seq_len, o.batch_size, o.lora_r, o.targets, o.backend,
                           o.train_modules, o.base_precision, o.recompute, ranks=o.ranks, strategy=o.strategy)
    print(json.dumps(plan.to_dict(p, profile), indent=2) if args.json else plan.render(p, profile))
    return 0 if p.fits else 1


def cmd_chat(args) -> int:
    """Stream a reply from a packaged model (interactive without --prompt)."""
    from edgeft.stages.chat import ChatConfig, chat

    chat(Path(args.bundle), args.prompt, _parse(ChatConfig, args, "chat options"))
    return 0


def cmd_serve(args) -> int:
    """Serve the OpenAI fine-tuning and chat API on this box (uploads, jobs, events, models, chat completions)."""
    from edgeft.service.serve import ServeConfig, serve

    return serve(_parse(ServeConfig, args, "serve options"))


def _int_or(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _list_of(item: type):
    """A comma-separated list flag; items that do not convert stay strings, for the schema to name them."""
    def convert(text: str) -> list:
        words = [t.strip() for t in text.split(",") if t.strip()]
        return [int(w) if item is int and w.lstrip("-").isdigit() else w for w in words]

    return convert


# --- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: tuple[tuple[tuple[str, ...], dict], ...] = ()
    options: str | None = None  # "module:Class": a config dataclass whose fields are this command's flags
    only: tuple[str, ...] | None = None  # of those fields, these (default: all)


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return flags, kwargs


def options_of(cls: type, only: tuple[str, ...] | None = None) -> list[tuple[tuple[str, ...], dict]]:
    """The flags of config dataclass `cls`, one per field (the one declaration of each option): `--seq-len` for
    `seq_len`, its doc as the help, its choices; a bool that defaults to False is a switch, any other bool a pair
    (`--recompute` / `--no-recompute`); a list is comma-separated, or repeated where the field says `repeat`.
    Every flag defaults to None, so that what is not given takes the dataclass's default (and schema.parse checks
    what is)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False or (only is not None and f.name not in only):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if typing.get_origin(tp) in (
            typing.Union, types.UnionType) else tp
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or default is False or default == "" else f" (default {default})"
        kwargs: dict = {"dest": f.name, "default": None, "help": meta.get("doc", "") + shown}
        if base is bool:
            out.append(arg(flag, action="store_true", **kwargs))
            if default is not False:
                out.append(arg("--no-" + flag[2:], dest=f.name, action="store_false", default=None,
                               help=f"the opposite of {flag}"))
            continue
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            if meta.get("repeat"):
                kwargs.update(action="append", metavar=meta.get("metavar"))
            else:
                kwargs.update(type=_list_of(item), metavar=meta.get("metavar", "A,B"))
        else:
            kwargs["type"] = {int: _int_or, float: float}.get(base, str)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        out.append(arg(flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"}))
    return out


PREPARE = "edgeft.stages.prepare:PrepareConfig"
FLEET = "edgeft.fleet.config:FleetConfig"
# A target device over SSH (targets/): where a command runs instead of here
TARGET_ARGS = (
    arg("--on", metavar="[USER@]HOST[:PORT]", help="run on this device over SSH (key authentication; host keys "
                                                    "checked as OpenSSH does)"),
    arg("--ssh-key", metavar="FILE", help="the private key for --on (default: your ssh configuration's)"),
    arg("--known-hosts", metavar="FILE", help="known_hosts file with the device's host key (default: OpenSSH's)"),
    arg("--device-python", default="python3", help="the device's Python 3.10+ (default: python3)"),
    arg("--device-dir", metavar="DIR", help="where edgeft keeps its runtime and files on the device (default: "
                                            "~/.cache/edgeft)"))
COMMANDS: tuple[Command, ...] = (
    Command("doctor", cmd_doctor, (arg("--json", action="store_true", help="machine-readable output"),)),
    Command("prepare", cmd_prepare, (
        arg("model_dir", help="Hugging Face causal-LM folder"),
        arg("--out", required=True, help="workspace folder to create"),
        arg("--device", help="device profile name or file")), PREPARE),
    Command("export", cmd_export, (
        arg("workspace", help="a prepared workspace"),
        arg("--force", action="store_true", help="export again even if unchanged (rebuilds damaged artifacts)")),
        "edgeft.stages.export:ExportConfig"),
    Command("train", cmd_train, (
        arg("workspace"), arg("--data", required=True, help="training JSONL"),
        arg("--eval-data", help="validation JSONL (default: --val-fraction of --data)"),
        arg("--device", help="device profile name or file"),
        arg("--resume", action="store_true", help="continue from the latest checkpoint"),
        *TARGET_ARGS), "edgeft.stages.train:TrainConfig"),
    Command("merge", cmd_merge, (arg("workspace"),), "edgeft.stages.merge:MergeConfig"),
    Command("package", cmd_package, (
        arg("workspace"), arg("--device", help="device profile: quantization settings and allowed providers")),
        "edgeft.stages.package.stage:PackageConfig"),
    Command("eval", cmd_eval, (
        arg("workspace"), arg("--data", required=True, help="test JSONL (chat or prompt/completion)"),
        arg("--shots-from", help="file to take the few-shot examples from (default: the training data)")),
        "edgeft.stages.evaluate:EvalConfig"),
    Command("bench", cmd_bench, (
        arg("target", help="a workspace (training, and its bundle if packaged) or a bundle folder"),
        arg("--device", help="device profile whose budgets judge the figures"),
        arg("--backend", choices=("ort", "torch"), help="training backend (default: the profile's)"),
        arg("--data", help="text for the batches and prompts (default: the sample task)"),
        arg("--out", help="report folder (default: WS/bench, or BUNDLE-bench beside a bundle)"),
        arg("--json", action="store_true"), *TARGET_ARGS), "edgeft.stages.bench:BenchConfig"),
    Command("run", cmd_run, (
        arg("recipe", help="recipe YAML (see recipes/)"),
        arg("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)"),
        arg("--force", help="comma-separated stages to run even if unchanged"))),
    Command("fleet sim", cmd_fleet_sim, (
        arg("recipe", help="recipe YAML (its fleet: section; these flags override it)"),
        arg("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")),
        FLEET),
    Command("fleet run", cmd_fleet_run, (
        arg("recipe", help="recipe YAML (its fleet: section; these flags override it)"),
        arg("--superlink", required=True, metavar="HOST:PORT", help="Flower's SuperLink"),
        arg("--root-certificates", metavar="CA.pem", help="the CA that signed the SuperLink's TLS certificate"),
        arg("--insecure", action="store_true", help="no TLS (a SuperLink started with --insecure)"),
        arg("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")),
        FLEET),
    Command("fleet personalize", cmd_fleet_personalize, (
        arg("workspace", help="a workspace a simulated fleet trained"),
        arg("--steps", type=_int_or, default=10, help="local steps from the global adapter (default 10)"),
        arg("--out", required=True, help="folder for the personal workspaces (device-NNNNN)"))),
    Command("fleet node", cmd_fleet_node, (
        arg("workspace", help="the fleet's workspace (prepared and exported)"),
        arg("--data", required=True, help="this device's training JSONL"),
        arg("--out", required=True, help="the device's folder to write")),
        "edgeft.stages.train:TrainConfig", ("seq_len", "truncation", "train_on_prompt", "val_fraction", "seed",
                                             "backend", "ep")),
    Command("demo", cmd_demo, (
        arg("--seed", type=_int_or, default=0), arg("--workspace", help="default: artifacts/home-demo-seed<SEED>"),
        arg("--device", help="device profile to judge against (default: the recipe's)"))),
    Command("plan", cmd_plan, (
        arg("target", help="Hugging Face model folder or a prepared workspace"),
        arg("--device", required=True, help="device profile name or file"),
        arg("--json", action="store_true")), "edgeft.devices.plan:PlanOptions"),
    Command("chat", cmd_chat, (
        arg("bundle", help="a bundle folder, or a workspace (its bundle/)"),
        arg("--prompt", help="one prompt; without it, read prompts from stdin")), "edgeft.stages.chat:ChatConfig"),
    Command("serve", cmd_serve, (), "edgeft.service.serve:ServeConfig"),
    Command("data check", cmd_data_check, (
        arg("file", help="training data: .jsonl, .json, .parquet or a save_to_disk folder (chat, prompt/completion "
                         "or text)"),
        arg("--model", required=True, help="model folder whose tokenizer and chat template to use"),
        arg("--device", help="device profile for the time estimate"),
        arg("--json", action="store_true")), "edgeft.data.dataset:DataConfig",
        ("seq_len", "truncation", "train_on_prompt", "columns")),
    Command("runtime install", cmd_runtime_install, (
        arg("--cuda", action="store_true",
            help="the CUDA training build with its CUDA 11.8 / cuDNN 8 libraries (about 2.9 GB) instead of the CPU one"),
        arg("--force", action="store_true", help="reinstall even if present"))),
    Command("runtime path", cmd_runtime_path, (arg("--cuda", action="store_true"),)),
    Command("devices list", cmd_devices_list),
    Command("devices show", cmd_devices_show, (
        arg("name", help="profile name or path of a profile file"), arg("--json", action="store_true"))),
    Command("devices probe", cmd_devices_probe, (
        arg("--out", required=True, help="profile file to write (NAME.yaml)"),
        arg("--name", help="profile name (default: the file name)"),
        arg("--force", action="store_true", help="overwrite an existing file"),
        *TARGET_ARGS)),
)


def _target(args):
    from edgeft.targets.ssh import Target

    return Target.parse(args.on, args.ssh_key, args.known_hosts)


def _config(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def selected(argv: list[str]) -> Command | None:
    """The command `argv` names (its first words), so that only its options' module is imported."""
    words = [w for w in argv if not w.startswith("-")][:2]
    for cmd in sorted(COMMANDS, key=lambda c: -len(c.name.split())):
        if cmd.name.split() == words[: len(cmd.name.split())]:
            return cmd
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the options of the command `argv` selects come from its config dataclass (a command's module is
    imported only when it is the one called: torch is not loaded to list devices)."""
    from edgeft import __version__

    chosen = selected(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="edgeft", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"edgeft {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        words = cmd.name.split()
        parent = top
        for i, word in enumerate(words[:-1]):
            key = " ".join(words[: i + 1])
            if key not in groups:
                group = parent.add_parser(word, help=f"{key} commands")
                groups[key] = group.add_subparsers(dest=f"sub_{i}", metavar="SUBCOMMAND", required=True)
            parent = groups[key]
        doc = (cmd.run.__doc__ or "").strip()
        p = parent.add_parser(words[-1], help=doc.splitlines()[0] if doc else None, description=doc)
        flags = list(cmd.arguments)
        if cmd is chosen and cmd.options:
            flags += options_of(_config(cmd.options), cmd.only)
        for names, kwargs in flags:
            p.add_argument(*names, **kwargs)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    # Deprecation notices between transformers and PEFT are for their developers, not for edgeft's users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    if argv is None:  # the command itself, not a call from Python: SIGTERM stops it as Ctrl-C does
        terminate_like_interrupt()
    try:
        return args.func(args)
    except EdgeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:
        if (problem := storage_problem(e)) is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
