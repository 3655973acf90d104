"""What `kfm report` reads from a training run directory (kfm/train/rundir.py writes it).

- ``config.yaml``: the resolved config (tokens per step, the model for FLOPs per token, the diff);
- ``metrics.jsonl``: one record per log step (kfm/train/loggers.py); a step logged again after a
  resume keeps its last value of each key;
- ``status.json``: the state of the last training process;
- ``eval/<step_dir>/results.json``: benchmark results of a checkpoint (eval/bench.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.bench import completeness
from kfm.config import ConfigError, ModelConfig, read_yaml
from kfm.config.loader import build_section
from kfm.fs import RUN_CONFIG, RUN_STATUS

METRICS_FILE = "metrics.jsonl"


class ReportError(ValueError):
    """`kfm report` cannot read an input or write its output; the message names it and the fix."""


@dataclass(kw_only=True)
class Compute:
    """The compute a run used, from its logged step times and throughput.

    The logged ``step_time_s`` of a log step is the mean over the steps since the previous log
    step, and that window includes evaluations and checkpoints: the windows add up to the wall
    time of the training loop (start-up and resume excluded). The world size of a window is
    ``tokens_per_s_global / tokens_per_s_per_device`` (kfm/train/callbacks.py Throughput), so a
    run resumed on another number of devices is counted right.
    """

    wall_s: float | None
    """Seconds in the training loop, summed over the logged windows."""
    device_s: float | None
    """Device-seconds: each window's seconds times its world size."""
    world_sizes: list[int]
    """The world sizes the run's windows were logged with (several after an elastic resume)."""
    flops: float | None
    """Training FLOPs of all devices together: flops_per_token x tokens seen."""
    flops_per_token: float | None


@dataclass(kw_only=True)
class Run:
    """One training run as the report sees it."""

    label: str
    path: Path
    config: dict[str, Any]
    metrics: dict[int, dict[str, Any]]
    """step -> every key logged at that step (the last value of each, after a resume)."""
    status: dict[str, Any] | None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    """step -> benchmark results (``eval/<step_dir>/results.json``)."""
    results_files: dict[int, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the report should say about this run's inputs (skipped lines, unknown figures)."""

    @property
    def tokens_per_step(self) -> int | None:
        train, data = self.config.get("train", {}), self.config.get("data", {})
        batch, seq_len = train.get("global_batch_size"), data.get("seq_len")
        return batch * seq_len if isinstance(batch, int) and isinstance(seq_len, int) else None

    def tokens_at(self, step: int) -> float | None:
        """Tokens seen after ``step``: the logged ``tokens`` if any, else step x batch tokens."""
        logged = _as_float(self.metrics.get(step, {}).get("tokens"))
        if logged is not None:
            return logged
        per_step = self.tokens_per_step
        return float(step * per_step) if per_step is not None else None

    def metric_keys(self) -> set[str]:
        return {k for record in self.metrics.values() for k in record}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(tokens seen, value) of every step that logged ``key`` as a number, by step;
        non-finite values become NaN (a gap in a line plot)."""
        xs, ys = [], []
        for step in sorted(self.metrics):
            value = _as_float(self.metrics[step].get(key))
            tokens = self.tokens_at(step)
            if value is not None and tokens is not None:
                xs.append(tokens)
                ys.append(value if math.isfinite(value) else math.nan)
        return xs, ys

    def last(self, key: str) -> tuple[int, Any] | None:
        """(step, value) of the last step that logged ``key``."""
        steps = [s for s in sorted(self.metrics) if key in self.metrics[s]]
        return (steps[-1], self.metrics[steps[-1]][key]) if steps else None

    @property
    def train_steps(self) -> list[int]:
        """Steps with a training record (a ``loss``), in order."""
        return [s for s in sorted(self.metrics) if "loss" in self.metrics[s]]

    def compute(self) -> Compute:
        wall = device = 0.0
        sizes: set[int] = set()
        previous = 0
        timed = False
        for step in self.train_steps:
            record = self.metrics[step]
            step_s = _as_float(record.get("step_time_s"))
            if step_s is not None and math.isfinite(step_s):
                window = step_s * (step - previous)
                world = _world_size(record)
                wall += window
                device += window * world
                sizes.add(world)
                timed = True
            previous = step
        last = self.train_steps[-1] if self.train_steps else None
        tokens = self.tokens_at(last) if last is not None else None
        per_token = self._flops_per_token()
        return Compute(
            wall_s=wall if timed else None,
            device_s=device if timed else None,
            world_sizes=sorted(sizes),
            flops=per_token * tokens if per_token is not None and tokens is not None else None,
            flops_per_token=per_token,
        )

    def _flops_per_token(self) -> float | None:
        from kfm.model.flops import flops_per_token

        try:
            model = build_section(ModelConfig, self.config.get("model", {}), "model")
        except ConfigError as e:
            note = f"FLOPs unknown: the model section of config.yaml: {e}"
            if note not in self.notes:
                self.notes.append(note)
            return None
        seq_len = self.config.get("data", {}).get("seq_len")
        return flops_per_token(model, seq_len) if isinstance(seq_len, int) else None


def _as_float(value: Any) -> float | None:
    """A logged number as a float (NaN and infinities included); None for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _world_size(record: dict[str, Any]) -> int:
    """Devices of a log window: global over per-device throughput (1 if not logged)."""
    glob = _as_float(record.get("tokens_per_s_global"))
    per_device = _as_float(record.get("tokens_per_s_per_device"))
    if glob is not None and per_device is not None and per_device > 0 and math.isfinite(glob):
        return max(1, round(glob / per_device))
    return 1


def read_metrics(path: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """step -> merged record of ``metrics.jsonl``, and the number of unreadable lines skipped
    (a line cut short by a crash). Later lines win per key: a resumed run logs steps again."""
    merged: dict[int, dict[str, Any]] = {}
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # NaN and Infinity as Python's json writes them
                step = record["step"]
            except (ValueError, TypeError, KeyError):
                bad += 1
                continue
            if not isinstance(step, int):
                bad += 1
                continue
            merged.setdefault(step, {}).update({k: v for k, v in record.items() if k != "step"})
    return merged, bad


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_results(run_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[int, Path], list[str]]:
    """step -> benchmark results of ``run_dir/eval/<step_dir>/results*.json``, the files, and
    notes on files skipped. A step with several files (other --limit or --num-fewshot settings)
    keeps the one that scored the most items (`eval.bench.completeness`)."""
    results: dict[int, dict[str, Any]] = {}
    files: dict[int, Path] = {}
    notes = []
    for path in sorted((run_dir / "eval").glob("*/results*.json")):
        data = _read_json(path)
        meta = data.get("kfm") if isinstance(data, dict) else None
        step = meta.get("step") if isinstance(meta, dict) else None
        if not isinstance(step, int) or not isinstance(data.get("results"), dict):
            notes.append(f"skipped {path.relative_to(run_dir)}: not a kfm benchmark result")
            continue
        if step in results:
            keep, drop = (files[step], path)
            if completeness(path, data) > completeness(files[step], results[step]):
                keep, drop = path, files[step]
                results[step], files[step] = data, path
            notes.append(
                f"step {step}: shows {keep.relative_to(run_dir)}, not {drop.relative_to(run_dir)} "
                "(fewer items or other settings)"
            )
            continue
        results[step], files[step] = data, path
    return results, files, notes


def load_run(path: str | Path, label: str) -> Run:
    """Read the run directory ``path``.

    Raises:
        ReportError: ``path`` is not a training run directory (no config.yaml) or has no
            metrics.jsonl.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"{path}: no such run directory (give runs/<name>, as kfm train made it)")
    if not (run_dir / RUN_CONFIG).is_file():
        raise ReportError(
            f"{path} is not a training run directory: it has no {RUN_CONFIG} "
            "(give runs/<name>, the folder kfm train writes)"
        )
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(
            f"{path} has no {METRICS_FILE}: the run logged nothing yet, or ran with "
            "logging.jsonl=false (the report reads metrics.jsonl)"
        )
    try:
        config = read_yaml(run_dir / RUN_CONFIG)
    except ConfigError as e:
        raise ReportError(f"{path}: {e}") from None
    metrics, bad = read_metrics(metrics_path)
    status = _read_json(run_dir / RUN_STATUS)
    results, files, notes = read_results(run_dir)
    if bad:
        notes.insert(0, f"{bad} unreadable line(s) of {METRICS_FILE} skipped")
    run = Run(
        label=label,
        path=run_dir,
        config=config,
        metrics=metrics,
        status=status if isinstance(status, dict) else None,
        results=results,
        results_files=files,
        notes=notes,
    )
    losses = [_as_float(r.get("loss")) for r in metrics.values()]
    nonfinite = sum(1 for x in losses if x is not None and not math.isfinite(x))
    if nonfinite:
        run.notes.append(f"{nonfinite} non-finite training loss value(s), drawn as gaps")
    return run


def labels_for(paths: list[Path], labels: list[str] | None) -> list[str]:
    """The legend label of each run: ``labels`` if given, else the run directory's name
    (with its parent's name where two runs share a name).

    Raises:
        ReportError: ``labels`` has another length than ``paths`` or repeats a label.
    """
    if labels is not None:
        if len(labels) != len(paths):
            raise ReportError(
                f"--labels has {len(labels)} label(s) for {len(paths)} run(s): give one per "
                "RUN_DIR, comma-separated, in the same order"
            )
        if not all(labels):
            raise ReportError(f"--labels has an empty label ({','.join(labels)}): name every run")
        if len(set(labels)) != len(labels):
            raise ReportError(f"--labels repeats a label ({','.join(labels)}): give unique ones")
        return labels
    names = [p.resolve().name for p in paths]
    out = [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):  # still equal (the same run twice): number them
        seen[name] = seen.get(name, 0) + 1
        if out.count(name) > 1:
            out[i] = f"{name} ({seen[name]})"
    return out
