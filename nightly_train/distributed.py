"""Distributed training on torch.distributed: each rank trains on its shard of every global batch.

One process is the default. Under `torchrun --nproc_per_node N` (gloo on CPU, NCCL on GPU) every rank draws the
same global batch (same seed, same order), keeps rows `rank::N` of it (logged examples and fresh rollouts alike),
computes its share of the token-weighted loss over the *global* token count, and the LoRA gradients are summed
across ranks before clipping and the optimizer step: the update is the single-process one on the same global
batch, up to floating-point order. Only rank 0 writes checkpoints, the adapter, the history and MLflow metrics;
every rank resumes from the same checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m nightly_train.launch \\
        --config nightly.json --window-start 2026-11-24T02:00Z --window-end 2026-11-25T02:00Z --run-id <mlflow run>

(`pipeline.train` launches exactly this when the nightly file's `train.processes` is above 1.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's environment; join the process group when there is more than one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """One GPU per rank (its local rank) when the run uses CUDA."""
        if self.world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's rows of a global batch."""
        return list(items[self.rank::self.world])

    def sum(self, value: float) -> float:
        """`value` summed over ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every gradient over ranks (a rank whose shard was empty contributes zeros)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
