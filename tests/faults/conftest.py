"""Fixtures for the fault tests: a tiny Phi-3 workspace at each stage, built once, and copies to damage."""

import shutil
from pathlib import Path

import pytest

from edgeft.tasks.home import DATA_DIR

DATA = DATA_DIR / "train.jsonl"


@pytest.fixture(scope="session")
def model(tiny_model) -> Path:
    return tiny_model("phi3-mini-4k")


@pytest.fixture(scope="session")
def stage_workspaces(model, tmp_path_factory) -> dict[str, Path]:
    """One workspace per stage reached, each a copy of the one before: prepared, exported, trained (4 steps,
    checkpoints at every step, the last two and the best kept), packaged (merged, then the int4 base with the
    trained adapter as a swappable .onnx_adapter)."""
    from edgeft.stages.export import export
    from edgeft.stages.merge import merge
    from edgeft.stages.package.stage import PackageConfig, package
    from edgeft.stages.prepare import PrepareConfig, prepare
    from edgeft.stages.train import TrainConfig, train

    root = tmp_path_factory.mktemp("stages")
    prepare(PrepareConfig(model_dir=str(model), lora_r=8), root / "prepared")
    shutil.copytree(root / "prepared", root / "exported")
    export(root / "exported")
    shutil.copytree(root / "exported", root / "trained")
    train(root / "trained", DATA, TrainConfig(max_steps=4, batch_size=4, seq_len=128, lr=1e-2, eval_every=2,
                                               save_every=1, keep_last=2))
    shutil.copytree(root / "trained", root / "packaged")
    merge(root / "packaged")
    package(root / "packaged", PackageConfig(adapters=True))
    return {name: root / name for name in ("prepared", "exported", "trained", "packaged")}


@pytest.fixture
def workspace(stage_workspaces, tmp_path):
    """A private copy of the workspace at a stage, to damage: `workspace("trained")`."""
    def copy(stage: str) -> Path:
        dst = tmp_path / stage
        shutil.copytree(stage_workspaces[stage], dst)
        return dst

    return copy
