"""run: the whole pipeline from one recipe (YAML): prepare -> export -> train -> merge -> package -> eval -> bench.

A recipe has the sections model, lora, data, train, package, eval, bench, plus name, workspace and device;
every key is checked (unknown ones are listed with what is accepted). `--set section.key=value` overrides
any of them from the command line. Paths are relative to the recipe file; `edgeft:NAME` names something
edgeft ships (`edgeft:home_base`, the demo's base model; `edgeft:home_data/train.jsonl`, the sample task).

Re-running skips a stage whose inputs and options are unchanged (each stage records what it ran with in
the workspace manifest), resumes an interrupted training run from its last checkpoint, and re-runs every
stage after one that changed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import yaml

from edgeft.core import schema
from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec
from edgeft.core.workspace import STAGES, Record, Workspace
from edgeft.fleet.config import FleetConfig
from edgeft.stages.bench import BenchConfig
from edgeft.stages.evaluate import EvalConfig
from edgeft.stages.package.stage import PackageConfig
from edgeft.stages.prepare import PrepareConfig
from edgeft.stages.train import TrainConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the edgeft package
SHIPPED = {"home_base": PACKAGE_ROOT / "tasks" / "home_base", "home_data": PACKAGE_ROOT / "tasks" / "home_data",
           "recipes": PACKAGE_ROOT / "recipes"}
NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


# The model and lora sections are PrepareConfig's options under their recipe keys (declared there, once).
ModelSection = schema.section(PrepareConfig, "model")
LoraSection = schema.section(PrepareConfig, "lora")


@dataclass(frozen=True)
class DataSection:
    train: str = spec("training JSONL")
    eval: str | None = spec("validation JSONL (default: a split of train)", None)
    test: str | None = spec("held-out JSONL for `eval` (default: eval)", None)


@dataclass(frozen=True)
class Recipe:
    name: str = spec("run name")
    model: ModelSection = spec("the base model")
    data: DataSection = spec("training, validation and test data")
    workspace: str | None = spec("workspace folder (default: artifacts/<name>)", None)
    device: str | None = spec("device profile name or file", None)
    lora: LoraSection = spec("adapter settings", default_factory=LoraSection)
    train: TrainConfig = spec("training options (as `edgeft train`)", default_factory=TrainConfig)
    package: PackageConfig = spec("packaging options (as `edgeft package`; a recipe always replaces the bundle)",
                                  default_factory=PackageConfig)
    eval: EvalConfig = spec("evaluation options (as `edgeft eval`)", default_factory=EvalConfig)
    bench: BenchConfig = spec("bench options (as `edgeft bench`)", default_factory=BenchConfig)
    stages: list[str] = spec("stages to run, in pipeline order", default_factory=lambda: list(STAGES), choices=STAGES)
    fleet: FleetConfig = spec("federated training options (as `edgeft fleet sim`; its train stage is the fleet's)",
                              default_factory=FleetConfig)

    def __post_init__(self):
        problems: list[str] = []
        schema.check(problems, bool(NAME.fullmatch(self.name)) and self.name not in (".", ".."),
                     f"name: {schema.short(self.name)} is not a plain name: the default workspace is "
                     "artifacts/<name>, so use letters, digits, '.', '_' and '-' only (or set workspace: to a folder)")
        schema.raise_if(problems, "recipe")


def _coerce(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise EdgeftError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise EdgeftError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = _coerce(value)
    return data


def load(path: Path, overrides: list[str] = ()) -> tuple[Recipe, Path]:
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"recipe {path} does not exist; example recipes live in recipes/ "
                          "(`edgeft run recipes/home-demo.yaml`)")
    data = schema.load_yaml(path, "recipe") or {}
    if not isinstance(data, dict):
        raise EdgeftError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    return schema.parse(Recipe, apply_overrides(data, list(overrides)), f"recipe {path}"), path.parent.resolve()


def resolve(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    if value.startswith("edgeft:"):
        head, _, rest = value[len("edgeft:"):].partition("/")
        if head not in SHIPPED:
            raise EdgeftError(f"{value}: edgeft ships {', '.join('edgeft:' + k for k in SHIPPED)}")
        path = SHIPPED[head] / rest if rest else SHIPPED[head]
    else:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
    if not path.exists():
        raise EdgeftError(f"{value}: {path} does not exist")
    return path


@dataclass(frozen=True)
class Ran(Record):
    """What `edgeft run` recorded: the recipe that last ran in this workspace, and what each stage took."""

    STAGE: ClassVar[str] = "run"
    recipe: str = spec("the recipe's name")
    stages: list[str] = spec("the stages it asked for")
    timings: dict = spec("seconds per stage that ran (the unchanged ones were skipped)")


def workspace_of(recipe: Recipe) -> Workspace:
    root = Path(recipe.workspace).expanduser() if recipe.workspace else Path("artifacts") / recipe.name
    return Workspace(root if root.is_absolute() else (Path.cwd() / root))


def run_fleet(recipe: Recipe, base: Path, log=print, superlink: dict | None = None) -> dict:
    """The recipe with its train stage run by a fleet: prepare and export as `run` does, the fleet's rounds, then
    the recipe's stages after training (merge, package, eval, bench). Simulated on this machine
    (fleet/simulate.py), or, with `superlink` ({superlink, root_certificates, insecure}), on Flower's deployment
    runtime (fleet/deploy.py)."""
    from edgeft.fleet import deploy, simulate

    before = [s for s in ("prepare", "export") if s in recipe.stages and (s == "prepare" or recipe.train.backend == "ort")]
    run_recipe(dataclasses.replace(recipe, stages=before), base, log)
    data = resolve(recipe.data.train, base)
    fleet = recipe.fleet
    if fleet.data_dir:  # relative to the recipe, like every path in it
        fleet = dataclasses.replace(fleet, data_dir=str(resolve(fleet.data_dir, base)))
    log("[fleet]")
    ws = workspace_of(recipe)
    if superlink:
        record = deploy.run(ws.root, fleet, recipe.train, log=log, **superlink)
    else:
        record = simulate.simulate(ws.root, data, fleet, recipe.train, log)
    log(simulate.summary(record))
    after = [s for s in recipe.stages if s not in ("prepare", "export", "train")]
    result = run_recipe(dataclasses.replace(recipe, stages=after), base, log) if after else {"workspace": ws.root}
    return result | {"fleet": record}


def run_recipe(recipe: Recipe, base: Path, log=print, force: tuple[str, ...] = ()) -> dict:
    """Run the recipe's stages in its workspace, holding the workspace's lock throughout; skips each stage whose
    options, inputs (by content) and upstream stages are unchanged, unless it is in `force`."""
    from edgeft.devices import profiles

    if unknown := [name for name in force if name not in STAGES]:
        raise EdgeftError(f"--force {','.join(unknown)}: no such stage; the stages are {', '.join(STAGES)}")
    device = profiles.load(resolve(recipe.device, base) if recipe.device and recipe.device.endswith(".yaml")
                          else recipe.device) if recipe.device else None
    ws = workspace_of(recipe)
    with ws.lock("run"):
        return _run(recipe, base, ws, device, log, force)


def _run(recipe: Recipe, base: Path, ws: Workspace, device, log, force: tuple[str, ...]) -> dict:
    """Each stage of the recipe in order: skipped when the stage itself says it is unchanged (the same test it
    applies when run on its own: workspace.Workspace.unchanged), run otherwise."""
    from edgeft.stages import bench, evaluate, export, merge, prepare, train
    from edgeft.stages.package import stage as package

    model_dir = resolve(recipe.model.path, base)
    train_data = resolve(recipe.data.train, base)
    eval_data = resolve(recipe.data.eval, base)
    test_data = resolve(recipe.data.test, base) or eval_data
    prep_cfg = schema.gather(PrepareConfig, {"model": recipe.model, "lora": recipe.lora}, model_dir=str(model_dir))
    pkg_cfg = dataclasses.replace(recipe.package, force=True)

    def do_train() -> None:
        result = train.train(ws.root, train_data, recipe.train, eval_data, device, resume=None)
        if isinstance(result, train.Interrupted):
            raise EdgeftError(f"training was interrupted at step {result.step}; run the recipe again to resume")

    stages = {  # name: (unchanged, run)
        "prepare": (lambda: prepare.unchanged(ws, prep_cfg, device), lambda: prepare.prepare(prep_cfg, ws.root, device)),
        "export": (lambda: export.unchanged(ws), lambda: export.export(ws.root)),
        "train": (lambda: train.unchanged(ws, train_data, recipe.train, eval_data), do_train),
        "merge": (lambda: merge.unchanged(ws), lambda: merge.merge(ws.root)),
        "package": (lambda: package.unchanged(ws, pkg_cfg, device), lambda: package.package(ws.root, pkg_cfg, device)),
        "eval": (lambda: evaluate.unchanged(ws, test_data, recipe.eval, train_data),
                 lambda: evaluate.evaluate(ws.root, test_data, recipe.eval, train_data, log=log)),
        "bench": (lambda: bench.unchanged(ws, device, recipe.bench, data=train_data),
                  lambda: bench.bench(ws.root, device, recipe.bench, data=train_data)),
    }
    timings: dict[str, float] = {}
    for name in STAGES:
        unchanged, work = stages[name]
        if name not in recipe.stages:
            continue
        if name == "eval" and test_data is None:
            log("[eval] no data.test or data.eval; skipped")
        elif name not in force and unchanged() is not None:
            log(f"[{name}] unchanged; skipped")
        else:
            log(f"[{name}]")
            started = time.time()
            work()
            timings[name] = round(time.time() - started, 1)
    ws.write(Ran(recipe=recipe.name, stages=list(recipe.stages), timings=timings))
    return {"workspace": ws.root, "timings": timings, "manifest": ws.manifest()}
