"""What edgeft asks of a subprocess: one dataclass per entry point, with its arguments typed.

The parent builds a job and hands it to runtime.launcher, which sends the job's class (`module:Class`) on the
command line and its fields as JSON on stdin, once; the child (trainer/child.py) rebuilds the job and calls its
`ENTRY` function with it. The training runtime's side imports this module too, so it needs nothing beyond the
standard library.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Job:
    ENTRY: ClassVar[str] = ""  # "module:function", called with the job
    RUNTIME: ClassVar[str] = "training"  # the ONNX Runtime training build's side; "main": the main environment

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @property
    def name(self) -> str:
        """`module:Class`, as the child finds the job's class again."""
        return f"{type(self).__module__}:{type(self).__name__}"

    @staticmethod
    def load(name: str, text: str) -> Job:
        module, _, cls = name.partition(":")
        job_type = getattr(importlib.import_module(module), cls)
        return job_type(**json.loads(text or "{}"))

    @property
    def side(self) -> str:
        """Where the job runs: "training" (the ONNX Runtime training build first on the path) or "main"."""
        return self.RUNTIME

    def call(self) -> Any:
        module, _, function = self.ENTRY.partition(":")
        return getattr(importlib.import_module(module), function)(self)


@dataclass(frozen=True)
class GenerateArtifacts(Job):
    """generate_artifacts on the slim training graph, then edgeft's rewrites (recomputation, dequantize at use)."""

    ENTRY: ClassVar[str] = "edgeft.trainer.artifacts:generate"
    model: str
    out: str
    requires_grad: list[str]
    recompute: bool
    data_inputs: list[str]
    tile_bytes: int  # frozen_base.dequantize_at_use: export's --tile-mb
    nominal_checkpoint: bool = False
    ort_format: bool = False
    # the optimizer graph shipped is the one a run with train's defaults (TrainConfig) runs: no weight decay,
    # the gradient norm clipped at 1 (a run with other values builds its own, ort_engine.optimizer_for)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


@dataclass(frozen=True)
class Verify(Job):
    """The training runtime's losses on a batch (no update); optionally its gradients and eval logits, to files."""

    ENTRY: ClassVar[str] = "edgeft.trainer.artifacts:verify"
    artifacts: str
    batch: str
    checkpoint: str | None = None
    grads_out: str | None = None
    logits_out: str | None = None


@dataclass(frozen=True)
class PromptLogits(Job):
    """The eval model's logits at each prompt's last position, with a trained checkpoint."""

    ENTRY: ClassVar[str] = "edgeft.trainer.artifacts:prompt_logits"
    artifacts: str
    checkpoint: str
    prompts: list[list[int]]
    out: str


@dataclass(frozen=True)
class Steps(Job):
    """A few updates on one batch with the shipped optimizer model, as an app would load the artifacts."""

    ENTRY: ClassVar[str] = "edgeft.trainer.artifacts:steps"
    artifacts: str
    batch: str
    steps: int = 1
    lr: float = 1e-3


@dataclass(frozen=True)
class ReadTrained(Job):
    """The trainable tensors of an ORT checkpoint, to an .npz."""

    ENTRY: ClassVar[str] = "edgeft.trainer.ort_engine:read_trained"
    checkpoint: str
    out: str


@dataclass(frozen=True)
class WriteTrained(Job):
    """An ORT checkpoint of the artifacts' model holding the trainable tensors of an .npz."""

    ENTRY: ClassVar[str] = "edgeft.trainer.ort_engine:write_trained"
    artifacts: str
    weights: str
    out: str


@dataclass(frozen=True)
class Train(Job):
    """The training loop (trainer/loop.py) with one engine: ort_engine in the training runtime, or torch_engine in
    the main environment (`RUNTIME` of TorchTrain)."""

    ENTRY: ClassVar[str] = "edgeft.trainer.ort_engine:main"
    config: dict  # TrainConfig's fields, with base_quant and recompute
    dataset: str
    pad_token_id: int
    checkpoints: str
    options: dict
    identity: str
    data_key: str
    config_hash: str
    artifacts: str
    work: str
    model_dir: str
    adapter_init: str
    device: str = "cpu"
    resume_state: dict | None = None
    resume_path: str | None = None
    # A fleet client's round (fleet/client.py): start from `weights_in` (an .npz of the trainable tensors, the
    # round's global adapter) with a fresh optimizer; `mode` "train" runs the steps without evaluation or
    # checkpoints and writes the trained tensors to `weights_out`; "evaluate" reports the validation loss of
    # `weights_in`; "weights" only writes the starting tensors (the adapter's initial values) to `weights_out`.
    weights_in: str | None = None
    weights_out: str | None = None
    mode: str | None = None


@dataclass(frozen=True)
class TorchTrain(Train):
    ENTRY: ClassVar[str] = "edgeft.trainer.torch_engine:main"
    RUNTIME: ClassVar[str] = "main"
    program: str | None = None  # a device's run: the exported program instead of model_dir (ExportProgram)


@dataclass(frozen=True)
class ExportProgram(Job):
    """The workspace's loss module as a torch.export program, for a device without transformers."""

    ENTRY: ClassVar[str] = "edgeft.trainer.torch_engine:export_program"
    RUNTIME: ClassVar[str] = "main"
    model_dir: str
    adapter_init: str
    base_quant: dict
    dataset: str
    pad_token_id: int
    seq_len: int
    out: str


@dataclass(frozen=True)
class BenchTraining(Job):
    """Timed training steps of either engine on full-length batches."""

    ENTRY: ClassVar[str] = "edgeft.trainer.bench:main"
    backend: str
    batch_size: int
    seq_len: int
    runs: int
    tokens: str
    artifacts: str
    model_dir: str
    adapter_init: str
    base_quant: dict = field(default_factory=dict)
    recompute: bool = False
    device: str = "cpu"

    @property
    def side(self) -> str:
        return "training" if self.backend == "ort" else "main"


@dataclass(frozen=True)
class BenchInference(Job):
    """onnxruntime-genai prefill and decode in a process of their own, so that its peak RSS is the app's."""

    ENTRY: ClassVar[str] = "edgeft.stages.bench:genai_child"
    RUNTIME: ClassVar[str] = "main"
    bundle: str
    prompt: list[int]
    new_tokens: int
    runs: int
    adapter: str | None = None


@dataclass(frozen=True)
class Info(Job):
    """Which onnxruntime the training runtime imports, and its providers (doctor)."""

    ENTRY: ClassVar[str] = "edgeft.trainer.info:main"
