"""Data parallelism for the torch engine, inside the ranks torchrun starts (runtime/torchrun.py launches them).

Every rank walks the same seeded data order; each global micro-batch is split by rows across the ranks
(`World.share`). A rank's loss is its own rows' token mean, scaled by its share of the micro-batch's target
tokens (times the world size, since every strategy averages gradients over ranks): the averaged gradient is
then the gradient of the whole micro-batch's token mean, the one a single process computes, whatever the
rows' lengths. A rank with no rows (a last batch smaller than the world) runs one row at weight 0, so that
every rank joins every collective.

Strategies (the engines are in torch_engine.py):
    ddp    torch DistributedDataParallel: a full replica per rank, gradients all-reduced
    zero2  DeepSpeed ZeRO stage 2: optimizer state and gradients sharded, parameters whole
    zero3  DeepSpeed ZeRO stage 3: parameters sharded too (the frozen base included)
    fsdp   PyTorch FSDP2 (`fully_shard` per decoder layer): parameters, gradients and state sharded
The ranks talk over gloo when the engine computes on the CPU, over NCCL on CUDA (one rank per GPU; on CUDA every
run is launched by torchrun, so one GPU is a world of one running its strategy).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np

from edgeft.trainer import batching


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: one process is a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun (a world of one, too): the strategy's engine and a process group

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment (a world of one without it)."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                   launched=True)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The rank that reports and writes (checkpoints, metrics)."""
        return self.rank == 0

    def device(self, kind: str):
        """The torch device this rank computes on: the CPU, or for "cuda" the GPU of its local rank."""
        import torch

        return torch.device("cuda", self.local_rank) if kind == "cuda" else torch.device("cpu")

    def start(self, device, timeout_s: int = 300) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPUs (also on a machine with GPUs)."""
        import torch
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if self.launched and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))

    def share(self, batch: dict) -> tuple[dict, float]:
        """This rank's rows of a global micro-batch and their share of its target tokens."""
        if not self.distributed:
            return batch, 1.0
        rows = np.array_split(np.arange(len(batch["input_ids"])), self.size)[self.rank]
        total = targets(batch)
        if not len(rows):
            return {k: v[:1] for k, v in batch.items()}, 0.0
        mine = {k: v[rows] for k, v in batch.items()}
        return mine, targets(mine) / total if total else 0.0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, in rank order: the same on every rank)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        # NCCL reduces tensors on the rank's GPU only
        on = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: float) -> list[float]:
        """`value` of every rank, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.launched:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


ALONE = World()  # one process


def targets(batch: dict) -> int:
    """Target tokens of a collated batch (labels shifted by one, ignored positions left out)."""
    return int((batch["labels"][:, 1:] != batching.IGNORE_INDEX).sum())
