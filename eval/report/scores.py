"""Benchmark scores of a run with 95% confidence intervals, from lm-eval results
(``eval/<step_dir>/results.json``) and from in-loop metrics (``bench/<task>/<metric>``).

Accuracies (the mean of a 0/1 score per item: ``acc``, ``acc_norm``, ``exact_match``) with a
known item count n get a Wilson score interval, which stays inside [0, 1] and is right for the
small n of a ``--limit`` subset; other metrics get the normal interval value +- 1.96 x stderr
from lm-eval's stderr; a metric with neither gets no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""
ACCURACIES = frozenset({"acc", "acc_norm", "exact_match"})
"""lm-eval metrics that are a fraction of items scored 1 (each item scores 0 or 1)."""
_NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples"})


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed over ``n`` items.

    center = (p + z^2 / 2n) / (1 + z^2 / n),
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).

    Raises:
        ValueError: ``n`` < 1 or ``p`` outside [0, 1].
    """
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson_interval needs n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def normal_interval(value: float, stderr: float, z: float = Z95) -> tuple[float, float]:
    """value +- z x stderr."""
    return value - z * stderr, value + z * stderr


@dataclass(frozen=True, kw_only=True)
class Score:
    """One metric of one task, with its 95% interval and how it was computed."""

    task: str
    metric: str
    value: float
    n: int | None
    stderr: float | None
    chance: float | None
    interval: tuple[float, float] | None
    method: str
    """"Wilson", "1.96 stderr" or "none"."""


def score(
    task: str,
    metric: str,
    value: float,
    *,
    n: int | None,
    stderr: float | None,
    chance: float | None,
) -> Score:
    """A :class:`Score` with the interval the module docstring describes."""
    interval: tuple[float, float] | None = None
    method = "none"
    base = metric.split(" ")[0]
    if base in ACCURACIES and n and 0.0 <= value <= 1.0:
        interval, method = wilson_interval(value, n), "Wilson"
    elif stderr is not None and math.isfinite(stderr):
        interval, method = normal_interval(value, stderr), "1.96 stderr"
    return Score(
        task=task,
        metric=metric,
        value=value,
        n=n,
        stderr=stderr,
        chance=chance,
        interval=interval,
        method=method,
    )


def _float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _n_items(results: dict[str, Any], task: str) -> int | None:
    """Items scored for ``task``: lm-eval's n-samples "effective" (the --limit subset), summed
    over a group's subtasks."""
    counts = results.get("n-samples", {})
    entry = counts.get(task)
    if isinstance(entry, dict) and isinstance(entry.get("effective"), int):
        return entry["effective"]
    subtasks = results.get("group_subtasks", {}).get(task)
    if subtasks:
        parts = [_n_items(results, t) for t in subtasks]
        if all(isinstance(p, int) for p in parts):
            return sum(p for p in parts if p is not None)
    return None


def scores_from_results(results: dict[str, Any]) -> list[Score]:
    """Every numeric metric of every task and group in an lm-eval results dict (plus kfm's
    ``kfm.chance``), sorted by task then metric. Keys are ``"<metric>,<filter>"``; the metric is
    named alone for lm-eval's default filter "none", else ``"<metric> (<filter>)"``."""
    chance = (
        results.get("kfm", {}).get("chance", {}) if isinstance(results.get("kfm"), dict) else {}
    )
    out = []
    tables = [results.get("results", {}), results.get("groups", {})]
    seen: set[tuple[str, str]] = set()
    for table in tables:
        for task, entry in sorted(table.items()):
            if not isinstance(entry, dict):
                continue
            n = _n_items(results, task)
            for key, raw in sorted(entry.items()):
                metric, _, filt = key.partition(",")
                value = _float(raw)
                if metric in _NOT_METRICS or metric.endswith("_stderr") or value is None:
                    continue
                name = metric if filt in ("", "none") else f"{metric} ({filt})"
                if (task, name) in seen:  # a group listed in both tables
                    continue
                seen.add((task, name))
                stderr = _float(
                    entry.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
                )
                out.append(
                    score(task, name, value, n=n, stderr=stderr, chance=_float(chance.get(task)))
                )
    return out


def scores_from_metrics(record: dict[str, Any]) -> list[Score]:
    """Scores of an in-loop metrics record: ``bench/<task>/<metric>`` values, with
    ``bench/<task>/<metric>_stderr`` and ``bench/<task>/n`` when logged."""
    out = []
    for key, raw in sorted(record.items()):
        parsed = parse_bench_key(key)
        value = _float(raw)
        if parsed is None or value is None:
            continue
        task, metric = parsed
        if metric.endswith("_stderr") or metric in ("n", "chance"):
            continue
        n = record.get(f"bench/{task}/n")
        out.append(
            score(
                task,
                metric,
                value,
                n=n if isinstance(n, int) and not isinstance(n, bool) else None,
                stderr=_float(record.get(f"bench/{task}/{metric}_stderr")),
                chance=_float(record.get(f"bench/{task}/chance")),
            )
        )
    return out


def parse_bench_key(key: str) -> tuple[str, str] | None:
    """``"bench/<task>/<metric>"`` -> (task, metric); None for other keys."""
    if not key.startswith("bench/"):
        return None
    task, sep, metric = key[len("bench/") :].rpartition("/")
    return (task, metric) if sep and task and metric else None
