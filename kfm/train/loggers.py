"""Metric sinks: console (+ progress bar), metrics.jsonl, TensorBoard and wandb (offline by default).

metrics.jsonl records every metric at full precision; the console shows one line per log step
in a readable precision with the estimated time left (`step_line`), and a tqdm bar when stderr
is a terminal (never in log files). ``kfm -q`` keeps the console to warnings.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfm.config import Config, LoggingConfig, to_dict
from kfm.console import NORMAL, verbosity
from kfm.fs import atomic_write_text


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def _duration(s: float) -> str:
    """H:MM:SS (D days, H:MM:SS past a day)."""
    days, rest = divmod(int(s + 0.5), 86400)
    h, rest = divmod(rest, 3600)
    clock = f"{h}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


# How the console shows each metric (metrics.jsonl keeps every key, at full precision). A
# formatter returning None leaves the field out of the line.
_CONSOLE: dict[str, Callable[[Any], str | None]] = {
    "loss": lambda v: f"loss {v:.4f}",
    "val_loss": lambda v: f"val_loss {v:.4f}",
    "val_bpb": lambda v: f"val_bpb {v:.4f}",
    "val_tokens": lambda v: f"val_tokens {v:,}",
    # The weight EMA (train.ema_decay): its val_bpb only; metrics.jsonl keeps the breakdown.
    "ema/val_bpb": lambda v: f"ema val_bpb {v:.4f}",
    "ema/val_loss": lambda v: None,
    "grad_norm": lambda v: f"grad_norm {v:.3f}" if v >= 1e-3 else f"grad_norm {v:.2e}",
    "lr": lambda v: f"lr {v:.2e}",
    "skipped": lambda v: "update SKIPPED" if v else None,
    "skipped_total": lambda v: f"skipped_total {v:,}" if v else None,
    "step_time_s": lambda v: f"{_seconds(v)}/step",
    "tokens_per_s_global": lambda v: f"{v:,.0f} tok/s",
    "tokens_per_s_per_device": lambda v: f"{v:,.0f} tok/s/device",
    "tflops_per_device": lambda v: f"{v:.3g} TFLOP/s/device",
    "mfu": lambda v: f"mfu {v:.1%}" if v is not None else None,
    "peak_memory_gb": lambda v: f"mem {v:.2f} GB",
}
_CONSOLE_LAST: dict[str, Callable[[Any], str | None]] = {
    "val_time_s": lambda v: f"val took {_seconds(v)}",
    "bench_time_s": lambda v: f"bench took {_seconds(v)}",
    "ema/val_time_s": lambda v: f"ema val took {_seconds(v)}",
}


def _grouped(shown: dict[str, Any]) -> list[str]:
    """Evaluation metrics that come in families, one field per family (removed from
    ``shown``): ``lang en 1.4812 ko 1.6023`` (val_bpb/lang/<code>), ``source medquad 1.4102 ...``
    (val_bpb/<source>), ``<task> acc 0.5500 acc_norm 0.6000`` (bench/<task>/<metric>, without
    the stderrs and item counts n, which metrics.jsonl keeps)."""
    langs = {k: shown.pop(k) for k in [k for k in shown if k.startswith("val_bpb/lang/")]}
    per_source = {k: shown.pop(k) for k in [k for k in shown if k.startswith("val_bpb/")]}
    for k in [k for k in shown if k.startswith("ema/val_bpb/")]:
        del shown[k]  # the EMA's per-source/language figures: metrics.jsonl only
    bench: dict[str, list[str]] = {}
    for k in [k for k in shown if k.startswith("bench/")]:
        task, _, metric = k.removeprefix("bench/").rpartition("/")
        value = shown.pop(k)
        if not metric.endswith("_stderr") and metric != "n" and isinstance(value, int | float):
            bench.setdefault(task, []).append(f"{metric} {value:.4f}")
    parts = []
    if langs:
        parts.append("lang " + " ".join(f"{k[13:]} {v:.4f}" for k, v in langs.items()))
    if per_source:
        parts.append("source " + " ".join(f"{k[8:]} {v:.4f}" for k, v in per_source.items()))
    parts += [f"{task} {' '.join(values)}" for task, values in bench.items()]
    return parts


def step_line(
    step: int, metrics: dict[str, Any], *, total_steps: int, eta_s: float | None = None
) -> str:
    """One console line for ``metrics`` of ``step``: the known metrics in a fixed order and
    precision (loss 4 decimals, tokens/s whole with thousands separators, mfu in %), then the
    evaluation families (`_grouped`), then any other metric, then how long the evaluation took
    and the estimated time to the last step."""
    shown = dict(metrics)
    if shown.get("tokens_per_s_per_device") == shown.get("tokens_per_s_global"):
        shown.pop("tokens_per_s_per_device", None)  # one device: the same number twice
    grouped = _grouped(shown)
    last = [f(shown.pop(k)) for k, f in _CONSOLE_LAST.items() if k in shown]
    parts = [f(shown[k]) for k, f in _CONSOLE.items() if k in shown]
    parts += grouped
    parts += [f"{k} {_fmt(v)}" for k, v in shown.items() if k not in _CONSOLE]
    parts += last
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    width = len(str(total_steps))
    head = f"step {step:>{width}d}/{total_steps}"
    return " | ".join([head, *(p for p in parts if p is not None)])


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
        self.total_steps = total_steps
        self._console = verbosity() >= NORMAL  # kfm -q: warnings and the final result only
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        # ETA from the pace since the first training step logged here: that pace includes
        # evaluations and checkpoints, and leaves out start-up (build, compile, resume).
        self._pace_from: tuple[int, float] | None = None
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
        if lc.progress_bar and self._console and sys.stderr.isatty():
            # A terminal only: in a log file (Slurm, CI, nohup) a bar is a stream of redraws.
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                disable=False,  # kfm_cli sets TQDM_DISABLE for libraries' bars, not this one
            )

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
        if console and self._console:
            self._write(
                step_line(
                    step, metrics, total_steps=self.total_steps, eta_s=self._eta(step, metrics)
                )
            )

    def _eta(self, step: int, metrics: dict[str, Any]) -> float | None:
        if "loss" not in metrics:  # evaluation lines
            return None
        now = time.monotonic()
        if self._pace_from is None:
            self._pace_from = (step, now)
            return None
        first_step, first_t = self._pace_from
        if step <= first_step:
            return None
        return (self.total_steps - step) * (now - first_t) / (step - first_step)

    def _write(self, line: str) -> None:
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
        """A progress message (rank 0; not with kfm -q)."""
        if self.enabled and self._console:
            self._write(message)

    def warning(self, message: str) -> None:
        """A message the user should see even with kfm -q (rank 0)."""
        if self.enabled:
            self._write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
