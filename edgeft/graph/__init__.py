"""ONNX graphs: the causal-LM loss traced to ONNX, the frozen base moved into base.data (quantized, dequantized
at each use), recomputed activations, detached DoRA norms, and the LoRA branches of a bundle as swappable
adapters. Imports `core`, `models` and `quant`; the training runtime's side (`trainer`) reads these graphs."""
