"""SIGTERM / SIGUSR1 -> finish the current step, save a checkpoint and exit cleanly.

Slurm sends SIGUSR1 (with `--signal=USR1@120`) or SIGTERM before killing a job at its time limit;
a handler only sets a flag, the loop checks it between steps so a checkpoint is never half-written.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Installs handlers for the given signals; ``requested`` turns True when one arrives."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
