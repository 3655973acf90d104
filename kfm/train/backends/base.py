"""What the training loop needs from a backend, and the pieces both backends share.

A backend owns the model, the optimizer, the schedule, the data-parallel layout and the
checkpoint files; the loop (kfm/train/trainer.py) only calls it:

    backend.step(batches, step=) -> StepOutput  optimizer step ``step``: accumulation (of that
                                             step's batch: kfm/train/ramp.py), clip, guard, update
    backend.save(step, trainer_state)        checkpoint (may return before the files are written),
                                             with ``backend.manifest_extra`` in its manifest
    backend.load(path) -> trainer_state      resume (model, optimizer, schedule, RNG)
    backend.poll()                           the dir of a save that has finished since, if any
    backend.wait() / backend.close(wait=)    finish the save in flight / release everything
                                             (wait=False after an error: abandon it)
    backend.module, backend.autocast_dtype   the model for evaluation and export

Implementations: `kfm.train.backends.fsdp.FSDPBackend` (one process, FSDP2/HSDP, tensor
parallel) and `kfm.train.backends.deepspeed.DeepSpeedBackend` (ZeRO 1-3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from kfm.config import ConfigError
from kfm.train.guard import StepGuard

if TYPE_CHECKING:
    from kfm.data import Batch
    from kfm.train.ema import EMA


class BatchSource(Protocol):
    """Anything with ``next_batch()`` (kfm.data.PackedLoader, or the loop's timing wrapper)."""

    def next_batch(self) -> Batch: ...


@dataclass
class StepOutput:
    """What one optimizer step reports. Tensors stay on the device: reading them syncs."""

    loss: Tensor
    """Mean cross-entropy over the global batch (fp32 scalar; equal on every rank)."""
    grad_norm: Tensor
    """Global gradient norm before clipping (fp32 scalar; equal on every rank)."""
    skipped: Tensor
    """1.0 if the update was skipped by the guard (bad step), else 0.0."""
    lr: float
    """Learning rate this update used (the schedule has already moved on)."""
    optim_timer: DeviceTimer
    """Time of this rank's optimizer update: local compute with no collective inside, so a slow
    device shows here (read it on log steps only)."""


class Backend(Protocol):
    dp_rank: int
    dp_size: int
    accum: int
    """Micro-batches per rank per optimizer step at the full global batch (the steps of a
    batch-size ramp run fewer: `kfm.train.ramp.accumulation_at`)."""
    guard: StepGuard
    """The bad-step guard whose counters the loop's components read."""
    manifest_extra: dict[str, Any]
    """Top-level keys every checkpoint manifest gets (the trainer sets ``tokenizer_hash`` and
    ``data_fingerprint`` here once the data is open)."""
    ema: EMA | None
    """The weight EMA (train.ema_decay > 0; FSDP backend only), else None."""

    @property
    def module(self) -> nn.Module: ...

    @property
    def autocast_dtype(self) -> torch.dtype | None: ...

    def step(self, batches: BatchSource, *, step: int | None = None) -> StepOutput: ...

    def save(self, step: int, trainer_state: dict[str, Any]) -> None: ...

    def load(self, path: Path) -> dict[str, Any]: ...

    def wait(self) -> Path | None: ...

    def poll(self) -> Path | None: ...

    def close(self, *, wait: bool = True) -> None: ...

    def describe(self) -> str: ...


class DeviceTimer:
    """Wall time of a region of device work: CUDA events on GPU (no sync until read), the host
    clock on CPU (where work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        if self._cuda:
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """Elapsed seconds (waits for the end event on CUDA: call on log steps)."""
        if self._cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return self._t1 - self._t0


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank.

    Raises:
        ConfigError: global_batch_size is not a multiple of micro_batch_size * dp_size.
    """
    per_pass = micro_batch_size * dp_size
    if global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {micro_batch_size} * "
            f"{dp_size} = {per_pass} (set --train.micro_batch_size, --train.global_batch_size or "
            "--parallel.tp / the number of processes)"
        )
    return global_batch_size // per_pass
