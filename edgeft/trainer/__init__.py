"""The training loop and its two engines (ONNX Runtime training, PEFT + torch), and the code that runs inside
the ONNX Runtime training build (a subprocess; see `edgeft.runtime.launcher`).

Nothing here may import onnxruntime_genai, and nothing outside this package may import
onnxruntime.training. This package is also what runs on an edge box: it reads only an artifacts
folder and pre-tokenized arrays.
"""
