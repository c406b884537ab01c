"""Open ONNX Runtime training artifacts with the frozen base memory-mapped once for all sessions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.base_weights import BASE_DATA, external_initializers

INPUTS_FILE = "edgeft_inputs.json"


@dataclass
class Opened:
    module: object
    state: object
    # OrtValue.ortvalue_from_numpy does not copy: the arrays (and the map under them) must outlive the sessions.
    keep_alive: list = field(default_factory=list)
    detached: dict = field(default_factory=dict)
    base_inputs: dict = field(default_factory=dict)  # quantized frozen weights, fed from the mapped base.data

    def inputs(self, batch: dict) -> list:
        """The module's inputs in its order: batch arrays, plus detached copies of parameters (see detach.py)."""
        feeds = []
        for name in self.module.input_names():
            if name in batch:
                feeds.append(batch[name])
            elif name in self.detached:
                feeds.append(np.ascontiguousarray(self.state.parameters[self.detached[name]].data))
            elif name in self.base_inputs:
                feeds.append(self.base_inputs[name])
            else:
                raise KeyError(f"no value for model input {name!r}")
        return feeds


def session_options_with_base(artifacts: Path, graph_path: Path):
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    order = os.environ.get("EDGEFT_EXECUTION_ORDER")  # experiment hook: DEFAULT, MEMORY_EFFICIENT, PRIORITY_BASED
    if order:
        options.execution_order = getattr(ort.ExecutionOrder, order)
    keep: list = []
    base = artifacts / BASE_DATA
    if not base.exists():
        return options, keep
    mapped = np.memmap(base, dtype=np.uint8, mode="r")
    keep.append(mapped)
    model = onnx.load(str(graph_path), load_external_data=False)
    for name, dtype, shape, offset in external_initializers(model):
        count = int(np.prod(shape)) if shape else 1
        array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        keep.extend((array, value))
    return options, keep


def open_module(artifacts: Path, checkpoint: Path | None = None, device: str = "cpu") -> Opened:
    from onnxruntime.training.api import CheckpointState, Module

    artifacts = Path(artifacts)
    options, keep = session_options_with_base(artifacts, artifacts / "training_model.onnx")
    state = CheckpointState.load_checkpoint(str(checkpoint or artifacts / "checkpoint"))
    module = Module(str(artifacts / "training_model.onnx"), state, str(artifacts / "eval_model.onnx"),
                    device=device, session_options=options)
    inputs_file = artifacts / INPUTS_FILE
    info = json.loads(inputs_file.read_text()) if inputs_file.exists() else {}
    base_inputs = {}
    if info.get("base_inputs"):
        mapped = np.memmap(artifacts / BASE_DATA, dtype=np.uint8, mode="r")
        keep.append(mapped)
        for name, spec in info["base_inputs"].items():
            count = int(np.prod(spec["shape"]))
            base_inputs[name] = np.frombuffer(mapped, dtype=spec["dtype"], count=count,
                                              offset=spec["offset"]).reshape(spec["shape"])
    return Opened(module, state, keep, info.get("detached", {}), base_inputs)
