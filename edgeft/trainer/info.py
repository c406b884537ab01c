"""Reports what the training runtime is, from inside it (for `doctor` and the launcher test)."""

from __future__ import annotations

import sys


def main(job) -> dict:
    import onnx
    import onnxruntime

    info = {
        "python": sys.version.split()[0],
        "onnxruntime_version": onnxruntime.__version__,
        "onnxruntime_path": onnxruntime.__file__,
        "onnx_version": onnx.__version__,
        "providers": onnxruntime.get_available_providers(),
        "training_importable": False,
        "genai_loaded": "onnxruntime_genai" in sys.modules,
    }
    # onnxruntime.training imports torch (training/optim/_modifier.py), so this also proves the
    # subprocess sees the main environment's torch.
    from onnxruntime.training import artifacts  # noqa: F401
    from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: F401

    info["training_importable"] = True
    return info
