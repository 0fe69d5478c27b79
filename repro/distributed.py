"""torch.distributed from the environment (torchrun, or SLURM tasks exported by the launcher).

The device is chosen by the LOCAL rank, never the global one: DiT's and DiC's `DDP(device_ids=[rank])` breaks
as soon as a job spans nodes or each process sees a single GPU (`specs/protocol.md` section 9, pitfall 1).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


DEVICE_ENV = "REPRO_DEVICE"  # "cpu": run on the CPU even where a GPU is visible (`repro pilot --device cpu`)
# How long a collective may wait for a peer before it raises (the launcher sets it from the cluster profile's
# collective_timeout_s). gloo's default is 30 min and a hung NCCL peer can hold an allocation far longer; with a
# bound, a job whose task died or hangs ends, and is resubmitted from its last checkpoint.
TIMEOUT_ENV = "REPRO_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900  # above a rank-0 checkpoint write of an XL model (the others wait in a barrier)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a clock read next times it (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"not a SLURM node list: {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for one task of a plain `srun` step (one task per GPU), or {} if not needed.

    torchrun and submitit's `TorchDistributedEnvironment().export()` set these themselves; an srun task only has
    SLURM's. The rendezvous is the first node of the step, where task 0 runs (SLURM's block distribution), on a
    port derived from the job id. Not the node srun was launched from: from a login node, that runs no task, and
    task 0 could not listen on its address (what the namespace nodes of `up.sh --nodes 2` showed).
    """
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    if "WORLD_SIZE" in environ or ntasks <= 1 or "SLURM_PROCID" not in environ:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    master = environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else environ.get("SLURM_LAUNCH_NODE_IPADDR"))
    if not master:
        raise ValueError("SLURM task without MASTER_ADDR or SLURM_LAUNCH_NODE_IPADDR: cannot find the rendezvous")
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "MASTER_ADDR": master,
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}


def init() -> DistEnv:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, if any
    (from torchrun, submitit, or a plain srun task's SLURM variables)."""
    os.environ.update(env_from_slurm(dict(os.environ)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and os.environ.get(DEVICE_ENV) != "cpu":
        # one visible device (SLURM binding, CUDA_VISIBLE_DEVICES per task) is index 0 for every local rank
        index = local_rank if torch.cuda.device_count() > 1 else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=collective_timeout_s()))
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def collective_timeout_s(environ=os.environ) -> float:
    raw = environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if not 0 < value < 10**7:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be > 0 seconds")
    return value


class PairwiseSum:
    """The sum of 2^m tensors added one by one, over the balanced binary tree of their order.

    Float addition is not associative, but every aligned block of 2^j consecutive terms is one subtree: a process
    holding terms [r*n, (r+1)*n) sums them to exactly the node that one process summing all terms computes, and the
    tree over the W blocks (`tree_sum`) is the rest of that tree. At most log2(count) partial sums are held.
    """

    def __init__(self):
        self._stack: list[tuple[int, torch.Tensor]] = []  # (number of terms, their sum), sizes strictly falling

    def add(self, x: torch.Tensor) -> None:
        size = 1
        while self._stack and self._stack[-1][0] == size:
            _, left = self._stack.pop()
            x, size = left + x, size * 2
        self._stack.append((size, x))

    def total(self) -> torch.Tensor:
        if len(self._stack) != 1:
            raise ValueError(f"a pairwise sum of {sum(n for n, _ in self._stack)} terms: not a power of two")
        return self._stack[0][1]


def tree_sum(partial: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's `partial` (its aligned subtree of a `PairwiseSum`), summed up the rest of the tree in rank order:
    the same bits on every rank, and the same as one process summing all the terms. World size a power of two.

    A binary reduction to rank 0 (log2(W) rounds of send/recv, each adding its right neighbour's subtree to its
    own) and a broadcast: memory of two partials, unlike an all-gather of W. `partial` may be overwritten.
    """
    if env.world == 1:
        return partial
    x, stride = partial, 1
    while stride < env.world:
        if env.rank % (2 * stride):  # the right child at this level: hand its subtree to the left one, done
            dist.send(x.contiguous(), dst=env.rank - stride)
            break
        right = torch.empty_like(x)
        dist.recv(right, src=env.rank + stride)
        x, stride = x + right, stride * 2
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x


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
