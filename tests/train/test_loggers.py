"""Console step lines: fixed precision, an ETA, metrics.jsonl untouched, -q keeps them off."""

from __future__ import annotations

import json

import pytest

from kfm.config import load_config
from kfm.console import QUIET, VERBOSITY_ENV
from kfm.train.loggers import MetricLogger, step_line
from tests.conftest import REPO

METRICS = {
    "loss": 6.719812345,
    "grad_norm": 0.79551,
    "lr": 0.004,
    "skipped": False,
    "skipped_total": 0,
    "step_time_s": 0.0573,
    "tokens_per_s_global": 8942.6527,
    "tokens_per_s_per_device": 8942.6527,
    "tflops_per_device": 0.0097,
    "mfu": 0.4123,
    "peak_memory_gb": 0.3919,
}


def test_step_line_precision_and_eta() -> None:
    line = step_line(5, METRICS, total_steps=1000, eta_s=3725.2)
    assert line == (
        "step    5/1000 | loss 6.7198 | grad_norm 0.796 | lr 4.00e-03 | 0.057 s/step | "
        "8,943 tok/s | 0.0097 TFLOP/s/device | mfu 41.2% | mem 0.39 GB | eta 1:02:05"
    )
    # More than one device: the per-device rate is its own number; a skipped update shows.
    multi = {**METRICS, "tokens_per_s_per_device": 1117.8, "skipped": True, "skipped_total": 3}
    line = step_line(5, multi, total_steps=10, eta_s=None)
    assert "8,943 tok/s | 1,118 tok/s/device" in line
    assert "update SKIPPED | skipped_total 3" in line and "eta" not in line
    # Metrics the table does not know keep their name; an unknown mfu (no peak) is left out.
    assert step_line(1, {"mfu": None, "straggler_ranks": 2}, total_steps=9) == (
        "step 1/9 | straggler_ranks 2"
    )


def _logger(tmp_path, monkeypatch, level: int | None) -> MetricLogger:
    if level is not None:
        monkeypatch.setenv(VERBOSITY_ENV, str(level))
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [])
    return MetricLogger(cfg, tmp_path, total_steps=100, start_step=0)


def test_console_lines_and_eta(tmp_path, monkeypatch, capsys) -> None:
    clock = iter([100.0, 110.0])  # steps 10 -> 20 took 10 s: 80 steps left take 80 s
    monkeypatch.setattr("kfm.train.loggers.time.monotonic", lambda: next(clock))
    log = _logger(tmp_path, monkeypatch, None)
    log.log(10, METRICS)
    log.log(20, METRICS)
    log.log(20, {"val_loss": 5.81642, "val_bpb": 3.76213, "val_tokens": 512})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert "eta" not in lines[0] and lines[1].endswith("| eta 0:01:20")
    assert lines[2] == "step  20/100 | val_loss 5.8164 | val_bpb 3.7621 | val_tokens 512"
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 10, **METRICS}  # full precision, the same keys as before


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_keeps_warnings_only(tmp_path, monkeypatch, capsys, quiet) -> None:
    log = _logger(tmp_path, monkeypatch, QUIET if quiet else 0)
    log.log(1, METRICS)
    log.info("saved checkpoint x")
    log.warning("step 1: update skipped")
    log.close()
    out = capsys.readouterr().out
    assert ("loss 6.7198" in out) != quiet and ("saved checkpoint x" in out) != quiet
    assert "step 1: update skipped" in out
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # recorded either way
