"""Metric sinks: console (+ progress bar), metrics.jsonl, TensorBoard and wandb (offline by default)."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from kfm.config import Config, LoggingConfig, to_dict
from kfm.fs import atomic_write_text


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run directory: made once and kept in ``run_dir/wandb_id``, so
    every restart of the run logs into the same wandb run instead of opening a new one."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, run_id + "\n")
    return run_id


class MetricLogger:
    """Fans one dict of scalars per step out to every enabled sink (rank 0 only)."""

    def __init__(
        self, cfg: Config, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool = True
    ) -> None:
        lc: LoggingConfig = cfg.logging
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        if lc.jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if lc.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs wandb: pip install wandb") from e
            # Offline unless the user chose otherwise: clusters often have no internet, and a run
            # must never block on a login prompt. `wandb sync runs/<name>/wandb/offline-run-*` later.
            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(
                project=lc.wandb_project,
                name=cfg.train.name,
                id=wandb_run_id(run_dir),
                dir=str(run_dir),
                config=to_dict(cfg),
                resume="allow",  # a restart (resume, Slurm requeue) continues the same run
            )
        if lc.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
        """Record ``metrics`` (scalars or None) for ``step`` in every sink."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        scalars = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if console:
            line = f"step {step:>6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        """Move the progress bar (no-op without a TTY)."""
        if self._bar is not None:
            self._bar.update(n)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
