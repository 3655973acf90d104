"""The PNG plots of `kfm report`: one figure per quantity, tokens seen on the x axis, one colour
per run (the same colour in every figure), a legend naming the runs.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global
state). A figure is a grid of panels of fixed size, so its pixel size follows from its panel
count; a panel no run has data for is left out, and a figure with no panel is not drawn (the
report says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.report.runs import Run
from eval.report.scores import parse_bench_key, scores_from_results

PANEL_INCHES = (6.4, 3.6)
"""Width and height of one panel."""
DPI = 100
MAX_COLUMNS = 3
BENCH_METRICS = ("acc", "acc_norm", "exact_match")
"""The metric a benchmark panel shows: the first of these a task has, else its first by name."""


@dataclass(frozen=True, kw_only=True)
class Plot:
    """A figure written to ``file`` (in the report folder)."""

    file: str
    title: str
    panels: list[str]
    width_px: int
    height_px: int
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A figure not drawn because no run has its data."""

    title: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Line:
    label: str
    xs: list[float]
    ys: list[float]
    style: dict[str, Any]
    intervals: list[tuple[float, float] | None] | None = None
    """95% intervals drawn as error bars (None: no bar at that point)."""


@dataclass(frozen=True, kw_only=True)
class Panel:
    title: str
    ylabel: str
    lines: list[Line]
    hlines: dict[str, float]
    """Reference levels drawn across the panel, by label (a benchmark's chance level)."""
    log_y: bool = False
    eng_y: bool = False
    """Label the y axis with SI prefixes (17.5k instead of 17500)."""


def figure_size_px(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``n_panels`` panels."""
    cols = min(n_panels, MAX_COLUMNS)
    rows = math.ceil(n_panels / cols)
    return round(cols * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _has_points(line: Line) -> bool:
    return any(math.isfinite(y) for y in line.ys)


def _key_panel(runs: list[Run], key: str, title: str, ylabel: str, **kw: Any) -> Panel:
    lines = []
    for i, run in enumerate(runs):
        xs, ys = run.series(key)
        lines.append(Line(label=run.label, xs=xs, ys=ys, style={"color": _colour(i)}))
    return Panel(
        title=title, ylabel=ylabel, lines=[ln for ln in lines if _has_points(ln)], hlines={}, **kw
    )


def bpb_keys(runs: list[Run]) -> list[str]:
    """Validation bits-per-byte keys of any run: ``val_bpb`` (all sources) first, then per source,
    then per language (``val_bpb/<source>``, ``val_bpb/lang/<code>``; ``val/bpb...`` too)."""
    keys = {
        k
        for run in runs
        for k in run.metric_keys()
        if k in ("val_bpb", "val/bpb") or k.startswith(("val_bpb/", "val/bpb/"))
    }

    def order(k: str) -> tuple[int, str]:
        rest = k.split("bpb", 1)[1].lstrip("/")
        return (0 if not rest else 2 if rest.startswith("lang/") else 1, rest)

    return sorted(keys, key=order)


def _bpb_title(key: str) -> str:
    rest = key.split("bpb", 1)[1].lstrip("/")
    if not rest:
        return "all sources"
    return f"language {rest[len('lang/') :]}" if rest.startswith("lang/") else f"source {rest}"


@dataclass(kw_only=True)
class BenchSeries:
    """One metric of one task of one run against tokens seen, with 95% intervals (or None)."""

    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float] | None] = field(default_factory=list)


def bench_series(run: Run) -> dict[tuple[str, str], dict[str, BenchSeries]]:
    """(task, metric) -> {"results": ..., "in-loop": ...} of a run: results.json files
    (kfm eval --tasks, with the intervals of scores.py) and in-loop ``bench/<task>/<metric>``."""
    out: dict[tuple[str, str], dict[str, BenchSeries]] = {}
    for step in sorted(run.results):
        results = run.results[step]
        tokens = results["kfm"].get("tokens")
        x = float(tokens) if isinstance(tokens, int | float) else run.tokens_at(step)
        if x is None:
            continue
        for s in scores_from_results(results):
            series = out.setdefault((s.task, s.metric), {}).setdefault("results", BenchSeries())
            series.xs.append(x)
            series.ys.append(s.value)
            series.intervals.append(s.interval)
    for key in sorted(run.metric_keys()):
        parsed = parse_bench_key(key)
        if parsed is None or parsed[1].endswith("_stderr") or parsed[1] in ("n", "chance"):
            continue
        xs, ys = run.series(key)
        if xs:
            out.setdefault(parsed, {})["in-loop"] = BenchSeries(
                xs=xs, ys=ys, intervals=[None] * len(xs)
            )
    return out


def _chance(runs: list[Run], task: str) -> float | None:
    for run in runs:
        for step in sorted(run.results, reverse=True):
            value = run.results[step]["kfm"].get("chance", {}).get(task)
            if isinstance(value, int | float):
                return float(value)
        last = run.last(f"bench/{task}/chance")
        if last is not None and isinstance(last[1], int | float):
            return float(last[1])
    return None


def bench_panels(runs: list[Run]) -> list[Panel]:
    """One panel per task: its headline metric (BENCH_METRICS order) against tokens seen;
    results files as solid lines with dots, in-loop values dashed with crosses."""
    per_run = [bench_series(run) for run in runs]
    metrics: dict[str, set[str]] = {}
    for series in per_run:
        for task, metric in series:
            metrics.setdefault(task, set()).add(metric)
    panels = []
    for task in sorted(metrics):
        names = metrics[task]
        metric = next((m for m in BENCH_METRICS if m in names), min(names))
        lines = []
        for i, series in enumerate(per_run):
            found = series.get((task, metric), {})
            if "results" in found:
                r = found["results"]
                style = {"color": _colour(i), "marker": "o", "linestyle": "-"}
                lines.append(
                    Line(label=runs[i].label, xs=r.xs, ys=r.ys, style=style, intervals=r.intervals)
                )
            if "in-loop" in found:
                r = found["in-loop"]
                style = {"color": _colour(i), "marker": "x", "linestyle": "--"}
                label = f"{runs[i].label} (in-loop)"
                lines.append(Line(label=label, xs=r.xs, ys=r.ys, style=style))
        chance = _chance(runs, task)
        panels.append(
            Panel(
                title=f"{task}: {metric}",
                ylabel=metric,
                lines=[ln for ln in lines if _has_points(ln)],
                hlines={"chance": chance} if chance is not None else {},
            )
        )
    return [p for p in panels if p.lines]


@dataclass(frozen=True, kw_only=True)
class FigureSpec:
    file: str
    title: str
    panels: Callable[[list[Run]], list[Panel]]
    missing: str
    """Why the figure is absent when no run has its data."""
    note: str = ""


def _loss(runs: list[Run]) -> list[Panel]:
    return [_key_panel(runs, "loss", "training loss", "loss (nats/token)")]


def _lr(runs: list[Run]) -> list[Panel]:
    return [_key_panel(runs, "lr", "learning rate", "lr")]


def _grad_norm(runs: list[Run]) -> list[Panel]:
    return [
        _key_panel(runs, "grad_norm", "gradient norm (before clipping)", "grad norm", log_y=True)
    ]


def _throughput(runs: list[Run]) -> list[Panel]:
    return [
        _key_panel(runs, "tokens_per_s_per_device", "tokens/s per device", "tokens/s", eng_y=True),
        _key_panel(
            runs, "tokens_per_s_global", "tokens/s global (all devices)", "tokens/s", eng_y=True
        ),
    ]


def _bpb(runs: list[Run]) -> list[Panel]:
    return [
        _key_panel(runs, key, f"validation bits/byte: {_bpb_title(key)}", "bits/byte")
        for key in bpb_keys(runs)
    ]


FIGURES = (
    FigureSpec(
        file="loss.png", title="Training loss", panels=_loss, missing="no run logged `loss`"
    ),
    FigureSpec(file="lr.png", title="Learning rate", panels=_lr, missing="no run logged `lr`"),
    FigureSpec(
        file="grad_norm.png",
        title="Gradient norm",
        panels=_grad_norm,
        missing="no run logged `grad_norm`",
        note="Global L2 norm of the gradients before clipping (log scale).",
    ),
    FigureSpec(
        file="throughput.png",
        title="Throughput",
        panels=_throughput,
        missing="no run logged `tokens_per_s_per_device` or `tokens_per_s_global`",
        note="Left: tokens/s of one device (global / world size); right: tokens/s of all devices "
        "together. Each point is the mean over the steps since the previous log step, "
        "evaluations and checkpoints included.",
    ),
    FigureSpec(
        file="val_bpb.png",
        title="Validation bits per byte",
        panels=_bpb,
        missing="no run logged `val_bpb` (eval.interval)",
        note="Held-out bits per UTF-8 byte: over all sources, then per source and per language "
        "where the run logged them.",
    ),
    FigureSpec(
        file="benchmarks.png",
        title="Benchmark scores",
        panels=bench_panels,
        missing="no run has eval/*/results.json (kfm eval --tasks) or in-loop `bench/...` metrics "
        "(eval.tasks)",
        note="One panel per task, its first metric of "
        + ", ".join(BENCH_METRICS)
        + ". Solid with dots and 95% interval bars: results files (kfm eval --tasks); dashed with crosses: in-loop "
        "values (eval.tasks, a fixed subset of eval.task_limit items); dotted grey: chance.",
    ),
)


def draw(panels: list[Panel], path: Path) -> tuple[int, int]:
    """Draw ``panels`` into the PNG ``path``; returns its (width, height) in pixels."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ModuleNotFoundError as e:
        raise ImportError(
            f"kfm report draws its plots with matplotlib ({e.name} is missing): "
            "pip install 'kfm[eval]'"
        ) from None

    width, height = figure_size_px(len(panels))
    cols = min(len(panels), MAX_COLUMNS)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for line in panel.lines:
            marker = line.style.get("marker") or ("o" if len(line.xs) <= 2 else None)
            style = {**line.style, "marker": marker, "markersize": 4, "linewidth": 1.4}
            if line.intervals and any(line.intervals):
                below = [
                    y - iv[0] if iv else 0.0 for y, iv in zip(line.ys, line.intervals, strict=True)
                ]
                above = [
                    iv[1] - y if iv else 0.0 for y, iv in zip(line.ys, line.intervals, strict=True)
                ]
                ax.errorbar(
                    line.xs, line.ys, yerr=[below, above], capsize=3, label=line.label, **style
                )
            else:
                ax.plot(line.xs, line.ys, label=line.label, **style)
        for label, level in panel.hlines.items():
            ax.axhline(level, color="grey", linestyle=":", linewidth=1.2, label=label)
        if panel.log_y and all(y > 0 for ln in panel.lines for y in ln.ys if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if panel.eng_y:
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    # No Software/date metadata: the same data gives the same bytes.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return width, height


def draw_all(runs: list[Run], out_dir: Path) -> tuple[list[Plot], list[Skipped]]:
    """Every figure of FIGURES that some run has data for, as PNGs in ``out_dir``."""
    plots, skipped = [], []
    for spec in FIGURES:
        panels = [p for p in spec.panels(runs) if p.lines]
        if not panels:
            skipped.append(Skipped(title=spec.title, reason=spec.missing))
            continue
        width, height = draw(panels, out_dir / spec.file)
        plots.append(
            Plot(
                file=spec.file,
                title=spec.title,
                panels=[p.title for p in panels],
                width_px=width,
                height_px=height,
                note=spec.note,
            )
        )
    return plots, skipped
