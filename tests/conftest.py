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


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A tiny Phi-3 workspace, prepared (LoRA r8) and exported: what the training tests start from."""
    from edgeft.stages.export import export
    from edgeft.stages.prepare import PrepareConfig, prepare

    ws = tmp_path_factory.mktemp("ws") / "ws"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8), ws)
    export(ws)
    return ws
