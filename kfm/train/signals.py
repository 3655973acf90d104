"""SIGTERM / SIGUSR1 -> finish the current step, save a checkpoint and exit cleanly.

Slurm sends SIGUSR1 (``--signal``, see launch/slurm/README.md) or SIGTERM before killing a job;
a handler only sets a flag, and the ranks agree on it between steps (`StopRequest.agreed`), so a
checkpoint is never half-written and every rank stops after the same step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


class StopRequest:
    """Installs handlers for the given signals; ``requested`` turns True when one arrives here."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a signal (collective, every step).

        One scalar all-reduce per step. On CPU (gloo) its result is read at once. On CUDA the
        result lands in pinned host memory without a sync and is read one step later, so the
        ranks stop one step after the signal, still all after the same step, and the step loop
        never waits for the device because of it.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor(int(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if device.type != "cuda":
            return bool(flag.item())
        previous = False
        if self._event is not None:
            self._event.synchronize()  # recorded a step ago: long done
            assert self._host is not None
            previous = bool(self._host.item())
        else:
            self._host = torch.zeros((), dtype=flag.dtype, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host.copy_(flag, non_blocking=True)
        self._event.record()
        return previous

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
