"""Bad-step detection: non-finite or spiking updates are skipped, counted and, in a row, fatal.

`StepGuard.check(loss, grad_norm)` runs every step on the device, with no host sync: it returns a
0/1 float tensor ``bad`` and updates running statistics of the accepted steps (a ring buffer of
the last ``spike_window`` losses and gradient norms). A step is bad when its loss or gradient
norm is NaN/inf (``guard.skip_nonfinite``), or, once the window is full, exceeds the window's
mean by ``guard.spike_sigma`` standard deviations. The inputs must be the same on every rank
(the global-batch mean loss and the global gradient norm), so every rank reaches the same
verdict and skips the same updates.

How the backend skips without a sync: torch's fused AdamW takes ``found_inf`` (the mechanism
GradScaler uses) and leaves parameters, moments and step count untouched where it is 1, all on
the device. Other optimizer kernels (foreach, for-loop) cannot, so there the backend reads
``bad`` on the host (one device sync per step; free on CPU, and measured in
docs/training.md). The host learns the skip count on log steps, and `poll` raises after
``max_consecutive_skips`` bad steps in a row (on CUDA it reads the counter one step late through
a non-blocking copy, so it adds no sync either).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfm.config import GuardConfig


class BadStepsError(RuntimeError):
    """Too many consecutive updates were skipped: the run cannot make progress."""


class StepGuard:
    """Running loss/grad-norm statistics and skip counters, all on ``device``."""

    def __init__(self, cfg: GuardConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        w = cfg.spike_window
        self._losses = torch.zeros(w, dtype=torch.float32, device=device)
        self._norms = torch.zeros(w, dtype=torch.float32, device=device)
        self._accepted = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        """Updates skipped since the start of this process."""
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        """Updates skipped in a row up to the last step."""
        self._host_copy: Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def check(self, loss: Tensor, grad_norm: Tensor | None) -> Tensor:
        """0/1 float32 scalar on the device: 1 if this update must be skipped. No host sync.

        ``loss`` and ``grad_norm`` are 0-dim tensors equal on every rank; ``grad_norm=None``
        judges the loss alone (DeepSpeed: the norm is known only after its step).
        """
        loss = loss.detach().float().reshape(())
        if grad_norm is None:
            grad_norm = self._norms.new_zeros(())  # 0 never spikes a window of zeros
        grad_norm = grad_norm.detach().float().reshape(())
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        bad = nonfinite if self.cfg.skip_nonfinite else torch.zeros_like(nonfinite)
        if self.cfg.spike_sigma > 0:
            full = self._accepted >= self.cfg.spike_window
            sigma = self.cfg.spike_sigma
            l_mean, l_std = self._losses.mean(), self._losses.std()
            n_mean, n_std = self._norms.mean(), self._norms.std()
            spike = (loss > l_mean + sigma * l_std) | (grad_norm > n_mean + sigma * n_std)
            bad = bad | (full & spike & ~nonfinite)
        # Only accepted steps enter the statistics (slot = accepted count mod window).
        slot = torch.remainder(self._accepted, self.cfg.spike_window)
        keep = ~bad & ~nonfinite
        self._losses.index_copy_(
            0, slot.reshape(1), torch.where(keep, loss, self._losses[slot]).reshape(1)
        )
        self._norms.index_copy_(
            0, slot.reshape(1), torch.where(keep, grad_norm, self._norms[slot]).reshape(1)
        )
        self._accepted += keep.long()
        self.skipped += bad.long()
        self.consecutive = torch.where(
            bad, self.consecutive + 1, torch.zeros_like(self.consecutive)
        )
        if not self.cfg.skip_nonfinite:
            # Non-finite updates are not skipped: count them so `poll` stops the run.
            self.consecutive = torch.where(
                nonfinite, self.consecutive.new_tensor(1 << 30), self.consecutive
            )
        self._stage_consecutive()
        return bad.float()

    def count_skip(self) -> None:
        """Record an update skipped for a reason the guard did not see (DeepSpeed's own overflow
        check), so the consecutive-skip limit covers it too."""
        self.skipped += 1
        self.consecutive += 1
        self._stage_consecutive()

    def _stage_consecutive(self) -> None:
        if self.device.type != "cuda":
            return
        if self._host_copy is None:
            self._host_copy = torch.empty((), dtype=torch.int64, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host_copy.copy_(self.consecutive, non_blocking=True)
        assert self._event is not None
        self._event.record()

    def consecutive_now(self) -> int | None:
        """Skipped updates in a row as far as the host can tell without waiting for the device:
        exact on CPU; on CUDA the value of the last step whose copy has landed (None if none)."""
        if self.device.type != "cuda":
            return int(self.consecutive)
        if self._event is None or not self._event.query():
            return None
        assert self._host_copy is not None
        return int(self._host_copy)

    def poll(self, step: int) -> None:
        """Raise once too many updates in a row were bad.

        Raises:
            BadStepsError: naming the step, the count and what to change.
        """
        n = self.consecutive_now()
        if n is None or n < self.cfg.max_consecutive_skips:
            return
        if n >= 1 << 30:
            raise BadStepsError(
                f"step {step}: the loss or gradient norm is not finite and guard.skip_nonfinite "
                "is false: lower --optim.lr, keep --optim.grad_clip > 0, try --train.dtype=fp32, "
                "or set --guard.skip_nonfinite=true to skip such updates"
            )
        raise BadStepsError(
            f"step {step}: {n} updates in a row were skipped as non-finite or spiking "
            f"(guard.max_consecutive_skips={self.cfg.max_consecutive_skips}): the run is not "
            "making progress. Resume from an earlier checkpoint with a lower --optim.lr, check "
            "the data of these steps, or raise --guard.spike_sigma"
        )
