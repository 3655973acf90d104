"""The optimizer (AdamW, or Muon + AdamW: `kfm.train.muon`) with named parameter groups, and
the learning-rate schedules.

The schedule is a pure function of the optimizer step (`lr_at`), so the test, the logger and the
scheduler all compute the same number; `build_scheduler` wraps it in a `LambdaLR` whose step count
(`last_epoch`) round-trips through a checkpoint while the shape of the schedule always comes from
the current config (resuming with more `train.steps` stretches the tail, as intended). A checkpoint
also carries the peak lr (`base_lrs`) and AdamW's hyperparameters in its param groups: after
loading one, `apply_optim_config` replaces them with the current config's, so a resume with a new
``optim.lr`` follows the new schedule from the resume step on.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kfm.config import OptimConfig, ScheduleConfig, TrainConfig
from kfm.train.muon import MUON_GROUP, MuonAdamW, count_params
from kfm.train.ramp import ramp_lr_factor, ramp_on

EMBEDDING_SUFFIX = "tok_embeddings.weight"
"""Parameters whose name ends with this are embeddings: never weight-decayed."""

OUTPUT_SUFFIX = "output.weight"
"""Parameters whose name ends with this are the output head: AdamW, never Muon."""

SCHEDULES = ("cosine", "wsd", "constant")


def _is_cuda(param: torch.Tensor) -> bool:
    # DTensor parameters (FSDP2) report the device of their local shard, so this holds for them too.
    return param.device.type == "cuda"


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Build the optimizer of ``cfg.name`` with named parameter groups; one object either way.

    adamw: `torch.optim.AdamW` with groups "decay" and "no_decay". Decay: every trainable
    parameter with ``ndim >= 2`` except the token embedding (any name ending in
    ``tok_embeddings.weight``). A tied output projection is the same tensor as the embedding, so
    it is found by identity and lands in no_decay once. No decay: norms, biases, other 1-D
    parameters and the embedding.

    muon: `kfm.train.muon.MuonAdamW`: group "muon" holds the 2-D parameters that are neither the
    embedding nor the output head (name ending in ``output.weight``), i.e. the attention and
    feed-forward matrices of every block, with ``optim.weight_decay`` and the ``optim.muon_*``
    settings; "decay" (an untied output head) and "no_decay" are AdamW's as above. All groups
    start at ``optim.lr``.

    Each group carries ``"name"`` for logging; empty groups are left out. AdamW kernel
    (``cfg.impl``): auto picks ``fused=True`` when every parameter is on CUDA, otherwise
    ``foreach=True``; "fused", "foreach" and "for-loop" force one (torch raises if the fused
    kernel does not support the device).

    Raises:
        ValueError: no trainable parameters, ``optim.betas`` is not two numbers, or an unknown
            ``optim.impl`` or ``optim.name``.
    """
    if len(cfg.betas) != 2:
        raise ValueError(
            f"optim.betas={cfg.betas!r} must be two numbers (beta1, beta2), e.g. --optim.betas=[0.9,0.95]"
        )
    if cfg.name not in ("adamw", "muon"):
        raise ValueError(f"optim.name={cfg.name!r} is not adamw or muon (set --optim.name=adamw)")
    # remove_duplicate=False so a tied tensor is recognised as the embedding whatever name
    # named_parameters() would have kept for it.
    named = list(model.named_parameters(remove_duplicate=False))
    embedding_ids = {id(p) for name, p in named if name.endswith(EMBEDDING_SUFFIX)}
    output_ids = {id(p) for name, p in named if name.endswith(OUTPUT_SUFFIX)}
    muon: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # deduplicated: a tied tensor appears once
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids or param.ndim < 2:
            no_decay.append(param)
        elif cfg.name == "muon" and param.ndim == 2 and id(param) not in output_ids:
            muon.append(param)
        else:
            decay.append(param)
    if not muon and not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")

    groups = [
        {"params": params, "name": name, "weight_decay": wd}
        for name, params, wd in (("decay", decay, cfg.weight_decay), ("no_decay", no_decay, 0.0))
        if params
    ]
    adamw_kwargs: dict[str, Any] = {
        "betas": (float(cfg.betas[0]), float(cfg.betas[1])),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        **_adamw_kernel(cfg, muon + decay + no_decay),
    }
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **adamw_kwargs)
    return MuonAdamW(
        {"params": muon, "weight_decay": cfg.weight_decay, **_muon_settings(cfg)},
        groups,
        lr=cfg.lr,
        adamw_kwargs=adamw_kwargs,
    )


def _adamw_kernel(cfg: OptimConfig, params: list[nn.Parameter]) -> dict[str, bool]:
    if cfg.impl == "auto":
        return {"fused": True} if all(_is_cuda(p) for p in params) else {"foreach": True}
    if cfg.impl == "fused":
        return {"fused": True}
    if cfg.impl == "foreach":
        return {"foreach": True}
    if cfg.impl == "for-loop":
        return {"foreach": False, "fused": False}
    raise ValueError(
        f"optim.impl={cfg.impl!r} is not one of auto, fused, foreach, for-loop "
        "(set --optim.impl=auto)"
    )


def _muon_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The Muon group's keys that come from ``optim.muon_*`` (set again on resume)."""
    return {
        "momentum": cfg.muon_momentum,
        "momentum_start": cfg.muon_momentum_start,
        "momentum_warmup": cfg.muon_momentum_warmup,
        "ns_steps": cfg.muon_ns_steps,
    }


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One log line: the optimizer and each group's tensors and elements (global counts), e.g.
    ``optimizer: Muon on 14 matrices (98,304 params), AdamW on decay 1 (65,536) + no_decay 6
    (65,920)``."""
    sizes = {
        group.get("name", "group"): (len(group["params"]), count_params(group["params"]))
        for group in optimizer.param_groups
    }
    muon = sizes.pop(MUON_GROUP, None)
    adamw = " + ".join(f"{name} {n} ({size:,})" for name, (n, size) in sizes.items())
    if muon is None:
        return f"optimizer: AdamW on {adamw}"
    line = f"optimizer: Muon on {muon[0]} matrices ({muon[1]:,} params)"
    return f"{line}, AdamW on {adamw}" if adamw else line


def lr_at(step: int, *, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for the update that follows ``step`` optimizer steps already taken.

    Warm-up (all schedules): ``peak_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``,
    so the first update (step 0) is not zero and step ``warmup_steps - 1`` reaches the peak.
    After warm-up:

    - cosine: from ``peak_lr`` down to ``peak_lr * min_lr_ratio`` at ``total_steps``;
    - wsd: ``peak_lr`` until the decay starts, at ``total_steps - decay_steps`` when
      ``decay_steps > 0``, else at ``round(total_steps * (1 - decay_fraction))`` (never before
      the end of warm-up); then down to ``peak_lr * min_lr_ratio`` at ``total_steps``, linearly
      or, with ``decay_shape="1-sqrt"``, as ``min + (peak - min) * (1 - sqrt(progress))``;
    - constant: ``peak_lr``.

    Steps past ``total_steps`` stay at the final value. Units are those of ``peak_lr``.

    Raises:
        ValueError: negative ``step``, ``total_steps < 1`` or an unknown ``schedule.name``.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1 (set --train.steps)")
    if cfg.name not in SCHEDULES:
        raise ValueError(
            f"schedule.name={cfg.name!r} is not one of {', '.join(SCHEDULES)} "
            "(set --schedule.name=cosine)"
        )
    warmup = max(0, cfg.warmup_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup

    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    if cfg.decay_steps > 0:
        decay_start = max(warmup, total_steps - cfg.decay_steps)
    else:
        decay_start = max(warmup, round(total_steps * (1.0 - cfg.decay_fraction)))
    if step < decay_start or decay_start >= total_steps:
        return peak_lr
    progress = min(1.0, (step - decay_start) / (total_steps - decay_start))
    if cfg.decay_shape == "1-sqrt":
        return min_lr + (peak_lr - min_lr) * (1.0 - math.sqrt(progress))
    return peak_lr + (min_lr - peak_lr) * progress


def _lr_multiplier(
    step: int, *, total_steps: int, cfg: ScheduleConfig, ramp: TrainConfig | None = None
) -> float:
    # lr_at is linear in peak_lr, so the multiplier is the schedule at peak 1. The update after
    # ``step`` steps taken is loop step step + 1, whose batch the ramp factor follows.
    factor = ramp_lr_factor(step + 1, ramp) if ramp is not None else 1.0
    return lr_at(step, total_steps=total_steps, peak_lr=1.0, cfg=cfg) * factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    *,
    total_steps: int,
    ramp: TrainConfig | None = None,
) -> LambdaLR:
    """Wrap ``optimizer`` in a LambdaLR whose multiplier is ``lr_at(step) / peak``, times
    `kfm.train.ramp.ramp_lr_factor` of the step's batch when ``ramp`` (the train config) ramps
    the batch size.

    Every param group's ``lr`` at construction is its peak. Call ``scheduler.step()`` once after
    each ``optimizer.step()``; ``last_epoch`` then equals the number of optimizer steps taken.
    The multiplier is a ``functools.partial``: LambdaLR saves only its (empty) ``__dict__``, so
    ``state_dict()``/``load_state_dict()`` round-trip and the schedule's shape is always the
    current config's. Build the scheduler before loading a checkpoint's optimizer state.

    Raises:
        ValueError: ``total_steps < 1`` or an unknown ``schedule.name`` (checked eagerly).
    """
    lr_at(0, total_steps=total_steps, peak_lr=1.0, cfg=cfg)  # fail here, not at the first step
    multiplier = functools.partial(
        _lr_multiplier,
        total_steps=total_steps,
        cfg=cfg,
        ramp=ramp if ramp is not None and ramp_on(ramp) else None,
    )
    return LambdaLR(optimizer, lr_lambda=multiplier)


def apply_optim_config(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimConfig
) -> None:
    """Make a loaded optimizer and scheduler follow ``cfg`` from their current step on.

    Loading a checkpoint restores the saved peak lr (``base_lrs``, each group's ``initial_lr``)
    and AdamW's ``betas``, ``eps`` and ``weight_decay`` in the param groups; this sets them from
    ``cfg`` and recomputes each group's ``lr`` for ``scheduler.last_epoch`` exactly as
    ``LambdaLR`` does (``base_lr * multiplier(step)``), so with an unchanged config nothing
    changes, bit for bit, and with a new one the next update uses ``lr_at(step)`` of the new
    schedule. Weight decay goes to the "decay" and "muon" groups ("no_decay" keeps 0); the
    "muon" group also takes ``optim.muon_*`` (its Newton-Schulz ``eps`` is not AdamW's). The
    moments (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) and step counts are kept.
    """
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        name = group.get("name")
        if name == MUON_GROUP:
            group.update(_muon_settings(cfg), weight_decay=cfg.weight_decay)
            continue
        group["betas"] = betas
        group["eps"] = cfg.eps
        if name == "decay" or (name is None and group.get("weight_decay", 0.0) != 0.0):
            group["weight_decay"] = cfg.weight_decay
        else:
            group["weight_decay"] = 0.0
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lrs = [
        base * multiplier(scheduler.last_epoch)
        for multiplier, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (the DeepSpeed backend logs it)
