"""The PyTorch engine of the training loop: PEFT + torch AdamW, the reference for parity and the
fallback where the training runtime cannot be installed (Linux aarch64). Runs in a subprocess of the
main environment, so its memory is measured like the ONNX Runtime engine's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edgeft.graph.trace import INPUT_NAMES, CausalLMLoss
from edgeft.runtime import jobs
from edgeft.trainer import events, loop

ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.pt"


class TorchEngine:
    def __init__(self, model_dir: Path, adapter_init: Path, cfg: dict, resume: Path | None = None):
        from edgeft.quant import torch_linear

        torch.manual_seed(int(cfg["seed"]))
        model = torch_linear.load(model_dir, adapter_init, cfg.get("base_quant", {"precision": "fp32"}))
        if cfg.get("recompute"):  # one decoder layer's activations at a time, recomputed in the backward pass
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.wrapper = CausalLMLoss(model, logits=False)  # the loss alone: no head over unlabelled positions
        self.params = {n: p for n, p in self.wrapper.named_parameters() if p.requires_grad}
        # ORT 1.19's AdamW uses eps 1e-6 (onnxblock default); the same here keeps the two comparable.
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-6,
                                           weight_decay=cfg["weight_decay"])
        self.max_grad_norm = cfg["max_grad_norm"]
        self.proximal_mu = float(cfg.get("proximal_mu") or 0.0)  # FedProx: pulls a fleet round toward its start
        self.anchor: dict[str, torch.Tensor] = {}
        if resume is not None:
            weights = load_file(resume / ADAPTER)
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(weights[name])
            self.optimizer.load_state_dict(torch.load(resume / OPTIMIZER, weights_only=True))

    @staticmethod
    def _tensors(batch: dict):
        return [torch.from_numpy(np.ascontiguousarray(batch[k])) for k in INPUT_NAMES]

    def forward_backward(self, batch: dict) -> float:
        self.wrapper.train()
        loss = self.wrapper(*self._tensors(batch))[0]
        loss.backward()
        return float(loss.detach())

    def grad_norm(self) -> float:
        """L2 norm of the accumulated gradients (before clipping)."""
        norms = [torch.linalg.vector_norm(p.grad) for p in self.params.values() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def finite(self) -> bool:
        """Whether every trained value is finite (checked before a checkpoint is written)."""
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in self.params.items()}

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)))
        if self.proximal_mu:
            self.anchor = {name: p.detach().clone() for name, p in self.params.items()}

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name, p in self.params.items():  # the gradient of mu/2 * |w - w_round_start|^2 (FedProx)
            if name in self.anchor and p.grad is not None:
                p.grad.add_(p.detach() - self.anchor[name], alpha=self.proximal_mu)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_loss(self, batch: dict) -> float:
        self.wrapper.eval()
        with torch.no_grad():
            return float(self.wrapper(*self._tensors(batch))[0])

    def save(self, folder: Path) -> None:
        save_file({n: p.detach().contiguous() for n, p in self.params.items()}, str(Path(folder) / ADAPTER))
        torch.save(self.optimizer.state_dict(), Path(folder) / OPTIMIZER)


def main(job: jobs.TorchTrain) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    resume = Path(job.resume_path) if job.resume_path else None
    engine = TorchEngine(Path(job.model_dir), Path(job.adapter_init), job.config, resume)
    events.log(f"PyTorch {torch.__version__} engine ready")
    return loop.train(engine, job)
