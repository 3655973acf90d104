"""DeepSpeed's JSON config from kfm's config (``parallel.backend: deepspeed``).

The same kfm config drives both backends: `ds_config` turns it into DeepSpeed's config (batch
sizes, ZeRO stage, bf16, clipping, communication buckets); the engine itself is built and stepped
by `kfm.train.backends.deepspeed.DeepSpeedBackend`. Needs no deepspeed import, so ``kfm train
--dry-run`` shows the generated config without the extra.
"""

from __future__ import annotations

from typing import Any

import yaml

from kfm.config import Config, ConfigError

# -- config ------------------------------------------------------------------------------------


def grad_accum_steps(cfg: Config, *, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: global / (micro * world_size).

    Raises:
        ConfigError: the global batch is not a multiple of micro_batch_size * world_size.
    """
    per_pass = cfg.train.micro_batch_size * world_size
    if world_size < 1 or cfg.train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x world size {world_size} "
            f"(set --train.global_batch_size to a multiple of {per_pass})"
        )
    return cfg.train.global_batch_size // per_pass


def ds_config(cfg: Config, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for ``cfg`` on ``world_size`` data-parallel ranks.

    Batch: ``train_batch_size`` = train.global_batch_size, ``train_micro_batch_size_per_gpu`` =
    train.micro_batch_size, ``gradient_accumulation_steps`` = global / (micro * world_size);
    DeepSpeed checks the three agree. ZeRO stage = parallel.zero_stage; bf16 params (fp32 master
    weights in the ZeRO optimizer) when train.dtype=bf16; gradients reduced in
    parallel.reduce_dtype; global-norm clipping at optim.grad_clip (0 disables). There is no
    ``optimizer``/``scheduler`` block: `DeepSpeedBackend` passes kfm's torch AdamW and LambdaLR.

    Bucket sizes (elements) follow the model width as the Hugging Face integration does: large
    enough to amortise a collective's latency, small enough that a bucket of a 4096-wide model is
    ~32 MiB in bf16. Needs no deepspeed import (``--dry-run`` works without the extra).

    Raises:
        ConfigError: parallel.tp > 1 (the DeepSpeed backend is data-parallel only), an HSDP
            layout (parallel.dp_replicate > 1: not mapped, see below), or batch sizes that do
            not divide (see `grad_accum_steps`).
    """
    if cfg.parallel.tp != 1:
        raise ConfigError(
            f"parallel.tp={cfg.parallel.tp}: the DeepSpeed backend is data-parallel only "
            "(set --parallel.tp=1, or --parallel.backend=fsdp for tensor parallel)"
        )
    p = cfg.parallel
    one_group = p.dp_replicate == 1 and p.dp_shard in (-1, world_size)
    if not (one_group or (p.dp_replicate == -1 and p.dp_shard == world_size)):
        # ZeRO partitions over every rank. DeepSpeed's hierarchical variants are not HSDP: hpZ
        # (zero_hpz_partition_size) keeps a secondary copy of the weights per node but still
        # shards optimizer state over all ranks, and MiCS (mics_shard_size) needs the model built
        # under its own init context. Refusing is better than silently ignoring the layout.
        raise ConfigError(
            f"parallel.dp_replicate={p.dp_replicate} x parallel.dp_shard={p.dp_shard} on "
            f"{world_size} rank(s) is not one group of all ranks (HSDP replicates shards across "
            "groups), which the DeepSpeed backend does not map: ZeRO shards over all ranks. Set "
            "--parallel.dp_replicate=1 --parallel.dp_shard=-1 for DeepSpeed, or use "
            "--parallel.backend=fsdp for HSDP"
        )
    accum = grad_accum_steps(cfg, world_size=world_size)
    d = cfg.model.d_model
    zero: dict[str, Any] = {
        "stage": cfg.parallel.zero_stage,
        # Copy gradients into one contiguous buffer as they are produced: less fragmentation.
        "contiguous_gradients": True,
        # Overlap the gradient reduce with the rest of backward (side streams on GPU).
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": d * d,
    }
    if cfg.parallel.zero_stage < 3:
        zero["allgather_bucket_size"] = d * d
    else:
        zero |= {
            # Gather the next blocks' parameters while this one computes.
            "stage3_prefetch_bucket_size": int(0.9 * d * d),
            # Parameters below this many elements (norm weights) stay whole on every rank:
            # sharding them costs a collective each for nothing.
            "stage3_param_persistence_threshold": 10 * d,
            # Save the consolidated weights through zero_to_fp32 instead (see
            # load_model_state_from_deepspeed): gathering them at every save costs memory.
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    reduce_dtype = {"fp32": "fp32", "bf16": "bf16"}[cfg.parallel.reduce_dtype]
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        # check_grad_overflow: skip an update whose gradient norm is not finite (ZeRO-3 always
        # does); kfm's guard also relies on it to skip a spiking step (kfm/train/guard.py).
        "bf16": {"enabled": cfg.train.dtype == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "communication_data_type": reduce_dtype,
        # kfm passes torch's AdamW; ZeRO runs it on its flat fp32 partitions (elementwise maths,
        # so the result equals unsharded AdamW) but calls it "untested" unless allowed.
        "zero_allow_untested_optimizer": True,
        # kfm's MetricLogger reports progress; DeepSpeed's own printing would only repeat it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def ds_config_yaml(cfg: Config, world_size: int) -> str:
    """`ds_config` as YAML, for ``kfm train --dry-run`` (JSON has the same keys and values)."""
    return yaml.safe_dump(ds_config(cfg, world_size=world_size), sort_keys=False)
