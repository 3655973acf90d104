"""Bad steps: a NaN or spiking update is skipped (weights and optimizer state untouched), counted,
logged, and too many in a row stop the run."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import load_checkpoint, load_model_state
from kfm.config import GuardConfig, load_config
from kfm.model.transformer import Transformer
from kfm.train.guard import BadStepsError, StepGuard
from kfm.train.optim import build_optimizer
from tests.conftest import REPO
from tests.parallel.harness import train_command

NAN_AT, SPIKE_AT, STEPS = 5, 9, 10


def _check(guard: StepGuard, loss: float, norm: float) -> bool:
    return bool(guard.check(torch.tensor(loss), torch.tensor(norm)).item())


def test_guard_skips_nonfinite_and_spikes_and_counts() -> None:
    guard = StepGuard(GuardConfig(spike_sigma=6.0, spike_window=4), torch.device("cpu"))
    assert not _check(guard, 3.0, 1.0)
    assert _check(guard, math.nan, 1.0)  # non-finite: skipped even before the window is full
    assert _check(guard, 3.0, math.inf)
    for loss in (2.9, 2.8, 2.85):
        assert not _check(guard, loss, 1.0 + loss / 100)
    assert _check(guard, 9.0, 1.0)  # loss far above the window's mean + 6 sigma
    assert _check(guard, 2.8, 50.0)  # gradient-norm spike
    assert not _check(guard, 2.8, 1.03)  # a normal step resets the run of skips
    assert int(guard.skipped) == 4 and int(guard.consecutive) == 0
    guard.poll(step=9)  # nothing to report


def test_guard_stops_after_consecutive_skips() -> None:
    guard = StepGuard(GuardConfig(max_consecutive_skips=3), torch.device("cpu"))
    for step in (1, 2):
        _check(guard, math.nan, 1.0)
        guard.poll(step)
    _check(guard, math.nan, 1.0)
    with pytest.raises(BadStepsError, match="3 updates in a row were skipped"):
        guard.poll(3)


def test_guard_without_skipping_stops_at_the_first_nonfinite_step() -> None:
    guard = StepGuard(GuardConfig(skip_nonfinite=False), torch.device("cpu"))
    assert not _check(guard, math.inf, 1.0)  # not skipped: the update happens...
    with pytest.raises(BadStepsError, match="guard.skip_nonfinite is false"):
        guard.poll(1)  # ...and the run stops right after it


def _run(tiny_sources, root: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    args = (
        f"--train.steps={STEPS}",
        "--checkpoint.interval=1",
        "--checkpoint.keep_last=0",
        "--eval.interval=0",
        f"--debug.faults=[nan@{NAN_AT}, spike@{SPIKE_AT}=1000]",
        "--guard.spike_window=3",
        *extra,
    )
    cmd = train_command(tiny_sources, root, name, nproc=0, args=args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _state(run_dir: Path, step: int) -> tuple[dict, dict]:
    """(model weights, optimizer state) of the checkpoint after ``step``."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    weights, config = load_model_state(ckpt)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    load_checkpoint(ckpt, model=model, optimizer=optimizer, config=config, restore_rng=False)
    return weights, optimizer.state_dict()["state"]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("impl", ["foreach", "fused"])  # host-sync skip / on-device found_inf
def test_nan_and_spike_steps_leave_weights_untouched(tiny_sources, tmp_path, impl) -> None:
    proc = _run(tiny_sources, tmp_path, impl, f"--optim.impl={impl}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / impl
    records = {
        r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in r
    }
    skipped = [s for s, r in records.items() if r["skipped"]]
    assert skipped == [NAN_AT, SPIKE_AT]
    assert records[STEPS]["skipped_total"] == 2
    assert math.isnan(records[NAN_AT]["loss"])
    assert records[SPIKE_AT]["loss"] > 10 * records[SPIKE_AT - 1]["loss"]
    for bad in (NAN_AT, SPIKE_AT):
        before, after = _state(run_dir, bad - 1), _state(run_dir, bad)
        assert _equal(before[0], after[0]), f"step {bad} changed the weights"
        assert _equal(before[1], after[1]), f"step {bad} changed the optimizer state"
    # The steps around them did update.
    assert not _equal(_state(run_dir, NAN_AT)[0], _state(run_dir, NAN_AT + 1)[0])
    assert math.isfinite(records[STEPS]["loss"])


def test_too_many_bad_steps_stop_the_run(tiny_sources, tmp_path) -> None:
    proc = _run(
        tiny_sources,
        tmp_path,
        "stuck",
        "--debug.faults=[nan@3-]",
        "--guard.max_consecutive_skips=2",
    )
    assert proc.returncode == 1
    assert "2 updates in a row were skipped" in proc.stderr
    status = json.loads((tmp_path / "stuck" / "status.json").read_text())
    assert status["state"] == "failed" and status["requeue"] is False
    assert status["step"] == 3  # the last step whose components all ran (step 4 raised)
