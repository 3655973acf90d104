"""report.md of `kfm report`: runs and compute, config differences, benchmark scores with 95%
intervals, plots, data, notes. The same inputs give the same bytes (sorted keys, no dates,
paths relative to the report folder)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from eval.report.plots import Plot, Skipped
from eval.report.runs import Run
from eval.report.scores import Score, scores_from_metrics, scores_from_results

CARD_NAME = "DATA_CARD.md"  # data_pipeline/card.py writes it (eval does not import data_pipeline)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _rel(path: Path, out_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())


def _si(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "n/a" if x is None else str(x)
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    h, rest = divmod(round(s), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _float(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "n/a"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


# ---- runs and compute --------------------------------------------------------------------


def runs_section(runs: list[Run], out_dir: Path) -> list[str]:
    rows = []
    for run in runs:
        c = run.compute()
        steps = run.train_steps
        tokens = run.tokens_at(steps[-1]) if steps else None
        world = "/".join(str(w) for w in c.world_sizes) or "n/a"
        mean_world = c.device_s / c.wall_s if c.device_s and c.wall_s else None
        loss = run.last("loss")
        bpb = run.last("val_bpb") or run.last("val/bpb")
        rows.append(
            [
                run.label,
                f"`{_rel(run.path, out_dir)}`",
                (run.status or {}).get("state", "n/a"),
                steps[-1] if steps else 0,
                _si(tokens),
                _duration(c.wall_s),
                world,
                f"{c.device_s / 3600:.3g}" if c.device_s is not None else "n/a",
                _si(c.flops),
                _si(c.flops / mean_world if c.flops and mean_world else None),
                _float(loss[1]) if loss else "n/a",
                f"{_float(bpb[1])} (step {bpb[0]})" if bpb else "n/a",
            ]
        )
    header = [
        "run",
        "path",
        "status",
        "steps",
        "tokens",
        "wall time",
        "devices",
        "device-hours",
        "FLOPs (global)",
        "FLOPs per device",
        "final loss",
        "final val bpb",
    ]
    return [
        "## Runs and compute",
        "",
        *_table(header, rows),
        "",
        "Compute: *wall time* is the training loop's time, the sum of the logged step windows "
        "(steps, evaluations and checkpoints; start-up excluded); *device-hours* = each window's "
        "time x its world size (tokens_per_s_global / tokens_per_s_per_device), summed; "
        "*FLOPs (global)* = training FLOPs per token (kfm.model.flops: 6 x matmul weights + "
        "attention) x tokens seen, over all devices; *FLOPs per device* = global / world size.",
        "",
    ]


# ---- config differences ------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted key: value}; lists of mappings are indexed (``data.sources[0].path``),
    lists of scalars stay one value."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def config_diff(runs: list[Run]) -> dict[str, list[Any]]:
    """Dotted key -> each run's value, for the keys whose values are not all equal (a key absent
    from a run counts as different)."""
    flat = [flatten(run.config) for run in runs]
    absent = object()
    keys = sorted(set().union(*flat))
    diff = {}
    for key in keys:
        values = [f.get(key, absent) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff[key] = [v if v is not absent else "(absent)" for v in values]
    return diff


def _value(v: Any) -> str:
    if v == "(absent)":
        return "*absent*"
    return f"`{v if isinstance(v, str) else json.dumps(v)}`"


def config_section(runs: list[Run]) -> list[str]:
    lines = ["## Config differences", ""]
    if len(runs) < 2:
        return [*lines, "One run: nothing to compare.", ""]
    diff = config_diff(runs)
    if not diff:
        return [*lines, "The runs' resolved configs (config.yaml) are equal.", ""]
    rows = [[f"`{key}`", *(_value(v) for v in values)] for key, values in diff.items()]
    return [
        *lines,
        "Keys of the resolved configs (each run's config.yaml) whose values differ; equal keys "
        "are left out.",
        "",
        *_table(["key", *(r.label for r in runs)], rows),
        "",
    ]


# ---- benchmark scores --------------------------------------------------------------------


def _score_cell(s: Score | None) -> str:
    if s is None:
        return ""
    n = f", n={s.n}" if s.n else ""
    if s.interval is None:
        return f"{s.value:.4f}{n}"
    lo, hi = s.interval
    return f"{s.value:.4f} [{lo:.4f}, {hi:.4f}]{n}"


def _scores_table(runs: list[Run], per_run: list[tuple[str, list[Score]]]) -> list[str]:
    keys = sorted({(s.task, s.metric) for _, scores in per_run for s in scores})
    found = [{(s.task, s.metric): s for s in scores} for _, scores in per_run]
    rows = []
    for key in keys:
        chance = next(
            (f[key].chance for f in found if key in f and f[key].chance is not None), None
        )
        rows.append(
            [
                key[0],
                key[1],
                f"{chance:.4f}" if chance is not None else "",
                *(_score_cell(f.get(key)) for f in found),
            ]
        )
    header = [
        "task",
        "metric",
        "chance",
        *(f"{r.label} ({where})" for r, (where, _) in zip(runs, per_run, strict=True)),
    ]
    return _table(header, rows)


def scores_section(runs: list[Run]) -> list[str]:
    lines = ["## Benchmark scores", ""]
    final: list[tuple[str, list[Score]]] = []
    for run in runs:
        if run.results:
            step = max(run.results)
            limit = run.results[step]["kfm"].get("limit")
            where = f"step {step}" + (f", first {limit} items" if limit else "")
            final.append((where, scores_from_results(run.results[step])))
        else:
            final.append(("no results", []))
    in_loop: list[tuple[str, list[Score]]] = []
    for run in runs:
        steps = [
            s for s in sorted(run.metrics) if any(k.startswith("bench/") for k in run.metrics[s])
        ]
        in_loop.append(
            (f"step {steps[-1]}", scores_from_metrics(run.metrics[steps[-1]]))
            if steps
            else ("none", [])
        )
    if not any(scores for _, scores in final) and not any(scores for _, scores in in_loop):
        return [
            *lines,
            "No benchmark results: run `kfm eval RUN_DIR --tasks ...` (results in "
            "`RUN_DIR/eval/<step>/results.json`) or set `eval.tasks` for in-loop benchmarks.",
            "",
        ]
    method = (
        "Cells: value [95% interval], n = items scored. Accuracies (acc, acc_norm, exact_match) "
        "with a known n use the Wilson score interval; other metrics use value +- 1.96 x "
        "lm-eval's stderr; a metric with neither shows no interval."
    )
    if any(scores for _, scores in final):
        lines += [
            "Final scores: each run's newest results file (`eval/<step>/results.json`, "
            "kfm eval --tasks).",
            "",
            *_scores_table(runs, final),
            "",
        ]
    if any(scores for _, scores in in_loop):
        lines += [
            "Last in-loop values (`bench/<task>/<metric>` in metrics.jsonl: a fixed subset of "
            "eval.task_limit items, for trends; the results files above score whole sets).",
            "",
            *_scores_table(runs, in_loop),
            "",
        ]
    return [*lines, method, ""]


# ---- plots ---------------------------------------------------------------------------------


def plots_section(plots: list[Plot], skipped: list[Skipped]) -> list[str]:
    lines = ["## Plots", "", "x axis: tokens seen; one colour per run.", ""]
    for plot in plots:
        lines += [f"### {plot.title}", "", f"![{plot.title}]({plot.file})", ""]
        if plot.note:
            lines += [plot.note, ""]
    if skipped:
        lines += ["Not drawn (no run has the data):", ""]
        lines += [f"- {s.title}: {s.reason}" for s in skipped]
        lines.append("")
    return lines


# ---- data ----------------------------------------------------------------------------------


def _manifest(path: Path, cache: dict[Path, Any]) -> Any:
    if path not in cache:
        try:
            cache[path] = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache[path] = None
    return cache[path]


def data_cards(run: Run) -> list[Path]:
    """DATA_CARD.md files the run's data leads to: ``RUN/data/DATA_CARD.md`` (the quickstart's
    `kfm data run` output) and the card of a `kfm data run` folder holding a source's shard set
    (``<output_dir>/shards/<source>``)."""
    candidates = [run.path / "data" / CARD_NAME]
    for source in run.config.get("data", {}).get("sources", []) or []:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            shard_set = Path(source["path"])
            candidates += [shard_set.parent / CARD_NAME, shard_set.parent.parent / CARD_NAME]
    found: list[Path] = []
    for path in candidates:
        if path.is_file() and path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    return found


def data_section(runs: list[Run], out_dir: Path) -> list[str]:
    cache: dict[Path, Any] = {}
    rows: dict[tuple[Any, ...], list[str]] = {}
    for run in runs:
        for source in run.config.get("data", {}).get("sources", []) or []:
            if not isinstance(source, dict):
                continue
            path = Path(str(source.get("path", "")))
            manifest = _manifest(path, cache)
            licenses, docs, train, val = "n/a", "n/a", "n/a", "n/a"
            if isinstance(manifest, dict):
                parts = manifest.get("sources", [])
                licenses = (
                    ", ".join(sorted({str(p.get("license", "unknown")) for p in parts})) or "n/a"
                )
                docs = f"{sum(int(p.get('n_docs', 0)) for p in parts):,}"
                splits = manifest.get("splits", {})
                train = _si(splits.get("train", {}).get("n_tokens"))
                val = _si(splits.get("val", {}).get("n_tokens"))
            key = (
                source.get("name"),
                f"`{_rel(path, out_dir)}`",
                source.get("weight"),
                source.get("language", "n/a") or "n/a",
                licenses,
                docs,
                train,
                val,
            )
            rows.setdefault(key, []).append(run.label)
    lines = ["## Data", ""]
    if rows:
        everyone = [r.label for r in runs]
        table = [
            [", ".join(labels) if labels != everyone else "all", *key]
            for key, labels in rows.items()
        ]
        lines += [
            "Sources of each run's config and their shard manifests (tokens after packing).",
            "",
            *_table(
                [
                    "runs",
                    "source",
                    "path",
                    "weight",
                    "language",
                    "license",
                    "documents",
                    "train tokens",
                    "val tokens",
                ],
                table,
            ),
            "",
        ]
    cards: dict[Path, list[str]] = {}
    for run in runs:
        for card in data_cards(run):
            cards.setdefault(card, []).append(run.label)
    for card, labels in cards.items():
        lines += [f"Data card of {', '.join(labels)}: [{CARD_NAME}]({_rel(card, out_dir)})", ""]
        warnings = [
            ln
            for ln in card.read_text(encoding="utf-8").splitlines()
            if ln.startswith("> **WARNING")
        ]
        lines += [*warnings, ""] if warnings else []
    if not rows and not cards:
        lines += ["No data sources in the runs' configs.", ""]
    return lines


# ---- all -----------------------------------------------------------------------------------


def render(runs: list[Run], out_dir: Path, plots: list[Plot], skipped: list[Skipped]) -> str:
    """The whole report.md."""
    lines = [
        "# Training report",
        "",
        f"{len(runs)} run(s): " + ", ".join(f"**{r.label}**" for r in runs) + ". Written by "
        "`kfm report`; rerun it to refresh.",
        "",
        *runs_section(runs, out_dir),
        *config_section(runs),
        *scores_section(runs),
        *plots_section(plots, skipped),
        *data_section(runs, out_dir),
    ]
    notes = [(r.label, n) for r in runs for n in r.notes]
    if notes:
        lines += ["## Notes", "", *(f"- {label}: {note}" for label, note in notes), ""]
    return "\n".join(lines).rstrip("\n") + "\n"
