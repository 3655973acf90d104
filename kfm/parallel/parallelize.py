"""``parallelize(model, cfg, mesh)``: every parallelism technique, applied in one fixed order.

The model arrives as the single-device `Transformer` (already initialised, identically on every
rank) and leaves as the same module with its blocks modified in place:

    fp8 -> tensor parallel -> activation checkpointing -> torch.compile (per block) -> FSDP2

Why this order (torchtitan and OLMo-core use the same one):

- fp8 first: torchao swaps ``nn.Linear`` for ``Float8Linear`` on the plain module, before any
  weight becomes a DTensor; TP then shards those modules with the same column/row styles as any
  Linear (torchao's fp8-specific TP styles, which would all-gather activations in fp8, are not
  used), and fp8 all-gather needs FSDP2 to wrap weights that are already fp8-castable tensor
  subclasses.
- TP next: it replaces weights by DTensors sharded over the "tp" mesh and inserts the
  communication at module boundaries; everything after it wraps modules that already compute on
  local shards.
- Activation checkpointing wraps each (TP-ised) block, so recomputation in backward replays the
  TP collectives too, with the block as the unit of saved activations.
- compile per block after AC: one graph per block that contains the checkpoint region (dynamo
  traces through it), and identical blocks reuse one compiled artifact; compiling after FSDP
  would trace FSDP's hooks instead.
- FSDP2 last: ``fully_shard`` shards whatever parameters the module holds at that point (TP
  DTensors become 2-D (dp, tp) DTensors), and its all-gather/reduce-scatter hooks wrap the
  compiled, checkpointed block from outside.

Each technique's function lives in its own file and is imported only when enabled, so this
module (and a plain FSDP run) needs none of the optional dependencies (torchao).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from kfm.config import Config
from kfm.parallel.fsdp import apply_fsdp
from kfm.parallel.mesh import dp_mesh


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh | None) -> nn.Module:
    """Apply fp8, TP, AC, compile and FSDP2 to ``model`` per ``cfg.parallel``, in place.

    With ``mesh=None`` (one process, no process group) only the single-device techniques apply
    (fp8, AC, compile); with everything off the model is returned untouched, so a default
    single-process run is bitwise what it was before this module existed.

    Args:
        model: the single-device kfm Transformer, on this rank's device, with its final weights
            (the same on every rank: FSDP2 keeps this rank's shard of them).
        cfg: the full config (parallel.*, train.dtype, train.compile).
        mesh: `kfm.parallel.mesh.build_mesh`'s ("dp_replicate", "dp_shard", "tp") mesh, or None.

    Returns:
        ``model`` itself. With FSDP2 applied it is also an ``FSDPModule``: bf16 compute then
        comes from its MixedPrecisionPolicy and the training step must not autocast.
    """
    p = cfg.parallel
    if p.fp8 != "none":
        from kfm.parallel.fp8 import apply_fp8

        apply_fp8(model, p)
    if mesh is not None and mesh["tp"].size() > 1:
        from kfm.parallel.tp import apply_tp

        apply_tp(model, mesh["tp"], loss_parallel=p.loss_parallel)
    if p.ac != "none":
        from kfm.parallel.ac import apply_ac

        apply_ac(model, p, save_matmuls=p.ac_policy == "op")
    if cfg.train.compile:
        from kfm.parallel.compile import apply_compile

        apply_compile(model)
    dp = dp_mesh(mesh) if mesh is not None else None
    if dp is not None and dp.size() > 1:
        apply_fsdp(
            model,
            dp,
            p,
            param_dtype=torch.bfloat16 if cfg.train.dtype == "bf16" else None,
            reduce_dtype=torch.float32 if p.reduce_dtype == "fp32" else torch.bfloat16,
        )
    return model
