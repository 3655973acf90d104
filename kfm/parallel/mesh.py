"""The device mesh: ("dp_replicate", "dp_shard", "tp") from `ParallelConfig`, and DP coordinates.

Layout (row-major, tp fastest): ranks that differ only in their tp coordinate are adjacent, so a
TP group stays inside one node (NVLink) when tp <= GPUs per node; dp_shard comes next (FSDP's
reduce-scatter within a node for HSDP), dp_replicate outermost (one all-reduce across nodes).
"""

from __future__ import annotations

import math

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from kfm.config import ConfigError, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for ``world_size`` ranks, with the one -1 resolved.

    Pure arithmetic (no process group): the dry run uses it for 256 ranks on one machine.

    Raises:
        ConfigError: more than one -1, a size < 1 other than -1, a -1 that does not divide the
            world evenly, or a product that differs from the world size; each names the flags.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    sizes = {"dp_replicate": cfg.dp_replicate, "dp_shard": cfg.dp_shard, "tp": cfg.tp}
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"parallel.{name}={size} must be >= 1 or -1 (the rest of the world)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(
            f"{' and '.join(f'parallel.{n}=-1' for n in free)}: at most one mesh size may be -1 "
            f"(set all but one of {', '.join(f'--parallel.{n}' for n in free)} explicitly)"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} is not divisible by "
                + " * ".join(f"parallel.{n}={s}" for n, s in sizes.items() if s != -1)
                + f" = {fixed}, so parallel.{free[0]}=-1 has no integer value "
                f"(change --parallel.dp_replicate / --parallel.tp or the number of processes)"
            )
        sizes[free[0]] = world_size // fixed
    elif fixed != world_size:
        raise ConfigError(
            f"parallel.dp_replicate * parallel.dp_shard * parallel.tp = "
            f"{sizes['dp_replicate']} * {sizes['dp_shard']} * {sizes['tp']} = {fixed} but the "
            f"world size is {world_size} (set one of --parallel.dp_replicate, "
            "--parallel.dp_shard, --parallel.tp to -1, or launch that many processes)"
        )
    return sizes["dp_replicate"], sizes["dp_shard"], sizes["tp"]


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The 3-D mesh ("dp_replicate", "dp_shard", "tp") over ``world_size`` ranks.

    Size-1 dims are kept so code can always slice ``mesh["tp"]`` or ``mesh["dp_shard"]``. Needs
    an initialised default process group (kfm.train.dist); ``device_type`` is "cuda" or "cpu".

    Raises:
        ConfigError: see `mesh_shape`.
    """
    return init_device_mesh(device_type, mesh_shape(cfg, world_size), mesh_dim_names=MESH_DIMS)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel sub-mesh FSDP2 shards over: 2-D ("dp_replicate", "dp_shard") for HSDP
    (replicate > 1), else 1-D "dp_shard"."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def dp_rank_size(mesh: DeviceMesh) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas of the model.

    The data loader uses these, not the global rank: the tp ranks of one DP coordinate hold the
    same model replica in pieces and must read the same batch.
    """
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    rank = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    return rank, replicate.size() * shard.size()
