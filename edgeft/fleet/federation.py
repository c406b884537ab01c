"""What a fleet's devices need to train a round, written once as JSON: the engine and its artifacts, the local
training options and, per device, its tokenized data. In a simulation one file holds every device; a device of a
deployed fleet holds its own (`clients` of one), made on the workstation by `edgeft fleet node`.

It names only files and plain options, so the device side reads it with the standard library and numpy: no
tokenizer, no transformers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edgeft.core import atomic, schema, state
from edgeft.core.schema import spec


@dataclass(frozen=True)
class Device:
    dataset: str = spec("the device's tokenized data (train.npz, val.npz)")
    data_key: str = spec("their cache key")
    pad_token_id: int = spec("padding token")
    samples: int = spec("training samples (the device's weight in the average)", min=0)


@dataclass(frozen=True)
class Federation:
    backend: str = spec("ort or torch", choices=("ort", "torch"))
    artifacts: str = spec("ONNX Runtime training artifacts")
    model_dir: str = spec("the base model (torch backend)")
    adapter_init: str = spec("the freshly initialised adapter (torch backend)")
    identity: str = spec("the key of what is trained: the export (ort) or the prepared workspace (torch)")
    train: dict = spec("the local training options (a train job's config)")
    rounds: int = spec("rounds of the whole run (the learning-rate schedule spans them)", min=1)
    local_steps: int = spec("optimizer steps per round", min=1)
    seed: int = spec("seed of the devices' data order")
    work: str = spec("where a device writes its round files")
    devices: list[Device] = spec("each device's data, by partition id")
    ep: str = spec("execution provider of the ort backend", "cpu")

    def save(self, path: Path) -> Path:
        return atomic.write_json(path, schema.to_dict(self, keep_none=True))

    @classmethod
    def load(cls, path: Path) -> Federation:
        """The federation a file holds; its relative paths are relative to the file (a node's folder travels)."""
        path = Path(path)
        data = state.read_json(path, "the fleet's federation file", "run `edgeft fleet sim` (or `edgeft fleet "
                               "node`) again to write it", keys=("backend", "devices"))
        fed = schema.parse(cls, data, f"federation file {path}")

        def here(value: str) -> str:
            return value if Path(value).is_absolute() else str((path.parent / value).resolve())

        return dataclasses.replace(
            fed, artifacts=here(fed.artifacts), model_dir=here(fed.model_dir), adapter_init=here(fed.adapter_init),
            work=here(fed.work), devices=[dataclasses.replace(d, dataset=here(d.dataset)) for d in fed.devices])

    def with_devices(self, devices: list[Device]) -> Federation:
        return dataclasses.replace(self, devices=devices)


def round_seed(seed: int, server_round: int, device: int) -> int:
    """The data-order seed of one device in one round: every (round, device) draws its own batches."""
    return (seed * 1_000_003 + server_round * 10_007 + device) % (2**31 - 1)


def dumps(fed: Federation) -> str:
    return json.dumps(schema.to_dict(fed, keep_none=True), sort_keys=True)
