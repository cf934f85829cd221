"""Scale-out under torchrun: each rank takes a disjoint shard of the batches, statistics merge
with torch.distributed all-reduce (sum / min / max), and rank 0 alone writes the report.

Started by `torchrun --nproc_per_node N -m reluscope analyze ...`: torchrun sets RANK,
WORLD_SIZE and the rendezvous variables; without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Round-robin sharding: batch i belongs to rank i mod size."""
        return batch_index % self.size == self.rank


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low or value > 1_000_000:
        what = "process count" if name == "WORLD_SIZE" else "rank"
        raise UsageError(f"environment variable {name}={text!r} is not a valid {what}; torchrun sets it: unset {name} "
                         "to run in one process, or start reluscope with torchrun")
    return value


def world_from_env() -> World:
    """The torchrun world from RANK, WORLD_SIZE and LOCAL_RANK; checked, since any shell may set them."""
    size = _env_int("WORLD_SIZE", 1, 0)
    if size <= 1:
        return World()
    rank = _env_int("RANK", 0, 0)
    if rank >= size:
        raise UsageError(f"environment variable RANK={rank} is not below WORLD_SIZE={size}; torchrun sets both, so "
                         "unset them to run in one process, or start reluscope with torchrun")
    return World(rank, size, _env_int("LOCAL_RANK", 0, 0))


def init(world: World, device: Any) -> None:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if world.active and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if getattr(device, "type", "cpu") == "cuda" else "gloo")


def all_reduce(tensor: Any, op: str) -> Any:
    """In-place all-reduce of one tensor; `op` is "sum", "min" or "max"."""
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_reduce_int(value: int, device: Any) -> int:
    import torch

    return int(all_reduce(torch.tensor([value], dtype=torch.int64, device=device), "sum").item())


def shutdown(world: World) -> None:
    import torch.distributed as dist

    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
