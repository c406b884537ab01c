"""Swappable adapters for onnxruntime-genai: a base model whose LoRA weights are inputs, plus `.onnx_adapter` files.

The GenAI builder, given `adapter_path=<PEFT folder>`, emits each adapted projection as the base MatMul
plus a LoRA_A -> LoRA_B MatMul branch whose weights are initializers (B pre-multiplied by alpha / r).
Here those initializers become graph inputs with empty defaults (rank 0: the branch adds zeros, so the
bundle without an active adapter is the base model), and their values go to an `.onnx_adapter` file
(`onnxruntime.AdapterFormat`) that `og.Adapters(model).load(...)` + `generator.set_active_adapter(...)`
switch at run time. The LoRA MatMuls are kept out of int4 quantization (`nodes_to_exclude`): adapters stay
float, the base is quantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LORA_MARKERS = (".lora_A.", ".lora_B.")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "dense", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj", "fc1", "fc2")


def lora_node_names(num_layers: int) -> list[str]:
    """Every name the builder can give a LoRA MatMul node (excluded from weight quantization)."""
    return [f"/model/layers.{i}/{block}/{proj}/lora_{ab}/MatMul" for i in range(num_layers)
            for block in ("attn", "mlp") for proj in PROJECTIONS for ab in "AB"]


def extract(model_path: Path) -> dict[str, np.ndarray]:
    """Turn the LoRA initializers of a builder model into inputs with empty defaults; return their values."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    values: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if not any(m in init.name for m in LORA_MARKERS):
            continue
        if uses_external_data(init):
            load_external_data_for_tensor(init, str(model_path.parent))
        array = numpy_helper.to_array(init)
        values[init.name] = array.copy()
        rows, cols = array.shape
        is_a = ".lora_A." in init.name
        empty = np.zeros((rows, 0) if is_a else (0, cols), dtype=array.dtype)
        init.CopyFrom(numpy_helper.from_array(empty, init.name))
        dims = [rows, "lora_rank"] if is_a else ["lora_rank", cols]
        graph.input.append(helper.make_tensor_value_info(init.name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                         dims))
    if not values:
        raise ValueError(f"{model_path} has no LoRA initializers; was it built with adapter_path?")
    onnx.save(model, str(model_path))
    return values


def write(values: dict[str, np.ndarray], path: Path, model_version: int = 1) -> Path:
    """An `.onnx_adapter` file. OrtValue.ortvalue_from_numpy does not copy: `arrays` keeps them alive."""
    import onnxruntime as ort

    arrays = {name: np.ascontiguousarray(v) for name, v in values.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(model_version)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
    adapter.export_adapter(str(path))
    del arrays
    return path
