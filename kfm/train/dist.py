"""Process-group life cycle and the few collectives the training loop needs.

torchrun (or srun + torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT); a
plain ``python -m kfm_cli train`` sets none of them and runs as world size 1 with no process
group at all, so the single-process path never touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kfm.config import ConfigError, ParallelConfig


@dataclass(frozen=True, slots=True)
class WorldInfo:
    """This process's place in the launch: global rank, world size, rank within its node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> WorldInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (0 / 1 / 0 when absent)."""
    env = os.environ
    return WorldInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def backend_for(cfg: ParallelConfig, device: torch.device) -> str:
    """parallel.dist_backend, with auto = nccl on CUDA and gloo on CPU.

    Raises:
        ConfigError: nccl asked for on a CPU device.
    """
    if cfg.dist_backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.dist_backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            "parallel.dist_backend=nccl needs CUDA devices but train.device is "
            f"{device.type} (set --parallel.dist_backend=gloo or auto)"
        )
    return cfg.dist_backend


@contextmanager
def process_group(
    cfg: ParallelConfig, world: WorldInfo, device: torch.device
) -> Iterator[torch.device]:
    """Initialise the default process group for ``world`` and yield this rank's device.

    On CUDA the device is ``cuda:LOCAL_RANK`` (set as current, so NCCL and new tensors use it).
    On leaving normally every rank meets at a barrier before the group is destroyed (nobody
    exits while another still writes a checkpoint); after an exception the group is destroyed
    without a barrier, since the other ranks may be stuck in a collective the failed rank never
    joins (torchrun then stops them).
    """
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(cfg, device),
        rank=world.rank,
        world_size=world.world_size,
        # A collective that waits this long aborts with an error instead of hanging forever; the
        # first step (compilation, a checkpoint load on a busy file system) must fit in it.
        timeout=timedelta(seconds=cfg.collective_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    ok = False
    try:
        yield device
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """A process group is up (and so every rank must join each collective)."""
    return dist.is_available() and dist.is_initialized()


def mean_over_ranks(value: Tensor) -> Tensor:
    """Average of a scalar tensor over all ranks (a collective: every rank must call it).

    Averaging over the whole world equals averaging over data-parallel replicas: the tp ranks of
    one replica hold identical losses. No-op without a process group.
    """
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def gather_to_all(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled: small things only)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small things like a path or an error text)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
