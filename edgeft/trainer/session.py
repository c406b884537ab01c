"""Open ONNX Runtime training artifacts with the frozen base memory-mapped once for all sessions."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.graph.frozen_base import BASE_DATA, INPUTS_FILE, external_initializers, parse_tile_input, view
from edgeft.graph.recompute import PREFIX as RECOMPUTE_PREFIX


@dataclass
class Opened:
    module: object
    state: object
    # OrtValue.ortvalue_from_numpy does not copy: the arrays (and the map under them) must outlive the sessions.
    keep_alive: list = field(default_factory=list)
    detached: dict = field(default_factory=dict)
    base_inputs: dict = field(default_factory=dict)  # quantized frozen weights, fed from the mapped base.data

    def inputs(self, batch: dict) -> list:
        """The module's inputs in its order, as OrtValues over the arrays (no copies): the batch, detached
        copies of parameters (see detach.py) and the quantized base's weights. Numpy inputs would make the
        training API copy every one of them, the whole quantized base included, on every step."""
        from onnxruntime import OrtValue

        feeds = []
        for name in self.module.input_names():
            if name in batch:
                feeds.append(OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch[name])))
            elif name in self.detached:
                data = np.ascontiguousarray(self.state.parameters[self.detached[name]].data)
                feeds.append(OrtValue.ortvalue_from_numpy(data))
            elif name in self.base_inputs:
                feeds.append(self.base_inputs[name])
            else:
                raise KeyError(f"no value for model input {name!r}")
        return feeds

    def __call__(self, batch: dict) -> list[np.ndarray]:
        """One step of the module in its current mode (train or eval); its outputs as arrays."""
        outputs = self.module(*self.inputs(batch))
        return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


def open_module(artifacts: Path, checkpoint: Path | None = None, device: str = "cpu") -> Opened:
    """Training and eval sessions over one memory map of base.data: its initializers are handed to the
    sessions (`add_initializer`), and a quantized base's weights are fed as inputs from the same map."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module

    artifacts = Path(artifacts)
    options = ort.SessionOptions()
    keep: list = []
    inputs_file = artifacts / INPUTS_FILE
    info = json.loads(inputs_file.read_text()) if inputs_file.exists() else {}
    base_inputs = {}
    graph = onnx.load(str(artifacts / "training_model.onnx"), load_external_data=False)
    recomputed = any(n.name.startswith(RECOMPUTE_PREFIX) for n in graph.graph.node)
    if (artifacts / BASE_DATA).exists():
        mapped = np.memmap(artifacts / BASE_DATA, dtype=np.uint8, mode="r")
        keep.append(mapped)
        for name, dtype, shape, offset in external_initializers(graph):
            array = view(mapped, dtype, shape, offset)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(name, value)
            keep.extend((array, value))
        arrays = {name: view(mapped, spec["dtype"], spec["shape"], spec["offset"])
                  for name, spec in info.get("base_inputs", {}).items()}
        for name, array in arrays.items():
            base_inputs[name] = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append(array)
    if base_inputs:
        evaluation = onnx.load(str(artifacts / "eval_model.onnx"), load_external_data=False)
        for name in {i.name for g in (graph, evaluation) for i in g.graph.input}:
            parsed = parse_tile_input(name)
            if parsed and parsed[0] in arrays:  # a tile of a weight's rows (frozen_base.tiles): a view, no copy
                base, first, end = parsed
                array = arrays[base][first:end]
                base_inputs[name] = ort.OrtValue.ortvalue_from_numpy(array)
                keep.append(array)
    if base_inputs or recomputed:
        # Each base weight is dequantized just before its use and freed after (frozen_base.dequantize_at_use),
        # and each layer's activations live through one layer of the backward pass (recompute.py). ONNX Runtime's
        # buffer reuse would chain same-shaped tensors into buffers that live the whole step (measured on a
        # real-width slice, int4 base, 1 x 256 tokens: 3.0 GB with reuse, 1.7 GB without), so it is off. The CPU
        # arena stays on: with weights dequantized a tile at a time (at most 24 MiB) its freed blocks fit the next
        # tile, where without it every such buffer is fresh pages from the kernel (same slice, recomputed: 2.7
        # million page faults and 5 s of system time a step; 9.5 s a step against 5.4 s with the arena, peak
        # 1341 vs 1326 MiB). One arena for the training, eval and optimizer sessions: each of their own would keep
        # its own peak (same slice, a training step then an eval pass: 1405 MiB, shared 1170 MiB).
        options.enable_mem_reuse = False
        options.add_session_config_entry("session.use_env_allocators", "1")
        share_cpu_arena()
    state = CheckpointState.load_checkpoint(str(checkpoint or artifacts / "checkpoint"))
    module = Module(str(artifacts / "training_model.onnx"), state, str(artifacts / "eval_model.onnx"),
                    device=device, session_options=options)
    return Opened(module, state, keep, info.get("detached", {}), base_inputs)


@functools.cache
def share_cpu_arena() -> None:
    """Register a CPU arena with ONNX Runtime's environment, once per process, for the sessions that ask for it
    (`session.use_env_allocators`)."""
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)
