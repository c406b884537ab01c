"""The ONNX Runtime engine of the training loop (runs inside the training runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.trainer import events, loop
from edgeft.trainer.session import open_module

CHECKPOINT = "ort_checkpoint"


def build_optimizer(state, out: Path, weight_decay: float, max_grad_norm: float | None) -> Path:
    """The AdamW graph for this run: weight decay and clipping are attributes of the graph in ORT 1.19."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.training import onnxblock

    params = [numpy_helper.from_array(np.asarray(p.data), name) for name, p in state.parameters if p.requires_grad]
    clip = onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm else None
    block = onnxblock.optim.AdamW(weight_decay=weight_decay, clip_grad=clip)
    with onnxblock.empty_base(opset_version=17):
        block((params, []))
        model = block.to_model_proto()
    onnx.save(torch_adamw(model), str(out))
    return out


def torch_adamw(optimizer_model):
    """Make the AdamW graph torch.optim.AdamW's. onnxblock asks for Hugging Face's (adam_mode 1: eps added
    before the bias correction, an effective eps of eps / sqrt(1 - beta2^t), 3e-5 at step 1), which moved
    ORT's trajectory up to 1.4 % off the torch backend's within 10 steps at lr 1e-2; with mode 0 (torch's)
    the two agree to 5e-7."""
    for node in optimizer_model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0
    return optimizer_model


class OrtEngine:
    """`optimizer`: an AdamW graph, or a callable that builds one from the checkpoint state."""

    def __init__(self, artifacts: Path, optimizer, checkpoint: Path | None = None, device: str = "cpu"):
        from onnxruntime.training.api import Optimizer

        self.opened = open_module(artifacts, checkpoint, device)
        self.module = self.opened.module
        path = optimizer(self.opened.state) if callable(optimizer) else optimizer
        self.optimizer = Optimizer(str(path), self.module)
        self._train_mode = None

    def _mode(self, train: bool) -> None:
        if self._train_mode is not train:
            self.module.train() if train else self.module.eval()
            self._train_mode = train

    def forward_backward(self, batch: dict) -> float:
        self._mode(True)
        return float(self.opened(batch)[0])

    def step(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def eval_loss(self, batch: dict) -> float:
        self._mode(False)
        return float(self.opened(batch)[0])

    def save(self, folder: Path) -> None:
        from onnxruntime.training.api import CheckpointState

        CheckpointState.save_checkpoint(self.opened.state, str(Path(folder) / CHECKPOINT), include_optimizer_state=True)


def main(args: dict) -> dict:
    import onnxruntime

    onnxruntime.set_seed(int(args["config"]["seed"]))
    resume = Path(args["resume_path"]) / CHECKPOINT if args.get("resume_path") else None
    work = Path(args["work"])
    work.mkdir(parents=True, exist_ok=True)
    cfg = args["config"]

    def optimizer(state) -> Path:
        return build_optimizer(state, work / "optimizer_model.onnx", cfg["weight_decay"], cfg["max_grad_norm"])

    engine = OrtEngine(Path(args["artifacts"]), optimizer, resume, args.get("device", "cpu"))
    events.log(f"ONNX Runtime {onnxruntime.__version__} engine ready")
    return loop.run(engine, args)


def read_trained(args: dict) -> dict:
    """Write the trainable tensors of an ORT checkpoint to an .npz (names as in the training graph)."""
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(args["checkpoint"]))
    tensors = {name: np.asarray(p.data) for name, p in state.parameters if p.requires_grad}
    np.savez(args["out"], **tensors)
    return {"tensors": len(tensors)}
