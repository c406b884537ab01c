"""The planner (devices/plan.py) for a prepared workspace: its model, LoRA settings, base precision and
recomputation are the defaults; what is given replaces them."""

from __future__ import annotations

from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import Workspace
from edgeft.devices import plan
from edgeft.devices.profiles import Profile
from edgeft.stages.export import Exported
from edgeft.stages.prepare import Prepared


def recomputes(ws: Workspace) -> bool:
    """Whether the workspace's run recomputes activations: as exported (an explicit --recompute, or the record of
    what export recomputed), or before export as prepare's device plan chose."""
    exported = ws.read(Exported)
    if exported is not None:
        return exported.recomputes
    return ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first").recompute


def for_workspace(ws: Workspace, profile: Profile | None, seq_len: int = 512, batch_size: int = 1,
                  lora_r: int | None = None, targets: list[str] | None = None, backend: str | None = None,
                  train_modules: list[str] | None = None, recompute: bool | None = None, ranks: int = 1,
                  strategy: str = "ddp") -> plan.Plan:
    """The plan of a run on the workspace (what is not given: as prepared, exported or planned)."""
    prep = ws.read(Prepared)
    if prep is None:
        raise EdgeftError(f"workspace {ws.root} is not prepared; run `edgeft prepare MODEL_DIR --out {ws.root}`")
    as_prepared = lora_r is None and targets is None and train_modules is None
    return plan.for_model(
        prep.model_dir, profile, seq_len, batch_size, lora_r or prep.config.lora_r, targets or prep.targets, backend,
        train_modules if train_modules is not None else prep.config.train_modules,
        prep.config.base_precision or "fp32", recomputes(ws) if recompute is None else recompute,
        trainable=prep.params["trainable"] if as_prepared else None, ranks=ranks, strategy=strategy)
