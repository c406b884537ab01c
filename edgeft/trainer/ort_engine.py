"""The ONNX Runtime engine of the training loop (runs inside the training runtime)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgeft.runtime import jobs
from edgeft.trainer import events, loop
from edgeft.trainer.session import open_module

CHECKPOINT = "ort_checkpoint"


def build_optimizer(state, out: Path, weight_decay: float, max_grad_norm: float | None) -> Path:
    """The AdamW graph for this run: weight decay and clipping are attributes of the graph in ORT 1.19."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.training import onnxblock

    params = [numpy_helper.from_array(np.asarray(p.data), name) for name, p in state.parameters if p.requires_grad]
    block = onnxblock.optim.AdamW(weight_decay=weight_decay)
    with onnxblock.empty_base(opset_version=17):
        block((params, []))
        model = block.to_model_proto()
    onnx.save(adamw_as_trained(model, weight_decay, max_grad_norm), str(out))
    return out


def adamw_as_trained(optimizer_model, weight_decay: float, max_grad_norm: float | None):
    """An onnxblock AdamW graph as training runs it: torch's AdamW, this weight decay, clipped in a fixed order."""
    model = torch_adamw(optimizer_model)
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "weight_decay":
                    attr.f = weight_decay
    return clip_in_fixed_order(model, max_grad_norm) if max_grad_norm else model


def optimizer_settings(path: Path) -> dict:
    """weight_decay and max_grad_norm (None: no clipping) of an AdamW graph `adamw_as_trained` made."""
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx.load(str(path)).graph
    adamw = next(n for n in graph.node if n.op_type == "AdamWOptimizer")
    attrs = {a.name: helper.get_attribute_value(a) for a in adamw.attribute}
    clip = next((n for n in graph.node if n.output[0] == "clip.max_norm"), None)
    return {"weight_decay": float(attrs.get("weight_decay", 0.0)), "adam_mode": attrs.get("adam_mode"),
            "max_grad_norm": float(numpy_helper.to_array(clip.attribute[0].t)) if clip is not None else None}


def optimizer_for(artifacts: Path, work: Path, weight_decay: float, max_grad_norm: float | None):
    """The artifacts' optimizer graph where it is this run's (train's defaults), else a builder of this run's (in
    `work`, from the checkpoint state): training runs the graph shipped whenever the options allow."""
    import numpy as np

    shipped = Path(artifacts) / "optimizer_model.onnx"
    if shipped.is_file():
        have = optimizer_settings(shipped)
        want = {"weight_decay": float(np.float32(weight_decay)), "adam_mode": 0,
                "max_grad_norm": float(np.float32(max_grad_norm)) if max_grad_norm else None}
        if have == want:
            return shipped
    return lambda state: build_optimizer(state, Path(work) / "optimizer_model.onnx", weight_decay, max_grad_norm)


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


def clip_in_fixed_order(optimizer_model, max_norm: float):
    """Clip the gradients to a total L2 norm of `max_norm` (as torch's clip_grad_norm_), before AdamW.

    onnxblock's ClipGradNorm (InplaceClipGradNorm) adds the tensors' squared norms up in the order of the
    gradient sequence, which ONNX Runtime builds by walking a hash map of the parameters
    (training_api/optimizer.cc); that order changes from one session to the next (measured: 3 different
    results from 6 sessions on the same batches). The float32 sum then differs in its last bit, and whenever
    clipping is active the run drifts: the demo gave 83.3 to 85.3 % exact match with one seed, and a resumed
    run need not end bit-equal to an uninterrupted one. Here the squared norms are sorted before they are
    added (`clip_nodes`), so the result does not depend on the order."""
    graph = optimizer_model.graph
    adamw = next(n for n in graph.node if n.op_type == "AdamWOptimizer")
    nodes, adamw.input[3] = clip_nodes(adamw.input[3], max_norm)
    position = list(graph.node).index(adamw)
    for node in reversed(nodes):
        graph.node.insert(position, node)
    return optimizer_model


def clip_nodes(gradients: str, max_norm: float, eps: float = 1e-6) -> tuple[list, str]:
    """Nodes that scale the tensor sequence `gradients` by min(1, max_norm / (norm + eps)); and the name of the
    scaled sequence. The squared norms are added smallest first: one order whatever the sequence's, and the
    one that loses the least of the small ones."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info("g", TensorProto.FLOAT, None)
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [])  # noqa: E731
    squared = helper.make_graph([helper.make_node("ReduceSumSquare", ["g"], ["s"], keepdims=0)],
                                "squared_norm", [tensor], [scalar("s")])
    scaled = helper.make_graph([helper.make_node("Mul", ["g", "c"], ["y"])], "scale", [tensor, scalar("c")],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    return [
        helper.make_node("SequenceMap", [gradients], ["clip.squares"], body=squared),
        helper.make_node("ConcatFromSequence", ["clip.squares"], ["clip.stacked"], axis=0, new_axis=1),
        helper.make_node("Shape", ["clip.stacked"], ["clip.count"]),
        helper.make_node("TopK", ["clip.stacked", "clip.count"], ["clip.sorted", "clip.order"], largest=0),
        helper.make_node("ReduceSum", ["clip.sorted"], ["clip.total"], keepdims=0),
        helper.make_node("Sqrt", ["clip.total"], ["clip.norm"]),
        const("clip.max_norm", max_norm), const("clip.eps", eps), const("clip.one", 1.0),
        helper.make_node("Add", ["clip.norm", "clip.eps"], ["clip.norm_eps"]),
        helper.make_node("Div", ["clip.max_norm", "clip.norm_eps"], ["clip.ratio"]),
        helper.make_node("Min", ["clip.ratio", "clip.one"], ["clip.coef"]),
        helper.make_node("SequenceMap", [gradients, "clip.coef"], ["clip.gradients"], body=scaled),
    ], "clip.gradients"


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

    def grad_norm(self) -> float:
        """L2 norm of the accumulated gradients (before clipping), summed in a fixed order."""
        squares = sorted(float(np.sum(np.square(np.asarray(p.grad, dtype=np.float64))))
                         for _, p in self.opened.state.parameters if p.requires_grad)
        return math.sqrt(math.fsum(squares))

    @staticmethod
    def memory() -> dict:
        return {}  # the process's RSS is its memory (ORT's CUDA arena is not reported)

    def finite(self) -> bool:
        """Whether every trained value is finite (checked before a checkpoint is written)."""
        return all(np.isfinite(np.asarray(p.data)).all() for _, p in self.opened.state.parameters if p.requires_grad)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: np.array(p.data) for name, p in self.opened.state.parameters if p.requires_grad}

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        for name, p in self.opened.state.parameters:
            if p.requires_grad:
                p.data = np.ascontiguousarray(arrays[name], dtype=np.float32)

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


def main(job: jobs.Train) -> dict:
    import onnxruntime

    onnxruntime.set_seed(int(job.config["seed"]))
    resume = Path(job.resume_path) / CHECKPOINT if job.resume_path else None
    work = Path(job.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = job.config

    optimizer = optimizer_for(Path(job.artifacts), work, cfg["weight_decay"], cfg["max_grad_norm"])
    engine = OrtEngine(Path(job.artifacts), optimizer, resume, job.device)
    events.log(f"ONNX Runtime {onnxruntime.__version__} engine ready, optimizer graph: " +
               ("the artifacts' (train's defaults)" if isinstance(optimizer, Path) else
                f"built for weight decay {cfg['weight_decay']}, clipping at {cfg['max_grad_norm']}"))
    return loop.train(engine, job)


def read_trained(job: jobs.ReadTrained) -> dict:
    """Write the trainable tensors of an ORT checkpoint to an .npz (names as in the training graph)."""
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(job.checkpoint)
    tensors = {name: np.asarray(p.data) for name, p in state.parameters if p.requires_grad}
    np.savez(job.out, **tensors)
    return {"tensors": len(tensors)}


def write_trained(job: jobs.WriteTrained) -> dict:
    """An ORT checkpoint (no optimizer state) of the artifacts' model with the trainable tensors of an .npz: a
    fleet's global adapter, as merge and package read a trained one. The parameters are set through a training
    module over the state (ORT 1.19 crashes on setting them in a bare CheckpointState)."""
    from onnxruntime.training.api import CheckpointState

    opened = open_module(Path(job.artifacts))
    with np.load(job.weights, allow_pickle=False) as arrays:
        for name, p in opened.state.parameters:
            if p.requires_grad:
                p.data = np.ascontiguousarray(arrays[name], dtype=np.float32)
    CheckpointState.save_checkpoint(opened.state, job.out, include_optimizer_state=False)
    return {}
