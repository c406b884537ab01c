"""edgeft: fine-tune small language models on and for edge devices with ONNX Runtime."""

__version__ = "0.1.0"
