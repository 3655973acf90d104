"""Batch-size ramp-up: the global batch grows from ``train.batch_ramp_start`` to
``train.global_batch_size`` over the first ``train.batch_ramp_steps`` optimizer steps (as GPT-3,
Megatron's ``--rampup-batch-size`` and OLMo-core's batch-size warm-up do).

The batch of each step is a pure function of the step and the train config (`global_batch_at`),
never of the number of ranks: a run resumed or resharded mid-ramp continues the same schedule,
and the loader, which counts global samples, needs no state of its own for it.

Shape: the straight line from ``batch_ramp_start`` at step 1 to ``global_batch_size`` at step
``batch_ramp_steps + 1``, rounded down to a multiple of ``batch_ramp_start``. So the batch takes
the values start, 2 x start, ..., global_batch_size in stages of (nearly) equal length, and every
value is a whole number of micro-batches on every data-parallel rank as soon as ``start`` is
(`check_ramp`).

Learning rate (``train.batch_ramp_lr``): while the batch is b < B = global_batch_size, the
schedule's lr is multiplied by sqrt(b / B) ("sqrt": the square-root scaling rule for Adam,
Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), by b / B
("linear": the SGD rule) or left alone ("none").
"""

from __future__ import annotations

import math

from kfm.config import ConfigError, TrainConfig


def ramp_on(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` ramps the batch size (``train.batch_ramp_start > 0``)."""
    return cfg.batch_ramp_start > 0


def global_batch_at(step: int, cfg: TrainConfig) -> int:
    """Sequences in the global batch of optimizer step ``step`` (1-based, as the loop counts).

    ``global_batch_size`` without a ramp and from step ``batch_ramp_steps + 1`` on; before that
    ``start + start * floor((step - 1) * (B / start - 1) / batch_ramp_steps)`` with
    ``start = batch_ramp_start`` and ``B = global_batch_size``. Integer arithmetic only, so every
    rank and every resume computes the same number.

    Raises:
        ValueError: ``step < 1``.
    """
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (optimizer steps count from 1)")
    start, full, span = cfg.batch_ramp_start, cfg.global_batch_size, cfg.batch_ramp_steps
    if start <= 0 or step > span:
        return full
    increments = full // start - 1  # stages after the first
    return start + start * ((step - 1) * increments // span)


def samples_through(step: int, cfg: TrainConfig) -> int:
    """Global sequences trained on by the end of step ``step`` (0 before the first): the sum of
    `global_batch_at` over steps 1..step (a loop over the ramp's steps only)."""
    ramped = min(step, cfg.batch_ramp_steps) if ramp_on(cfg) else 0
    ramp_part = sum(global_batch_at(s, cfg) for s in range(1, ramped + 1))
    return ramp_part + (step - ramped) * cfg.global_batch_size


def ramp_lr_factor(step: int, cfg: TrainConfig) -> float:
    """Factor on the schedule's lr for the update of step ``step`` (1-based): sqrt(b / B),
    b / B or 1 per ``train.batch_ramp_lr``, with b = `global_batch_at` and B the full batch."""
    batch, full = global_batch_at(step, cfg), cfg.global_batch_size
    if batch == full or cfg.batch_ramp_lr == "none":
        return 1.0
    if cfg.batch_ramp_lr == "sqrt":
        return math.sqrt(batch / full)
    return batch / full


def check_ramp(cfg: TrainConfig, dp_size: int) -> None:
    """That every step's batch splits into whole micro-batches on each of ``dp_size``
    data-parallel ranks (the backend calls it once the mesh is known; the checks that need no
    world size run at config load: kfm/config/loader.py).

    Raises:
        ConfigError: naming batch_ramp_start and the multiple it needs.
    """
    per_pass = cfg.micro_batch_size * dp_size
    if ramp_on(cfg) and cfg.batch_ramp_start % per_pass:
        raise ConfigError(
            f"train.batch_ramp_start={cfg.batch_ramp_start} must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {cfg.micro_batch_size} * {dp_size} = "
            f"{per_pass} (every rank runs whole micro-batches at every step); set "
            f"--train.batch_ramp_start to {_multiples(per_pass, cfg.global_batch_size)}, or "
            "lower --train.micro_batch_size"
        )


def accumulation_at(step: int, cfg: TrainConfig, dp_size: int) -> int:
    """Micro-batches per data-parallel rank in step ``step``: `global_batch_at` / (micro x dp)
    (exact once `check_ramp` passed)."""
    return global_batch_at(step, cfg) // (cfg.micro_batch_size * dp_size)


def describe_ramp(cfg: TrainConfig) -> str:
    """One line for the start-up log and ``--dry-run``; empty without a ramp."""
    if not ramp_on(cfg):
        return ""
    lr = {
        "sqrt": "lr x sqrt(batch / global_batch_size)",
        "linear": "lr x batch / global_batch_size",
        "none": "lr unscaled",
    }[cfg.batch_ramp_lr]
    return (
        f"batch ramp: {cfg.batch_ramp_start} -> {cfg.global_batch_size} sequences over the "
        f"first {cfg.batch_ramp_steps} steps, in steps of {cfg.batch_ramp_start}; {lr} meanwhile"
    )


def _multiples(unit: int, full: int) -> str:
    """Up to four batch_ramp_start values that fit: multiples of ``unit`` dividing ``full``."""
    values = [v for v in range(unit, full + 1, unit) if full % v == 0][:4]
    return "one of " + ", ".join(map(str, values)) if values else f"a multiple of {unit}"
