"""FSDP2 (``fully_shard``): ZeRO-3-style sharding over the data-parallel mesh, HSDP on a 2-D one.

Each transformer block is its own FSDP unit (one all-gather before its forward, one
reduce-scatter after its backward), and the root unit holds what is left: the (tied) embedding,
the final norm and the output projection. On a 2-D ("dp_replicate", "dp_shard") mesh FSDP2
shards within dp_shard and all-reduces the reduce-scattered gradients across dp_replicate: HSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from kfm.config import ParallelConfig


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in forward order (kfm's Transformer keeps them in ``model.layers``)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict | nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleDict/ModuleList of blocks")
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    cfg: ParallelConfig,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
) -> None:
    """Shard ``model`` in place with FSDP2 over ``dp_mesh`` (1-D: FSDP; 2-D: HSDP).

    Args:
        model: kfm Transformer (possibly already TP-parallelised, checkpointed and compiled).
        dp_mesh: `kfm.parallel.mesh.dp_mesh` of the world mesh.
        cfg: parallel.reshard_after_forward picks ZeRO-3 (free gathered params after forward,
            gather again in backward) or ZeRO-2-like (keep them: more memory, one fewer
            all-gather per block).
        param_dtype: dtype the params are gathered in for compute (bf16 replaces autocast), or
            None to compute in the stored dtype (fp32).
        reduce_dtype: dtype of the gradient reduce-scatter / all-reduce (fp32 by default: summing
            many ranks' bf16 gradients loses bits).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=cfg.reshard_after_forward,
            mp_policy=mp_policy,
        )
    # The root's own params (embedding = output with tied weights, final norm) are used first in
    # backward, right after forward ends; FSDP2 keeps the root unsharded after forward for that
    # reason whatever reshard_after_forward says.
    fully_shard(
        model, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp_policy
    )
    _set_prefetch(blocks)


def _set_prefetch(blocks: list[nn.Module]) -> None:
    """Forward: block i issues block i+1's all-gather right after its own, from the CPU, instead
    of when block i+1 starts: the same overlap as FSDP2's default but robust to a CPU that is
    not far ahead of the GPU. Backward is left to FSDP2's default, which already prefetches the
    previous block (reverse forward order); a singleton explicit list would change nothing, and
    two or more would hold more gathered blocks in memory."""
    units = [b for b in blocks if isinstance(b, FSDPModule)]
    for block, nxt in zip(units, units[1:], strict=False):
        block.set_modules_to_forward_prefetch([nxt])
