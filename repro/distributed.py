"""torch.distributed from the environment (torchrun, or SLURM tasks exported by the launcher).

The device is chosen by the LOCAL rank, never the global one: DiT's and DiC's `DDP(device_ids=[rank])` breaks
as soon as a job spans nodes or each process sees a single GPU (`specs/protocol.md` section 9, pitfall 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistEnv:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # one visible device (SLURM binding, CUDA_VISIBLE_DEVICES per task) is index 0 for every local rank
        index = local_rank if torch.cuda.device_count() > 1 else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def all_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity for one process)."""
    if env.world > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world
    return values


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()
