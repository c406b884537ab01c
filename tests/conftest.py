import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Build tiny model folders on demand, once per family per session."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny_models.build(name, root / name)
        return built[name]

    return get


STAGES = ("prepared", "exported", "trained", "merged")
TRAIN = {"max_steps": 4, "batch_size": 4, "seq_len": 256, "lr": 1e-2}  # the default run of a `trained` workspace


@pytest.fixture(scope="session")
def built(tiny_model, tmp_path_factory):
    """Workspaces of the tiny models at a stage, each built once a session for its family and options, every stage
    from a copy of the one before: `built("merged", lora_r=8)`, `built("exported", base_precision="int4",
    export={"recompute": True})`, `built("trained", train={"backend": "torch"})` (train options on top of TRAIN).
    Shared: copy one (helpers.copy_workspace) before changing it."""
    import json
    import shutil

    from edgeft.stages.export import ExportConfig, export
    from edgeft.stages.merge import merge
    from edgeft.stages.prepare import PrepareConfig, prepare
    from edgeft.stages.train import TrainConfig, train
    from tests.helpers import DATA

    cache: dict[str, Path] = {}

    def get(stage: str, family: str = "phi3-mini-4k", export_options: dict | None = None,
            train_options: dict | None = None, **prepare_options) -> Path:
        steps = STAGES[: STAGES.index(stage) + 1]
        key = json.dumps([steps, family, export_options, train_options, prepare_options], sort_keys=True)
        if key in cache:
            return cache[key]
        ws = tmp_path_factory.mktemp(stage) / "ws"
        if stage == "prepared":
            prepare(PrepareConfig(model_dir=str(tiny_model(family)), **prepare_options), ws)
        else:
            shutil.copytree(get(steps[-2], family, export_options, train_options, **prepare_options), ws)
            if stage == "exported":
                export(ws, ExportConfig(**(export_options or {})))
            elif stage == "trained":
                train(ws, DATA, TrainConfig(**{**TRAIN, **(train_options or {})}))
            else:
                merge(ws)
        cache[key] = ws
        return ws

    return get


@pytest.fixture(scope="session")
def exported(built):
    """A tiny Phi-3 workspace, prepared (LoRA r8) and exported: what the training tests start from."""
    return built("exported", lora_r=8)
