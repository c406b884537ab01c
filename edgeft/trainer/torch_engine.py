"""The PyTorch engine of the training loop: PEFT + torch AdamW, the reference for parity and the
fallback where the training runtime cannot be installed (Linux aarch64). Runs in a subprocess of the
main environment, so its memory is measured like the ONNX Runtime engine's.

It computes on the CPU, or with `--ep cuda` on the GPU of its local rank (the ranks then talk over NCCL). With
`--bf16` the matmuls run in bfloat16 under torch.autocast and a replica's frozen base is held in bf16; the
trained LoRA weights, their gradients and AdamW's state stay fp32, so checkpoints and adapters are fp32 as
without it. (Under zero3 and fsdp the base stays fp32 in its shards, computed in bf16.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edgeft.core import rss
from edgeft.graph.trace import INPUT_NAMES, CausalLMLoss
from edgeft.runtime import jobs
from edgeft.runtime.torchrun import SHARDS_BASE
from edgeft.trainer import events, loop
from edgeft.trainer.distributed import ALONE, World

ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.pt"


class TorchEngine:
    """One process, or a replica of `world` under DistributedDataParallel (strategy "ddp")."""

    world = ALONE

    def __init__(self, model_dir: Path, adapter_init: Path, cfg: dict, resume: dict | None = None,
                 world: World = ALONE):
        from edgeft.models import lazy
        from edgeft.quant import torch_linear

        torch.manual_seed(int(cfg["seed"]))
        self.device = world.device(cfg.get("ep", "cpu"))
        self.bf16 = bool(cfg.get("bf16"))
        model, self.shards = torch_linear.load_lazily(model_dir, adapter_init,
                                                      cfg.get("base_quant", {"precision": "fp32"}))
        if not (world.launched and cfg.get("strategy") in SHARDS_BASE):
            lazy.load_(model, self.shards)  # whole; a strategy sharding the base reads it in parts (load_in_parts)
            if self.bf16:
                for p in model.parameters():
                    if not p.requires_grad and p.is_floating_point():
                        p.data = p.data.to(torch.bfloat16)
            model.to(self.device)
        if cfg.get("recompute"):  # one decoder layer's activations at a time, recomputed in the backward pass
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the loss alone: no head over unlabelled positions
        self.start(CausalLMLoss(model, logits=False), cfg, world, resume)

    def start(self, wrapper: torch.nn.Module, cfg: dict, world: World, resume: dict | None) -> None:
        """Train `wrapper`'s trainable parameters: from `resume` (a checkpoint), wrapped for `world`."""
        self.wrapper = wrapper
        self.params = {n: p for n, p in self.wrapper.named_parameters() if p.requires_grad}
        self.cfg, self.world = cfg, world
        self.max_grad_norm = cfg["max_grad_norm"]
        self.proximal_mu = float(cfg.get("proximal_mu") or 0.0)  # FedProx: pulls a fleet round toward its start
        self.anchor: dict[str, torch.Tensor] = {}
        if resume is not None:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(resume["adapter"][name])
        self.model = self.wrap()
        self.params = {n: p for n, p in self.wrapper.named_parameters() if p.requires_grad}  # as sharding left them
        self.optimizer = self.make_optimizer()
        if resume is not None:
            self.load_optimizer(resume["optimizer"])

    def wrap(self) -> torch.nn.Module:
        """The module that runs forward: the wrapper itself, or a strategy's wrapping of it."""
        if not self.world.launched:
            return self.wrapper
        # the buffers (a quantized base's packed weights) are frozen and equal on every rank: never broadcast
        return torch.nn.parallel.DistributedDataParallel(
            self.wrapper, broadcast_buffers=False, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def load_in_parts(self, shard) -> None:
        """Read the frozen base part by part (each decoder layer, the embedding, the LM head, then the rest) and
        `shard(part)` each before the next is read: a rank holds its shards plus one part, never the whole model
        (which may not fit one machine: the point of sharding it)."""
        from edgeft.models import lazy

        lm = self.wrapper._causal_lm()
        embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        # a head tied to the embedding shares its parameter: it goes with the rest, in one group
        tied = getattr(head, "weight", None) is embedding.weight
        for part in (*lm.get_decoder().layers, *(() if tied else (embedding, head)), self.wrapper):
            lazy.load_(part, self.shards)
            shard(part)

    def make_optimizer(self):
        # ORT 1.19's AdamW uses eps 1e-6 (onnxblock default); the same here keeps the two comparable.
        return torch.optim.AdamW(self.params.values(), lr=self.cfg["lr"], betas=(0.9, 0.999), eps=1e-6,
                                 weight_decay=self.cfg["weight_decay"])

    def load_optimizer(self, state: dict) -> None:
        """`state`: torch AdamW's state_dict over `self.params` in order (what `optimizer_state` returns)."""
        self.optimizer.load_state_dict(state)

    def optimizer_state(self) -> dict:
        """torch AdamW's state_dict over `self.params` in order, whole (collective under sharding)."""
        return self.optimizer.state_dict()

    def _tensors(self, batch: dict):
        return [torch.from_numpy(np.ascontiguousarray(batch[k])).to(self.device) for k in INPUT_NAMES]

    def _loss(self, batch: dict) -> torch.Tensor:
        """The batch's loss, computed in bf16 under autocast with --bf16 (the loss itself in fp32)."""
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with cast:
            return self.model(*self._tensors(batch))[0].float()

    def mode(self, train: bool) -> None:
        self.model.train(train)

    def forward_backward(self, batch: dict, scale: float = 1.0) -> float:
        """The batch's loss; its gradient, times `scale` (this rank's share, distributed.py), accumulated."""
        self.mode(True)
        loss = self._loss(batch)
        self.backward(loss * scale if scale != 1.0 else loss)
        return float(loss.detach())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> float:
        """L2 norm of the accumulated gradients (before clipping)."""
        norms = [torch.linalg.vector_norm(p.grad) for p in self.params.values() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def finite(self) -> bool:
        """Whether every trained value is finite (checked before a checkpoint is written)."""
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.params.items()}

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
        self.mode(False)
        with torch.no_grad():
            return float(self._loss(batch))

    def memory(self) -> dict:
        """The GPU memory this rank's engine holds now and at its peak (nothing on the CPU: RSS says it)."""
        if self.device.type != "cuda":
            return {}
        return {"gpu_mb": round(torch.cuda.memory_allocated(self.device) / 2**20, 1),
                "gpu_peak_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}

    def save(self, folder: Path | None) -> None:
        """The adapter and the optimizer state to `folder`; under a strategy every rank calls it (the state is
        gathered) and rank 0 alone writes (the others pass None). Both on the CPU: a checkpoint resumes anywhere."""
        adapter = {name: torch.from_numpy(value) for name, value in self.weights().items()}
        optimizer = _to_cpu(self.optimizer_state())
        if folder is not None:
            save_file(adapter, str(Path(folder) / ADAPTER))
            torch.save(optimizer, Path(folder) / OPTIMIZER)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def read_checkpoint(folder: Path) -> dict:
    """A checkpoint's adapter and optimizer state, as `TorchEngine(resume=...)` takes them."""
    return {"adapter": load_file(Path(folder) / ADAPTER),
            "optimizer": torch.load(Path(folder) / OPTIMIZER, weights_only=True)}


def main(job: jobs.TorchTrain) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    world = World.from_env()
    world.start(world.device(job.config.get("ep", "cpu")), int(job.config.get("rdzv_timeout") or 300))
    try:
        if world.distributed:  # every rank resumes from rank 0's checkpoint (the other nodes need not have it)
            shared = [(job.resume_state, read_checkpoint(Path(job.resume_path)) if job.resume_path else None)]
            torch.distributed.broadcast_object_list(shared, src=0)
            job = dataclasses.replace(job, resume_state=shared[0][0])
            resume = shared[0][1]
        else:
            resume = read_checkpoint(Path(job.resume_path)) if job.resume_path else None
        if job.program:  # a device's: the exported program, no transformers (targets/train.py)
            engine = ProgramEngine(Path(job.program), job.config, resume)
        else:
            engine_type = ENGINES[job.config.get("strategy") or "ddp"] if world.launched else TorchEngine
            engine = engine_type(Path(job.model_dir), Path(job.adapter_init), job.config, resume, world)
        if world.distributed:  # the peak of loading (and sharding, for zero3 and fsdp), then training's from here
            engine.load_peak_mb = round(rss.peak_mb(), 1)
            rss.reset_peak()
        events.log(f"PyTorch {torch.__version__} engine ready on {engine.device}" + (", bf16" if engine.bf16 else "") +
                   (f", {job.config['strategy']} over {world.size} rank{'s' * world.distributed} "
                    f"({torch.distributed.get_backend()})" if world.launched else ""))
        result = loop.train(engine, job)
        world.barrier()  # no rank tears the group down while a peer still talks to it
        return result
    finally:
        world.stop()


class ProgramEngine(TorchEngine):
    """The engine where transformers and PEFT are not installed (`train --on --backend torch`, a device): the
    model is the workspace's loss module exported with torch.export on the workstation (`export_program`), its
    parameters named as the module's, so its checkpoints are TorchEngine's. One process on the CPU, fp32; the
    exported graph holds every activation (torch.export inlines activation checkpointing)."""

    def __init__(self, program: Path, cfg: dict, resume: dict | None = None):
        torch.manual_seed(int(cfg["seed"]))
        self.device, self.bf16, self.shards = torch.device("cpu"), False, None
        self.start(torch.export.load(str(program)).module(), cfg, ALONE, resume)

    def mode(self, train: bool) -> None:
        """An exported module has no modes (train() refuses); it was exported without dropout (export_program)."""


def export_program(job: jobs.ExportProgram) -> dict:
    """The workspace's loss module (the model with its initial adapter, the base as prepared) as a torch.export
    program for `ProgramEngine`: batch and sequence length dynamic (3 to `job.seq_len` tokens), saved to a
    temporary name and renamed."""
    from edgeft.models import lazy
    from edgeft.quant import torch_linear
    from edgeft.trainer import batching

    model, shards = torch_linear.load_lazily(Path(job.model_dir), Path(job.adapter_init), job.base_quant)
    lazy.load_(model, shards)
    wrapper = CausalLMLoss(model, logits=False).train()
    split = batching.Split(Path(job.dataset) / "train.npz")
    rows = np.argsort(-split.lengths, kind="stable")[:2]  # the longest: an example longer than the minimum
    batch = batching.collate(split, rows, job.pad_token_id)
    example = tuple(torch.from_numpy(np.ascontiguousarray(batch[k])) for k in INPUT_NAMES)
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("seq", min=3, max=int(job.seq_len))}
    program = torch.export.export(wrapper, example, dynamic_shapes=(dims,) * len(INPUT_NAMES), strict=False)
    out = Path(job.out)
    tmp = out.with_name(out.name + ".partial")
    torch.export.save(program, str(tmp))
    os.replace(tmp, out)
    return {"bytes": out.stat().st_size, "trainable": sum(p.requires_grad for p in program.module().parameters())}


class FsdpEngine(TorchEngine):
    """PyTorch FSDP2: each decoder layer, then the rest, sharded across the ranks (frozen base included); the
    parameters are DTensors, gathered whole for the norm, the checks and the checkpoints."""

    def wrap(self) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the engine's device: a mesh of CPUs on CPU ranks (FSDP2's default is the machine's accelerator, if any)
        mesh = init_device_mesh(self.device.type, (self.world.size,))
        # one group per part, the embedding and the LM head apart too: left in the root group they would stay
        # gathered from the forward pass to the backward pass (FSDP2 does not reshard the root in between)
        self.load_in_parts(lambda part: fully_shard(part, mesh=mesh))
        return self.wrapper  # fully_shard made it (the last part) the root

    @staticmethod
    def _whole(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def grad_norm(self) -> float:
        norms = [torch.linalg.vector_norm(self._whole(p.grad)) for p in self.params.values() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def finite(self) -> bool:
        return all(bool(torch.isfinite(self._whole(p)).all()) for p in self.params.values())

    def weights(self) -> dict[str, np.ndarray]:
        return {name: self._whole(p.detach()).cpu().numpy().copy() for name, p in self.params.items()}

    def optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        state["state"] = {i: {k: self._whole(v) for k, v in s.items()} for i, s in state["state"].items()}
        return state

    def load_optimizer(self, state: dict) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = list(self.params.values())
        sharded = {i: {k: (distribute_tensor(v, params[i].device_mesh, params[i].placements) if v.dim() else v)
                       for k, v in s.items()} for i, s in state["state"].items()}
        self.optimizer.load_state_dict({**state, "state": sharded})


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO stage 2 or 3 over torch's AdamW; DeepSpeed accumulates the micro-batches of a step (its
    own boundary each `grad_accum` backward passes), clips and steps. Values are read and set whole through
    its `safe_get/set_full_*` helpers (collective under ZeRO-3)."""

    def wrap(self) -> torch.nn.Module:
        return self.wrapper  # deepspeed.initialize wraps it with the optimizer (make_optimizer)

    def make_optimizer(self):
        os.environ["DS_ACCELERATOR"] = self.device.type  # "cpu" on a machine with GPUs too, where asked
        import deepspeed

        stage = {"zero2": 2, "zero3": 3}[self.cfg["strategy"]]
        accum = int(self.cfg["grad_accum"])
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accum,
                  "train_batch_size": accum * self.world.size,
                  # every parameter sharded, the small ones too (DeepSpeed keeps those under 1e5 values whole)
                  # ... and released after each use: no parameter stays gathered between its uses or ahead of them
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                                        "stage3_prefetch_bucket_size": 0},
                  "gradient_clipping": float(self.max_grad_norm or 0.0), "zero_allow_untested_optimizer": True,
                  "steps_per_print": 2**31 - 1}
        if stage == 3:  # partitioned as it is read (deepspeed.initialize would partition a whole model)
            deepspeed.init_distributed(torch.distributed.get_backend())  # the group torchrun's ranks formed
            self.load_in_parts(lambda part: deepspeed.zero.Init(module=part, config_dict_or_path=config,
                                                                dtype=torch.float32))
        optimizer = super().make_optimizer()
        self.model, ds_optimizer, _, _ = deepspeed.initialize(model=self.wrapper, optimizer=optimizer, config=config)
        self.base_optimizer, self.micro = optimizer, 0
        return ds_optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop sums micro-batches, as the other engines
        self.micro += 1
        if self.micro < int(self.cfg["grad_accum"]):
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def grad_norm(self) -> float:
        from deepspeed.utils import safe_get_full_grad

        norms = [torch.linalg.vector_norm(safe_get_full_grad(p).float()) for p in self.params.values()]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        self.micro = 0

    def finite(self) -> bool:
        return all(np.isfinite(value).all() for value in self.weights().values())

    def weights(self) -> dict[str, np.ndarray]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().cpu().numpy().copy() for name, p in self.params.items()}

    def optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = max((float(s["step"]) for s in self.base_optimizer.state.values() if "step" in s), default=0.0)
        state = {i: {"step": torch.tensor(step),
                     **{key: safe_get_full_optimizer_state(p, key).detach().cpu().clone()
                        for key in ("exp_avg", "exp_avg_sq")}}
                 for i, p in enumerate(self.params.values())} if step else {}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
                  for g in self.base_optimizer.param_groups[:1]]
        return {"state": state, "param_groups": groups}

    def load_optimizer(self, state: dict) -> None:
        """torch's AdamW makes its state at its first step: it is made here, over the flat fp32 partitions
        DeepSpeed has it step (linked to the parameters again under ZeRO-2), then filled from the whole state."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if not state["state"]:
            return
        step = torch.tensor(float(state["state"][0]["step"]))
        partitions = (self.optimizer.fp32_partitioned_groups_flat if self.cfg["strategy"] == "zero3" else
                      self.optimizer.single_partition_of_fp32_groups)  # what torch's AdamW steps, per rank
        for p in partitions:
            self.base_optimizer.state[p] = {"step": step.clone(), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}
        if hasattr(self.optimizer, "_link_all_hp_params"):
            self.optimizer._link_all_hp_params()
        for i, p in enumerate(self.params.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state["state"][i][key], key)


ENGINES = {"ddp": TorchEngine, "fsdp": FsdpEngine, "zero2": DeepSpeedEngine, "zero3": DeepSpeedEngine}
