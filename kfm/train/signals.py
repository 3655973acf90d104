"""SIGTERM / SIGUSR1 / SIGINT -> finish the current step, save a checkpoint and exit cleanly.

Slurm sends SIGUSR1 (``--signal``, see launch/slurm/README.md) or SIGTERM before killing a job;
Ctrl-C sends SIGINT. A handler only sets a flag, and the ranks agree on it between steps
(`StopRequest.agreed`), so a checkpoint is never half-written and every rank stops after the same
step. Repeated SIGTERM/SIGUSR1 (the Slurm relay repeats them) change nothing; a second Ctrl-C
raises KeyboardInterrupt at once (the save in flight is abandoned; the previous checkpoint stays).

Under torchrun a Ctrl-C at the terminal reaches every process of the foreground group: each rank
gets it directly, and torchrun, which handles SIGINT itself, forwards another SIGINT to its
workers and SIGKILLs them after its shutdown timeout (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s).
A SIGINT within ``SAME_KEYPRESS_S`` of the first is taken for that forwarded copy, not for a
second Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_KEYPRESS_S = 1.0
"""SIGINTs this close to the first one count as the same Ctrl-C (torchrun's forwarded copy)."""


class StopRequest:
    """Installs handlers for the given signals; ``requested`` turns True when one arrives here."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.requested = False
        self.signal_name: str | None = None
        self._first_sigint: float | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > SAME_KEYPRESS_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            if self._first_sigint is None:
                self._first_sigint = now
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

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
