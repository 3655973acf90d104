"""Debug aids for tests and drills: fault injection (``debug.faults``) and the batch trace
(``debug.trace_batches``).

``debug.faults`` is a documented debug option for tests, fire drills and checking that
monitoring, the guard, the watchdog and requeueing react as they should. It is never for
production runs: every fault it injects breaks the run on purpose. Each entry reads
``KIND@STEPS[:rRANK][=VALUE]`` (syntax and parsing: kfm/config/faults.py; docs/training.md,
"Fault injection (debug.faults)"):

    nan       the model's output logits are NaN on the matching steps (and ranks): the loss and
              the gradients are non-finite, so the bad-step guard skips the update
    spike     the logits are multiplied by VALUE (default 1000): a loss spike
    sleep     the rank sleeps VALUE seconds (default 1) at the start of each matching step: a
              straggler, which the straggler report names
    hang      the rank blocks forever at the start of the matching step: the others then block
              in the step's first collective and every rank's watchdog fires
    sigkill   after the matching step (its checkpoint, if any, made final first) the process
              SIGKILLs itself: a crash without any cleanup, as a node failure looks

``nan`` and ``spike`` act only on training forwards (the module in training mode), not on an
evaluation run in the same step.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kfm.config.faults import FaultSpec, parse_fault
from kfm.train.backends.base import Backend
from kfm.train.callbacks import Callback, StepInfo


class FaultInjector(Callback):
    """Injects the faults of ``debug.faults`` that apply to this rank at their steps."""

    def __init__(self, faults: list[str], backend: Backend, rank: int) -> None:
        self.specs: list[FaultSpec] = [parse_fault(f) for f in faults]
        self.backend = backend
        self.rank = rank
        self._handles: list[RemovableHandle] = []

    def _active(self, step: int, kind: str) -> list[FaultSpec]:
        return [s for s in self.specs if s.kind == kind and s.applies(step, self.rank)]

    def on_step_start(self, step: int) -> None:
        self._remove_hooks()  # a step that raised never reached on_step_end
        for _ in self._active(step, "nan"):
            self._handles.append(self.backend.module.register_forward_hook(_scale_hook(None)))
        for spec in self._active(step, "spike"):
            self._handles.append(self.backend.module.register_forward_hook(_scale_hook(spec.value)))
        for spec in self._active(step, "sleep"):
            time.sleep(spec.value)
        if self._active(step, "hang"):
            # Blocks this rank for good: the other ranks wait in the step's first collective and
            # the watchdog (kfm/train/health.py) of every rank dumps its stacks and exits.
            _hang_forever()

    def on_step_end(self, info: StepInfo) -> None:
        self._remove_hooks()
        if self._active(info.step, "sigkill"):
            # The step's checkpoint (written by Checkpointing before this component) must be
            # final before the crash, or the drill tests a torn save rather than a lost node.
            self.backend.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, step: int, error: BaseException | None) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _scale_hook(value: float | None) -> Any:
    """A forward hook returning the output times ``value`` (None: NaN) in training mode."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or not isinstance(output, torch.Tensor):
            return None  # evaluation in the same step, or an output this hook does not know
        if value is None:
            return output * float("nan")
        return output * value

    return hook


def _hang_forever() -> None:
    """Block the calling thread forever (the fault ``hang``; named so stack dumps show it)."""
    threading.Event().wait()


class BatchTrace:
    """The loader as the backend sees it with ``debug.trace_batches=DIR``: before handing each
    micro-batch on, appends to ``DIR/batches_rank{rank}.jsonl`` one JSON line
    ``{"start": samples consumed before it (global), "dp_rank": the loader's rank, "rows": [first
    16 hex digits of the sha1 of each row's tokens]}`` (tests compare sample order and coverage
    across layouts and resumes with it)."""

    def __init__(self, loader: Any, directory: Path, rank: int) -> None:
        self.loader = loader
        self.path = Path(directory) / f"batches_rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- lives with the run

    @property
    def samples_consumed(self) -> int:
        return int(self.loader.samples_consumed)

    @property
    def rank(self) -> int:
        return int(self.loader.rank)

    def next_batch(self) -> Any:
        start = self.loader.samples_consumed
        batch = self.loader.next_batch()
        rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch.tokens]
        record = {"start": start, "dp_rank": self.loader.rank, "rows": rows}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return batch

    def close(self) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else (state_dict, ...) is the loader's.
        if name in ("loader", "_file", "path"):
            raise AttributeError(name)
        return getattr(self.loader, name)
