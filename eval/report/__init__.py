"""`kfm report RUN_DIR [RUN_DIR ...]`: PNG plots and one report.md comparing training runs.

- runs.py: what a run directory holds (config.yaml, metrics.jsonl, status.json, results.json);
- plots.py: the figures (loss, lr, grad norm, throughput, validation bpb, benchmarks);
- scores.py: benchmark scores with 95% intervals (Wilson for accuracies, else 1.96 stderr);
- markdown.py: report.md.

The report folder is built beside its destination and renamed into place (kfm.fs.publish_dir);
``kfm_report.json`` marks it, so a later `kfm report` may replace it, and no other folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from eval.report.markdown import render
from eval.report.plots import Plot, Skipped, draw_all
from eval.report.runs import ReportError, Run, labels_for, load_run
from kfm.fs import REPORT_MARKER, atomic_write_text, check_output_dir, output_kind, publish_dir

__all__ = ["Report", "ReportError", "Run", "load_run", "write_report"]

REPORT_NAME = "report.md"
REPORT_FORMAT = "kfm-report"


@dataclass(frozen=True, kw_only=True)
class Report:
    """What `kfm report` wrote."""

    out: Path
    report: Path
    plots: list[Plot]
    skipped: list[Skipped]
    replaced: bool
    """An earlier kfm report in ``out`` was replaced."""


def write_report(
    run_dirs: list[str | Path], *, out: str | Path | None = None, labels: list[str] | None = None
) -> Report:
    """Read the runs, draw the plots and write ``report.md`` into ``out`` (default
    ``<first run>/report``).

    ``out`` may lie inside a run directory, never be one or hold anything but an earlier kfm
    report (which is replaced once the new one is complete).

    Raises:
        ReportError: a RUN_DIR is not a run directory, or ``labels`` does not fit the runs.
        kfm.fs.OutputError: ``out`` is a run, checkpoint or a folder that is not a kfm report.
    """
    if not run_dirs:
        raise ReportError("kfm report needs at least one RUN_DIR")
    paths = [Path(p) for p in run_dirs]
    names = labels_for(paths, labels)
    runs = [load_run(p, name) for p, name in zip(paths, names, strict=True)]
    target = check_output_dir(
        out if out is not None else paths[0] / "report", "report", overwrite=True, flag="--out"
    )
    replaced = output_kind(target) == "report"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Paths in report.md are relative to the final folder: compute them against ``target``.
        plots, skipped = draw_all(runs, tmp)
        atomic_write_text(tmp / REPORT_NAME, render(runs, target, plots, skipped))
        marker = {
            "format": REPORT_FORMAT,
            "runs": [os.path.relpath(r.path.resolve(), target) for r in runs],
            "labels": names,
            "plots": [p.file for p in plots],
        }
        atomic_write_text(tmp / REPORT_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
        publish_dir(tmp, target, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Report(
        out=target, report=target / REPORT_NAME, plots=plots, skipped=skipped, replaced=replaced
    )
