"""Activation checkpointing: trade recompute for memory, one transformer block at a time.

A checkpointed block keeps only its input during forward and re-runs its forward inside backward
to rebuild the activations. Modes (parallel.ac):

- none: keep every activation.
- full: checkpoint every block; peak activation memory ~ one block's activations + the block
  inputs, at the cost of ~one extra forward (about +33% compute).
- selective: checkpoint the blocks whose index is a multiple of parallel.ac_every (1 = all,
  2 = every other, ...), a knob between the two. With `save_matmuls=True` the checkpointed blocks
  use an op-level policy instead of recomputing everything: the outputs of matmuls, attention and
  reduce-scatters are saved and only the cheap elementwise ops (norms, RoPE, SiLU, residual adds)
  are recomputed -- most of the compute saved back, a smaller share of the memory.

The wrapper inserts `_checkpoint_wrapped_module.` into parameter names; `state_dict()` and
`get_model_state_dict` (kfm's checkpoints) strip it, and kfm.export.hf ignores it, so checkpoints
load with or without AC.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from kfm.config.schema import ParallelConfig


def _saved_ops() -> set[Any]:
    # Outputs worth keeping: the FLOP-heavy matmuls and attention kernels, and reduce-scatters
    # (under tensor parallelism) so that recomputation issues no collective.
    aten = torch.ops.aten
    names = [
        (aten, "mm"),
        (aten, "addmm"),
        (aten, "bmm"),
        (aten, "_scaled_dot_product_flash_attention"),
        (aten, "_scaled_dot_product_efficient_attention"),
        (aten, "_scaled_dot_product_cudnn_attention"),
        (aten, "_scaled_dot_product_flash_attention_for_cpu"),
        (torch.ops._c10d_functional, "reduce_scatter_tensor"),
    ]
    return {getattr(ns, name).default for ns, name in names if hasattr(ns, name)}


def _matmul_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _saved_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmuls_context() -> Any:
    return create_selective_checkpoint_contexts(_matmul_policy)


def _wrap(block: nn.Module, *, save_matmuls: bool) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if save_matmuls:
        kwargs["context_fn"] = _save_matmuls_context
    # Non-reentrant: works with DTensor/FSDP2 hooks and torch.compile, and with inputs that do not
    # require grad. preserve_rng_state=False because blocks contain no random ops (no dropout),
    # which spares an RNG-state save/restore per block.
    return checkpoint_wrapper(
        block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False, **kwargs
    )


def checkpointed_blocks(n_layers: int, cfg: ParallelConfig) -> list[int]:
    """Indices of the blocks that `apply_ac` wraps for this config (empty for ac='none').

    Raises ValueError for selective AC with parallel.ac_every < 1.
    """
    if cfg.ac == "none":
        return []
    if cfg.ac == "full":
        return list(range(n_layers))
    if cfg.ac_every < 1:
        raise ValueError(
            f"parallel.ac_every={cfg.ac_every} must be >= 1 for selective activation "
            "checkpointing (set --parallel.ac_every=1 for every block, 2 for every other, ...)"
        )
    return [i for i in range(n_layers) if i % cfg.ac_every == 0]


def apply_ac(model: nn.Module, cfg: ParallelConfig, *, save_matmuls: bool = False) -> None:
    """Wrap `model.layers` blocks (a ModuleDict "0".."L-1") with activation checkpointing in place.

    Which blocks: see `checkpointed_blocks` (cfg.ac, cfg.ac_every). save_matmuls=True applies the
    op-level policy (save matmul/attention outputs, recompute the rest) to the wrapped blocks;
    without it a wrapped block recomputes its whole forward. Losses and gradients are unchanged
    (same ops, same order). Raises ValueError for an invalid cfg.ac_every.
    """
    layers = model.layers
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError("apply_ac expects model.layers to be an nn.ModuleDict of blocks")
    keys = list(layers.keys())
    for index in checkpointed_blocks(len(keys), cfg):
        key = keys[index]
        layers[key] = _wrap(layers[key], save_matmuls=save_matmuls)
