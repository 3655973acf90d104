"""Exact resume: a run SIGKILLed mid-way and resumed equals an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from kfm.checkpoint import find_latest_valid, load_model_state
from tests.conftest import REPO, tiny_overrides
from tests.parallel.harness import losses

STEPS, CKPT_EVERY, KILL_AT = 20, 10, 13


def run_train(overrides: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "kfm_cli",
        "train",
        "configs/tiny.yaml",
        *overrides,
        f"--train.steps={STEPS}",
        f"--checkpoint.interval={CKPT_EVERY}",
        "--eval.interval=0",
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_and_auto_resume_is_bitwise_exact(tiny_sources, tmp_path):
    straight = run_train(tiny_overrides(tiny_sources, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr

    args = tiny_overrides(tiny_sources, tmp_path, "killed")
    killed = run_train([*args, f"--debug.faults=[sigkill@{KILL_AT}]"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = losses(tmp_path / "killed")
    assert max(before) == KILL_AT
    assert find_latest_valid(tmp_path / "killed" / "checkpoints").name == f"step_{CKPT_EVERY:06d}"

    resumed = run_train(args)  # same command, no flag: resumes from the newest valid checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"at step {CKPT_EVERY}" in resumed.stdout

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: floats compared with ==
    assert all(before[s] == a[s] for s in range(CKPT_EVERY + 1, KILL_AT + 1))  # replayed steps

    wa, _ = load_model_state(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:06d}")
    wb, _ = load_model_state(tmp_path / "killed" / "checkpoints" / f"step_{STEPS:06d}")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_and_exits_cleanly(tiny_sources, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, exit code 0, resume continues."""
    args = tiny_overrides(tiny_sources, tmp_path, "term")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "kfm_cli",
        "train",
        "configs/tiny.yaml",
        *args,
        "--train.steps=100000",
        "--checkpoint.interval=0",
        "--eval.interval=0",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is really stepping
        if line.startswith("step") and "loss" in line and int(line.split()[1].split("/")[0]) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0
    assert "SIGTERM received" in out
    ckpt = find_latest_valid(tmp_path / "term" / "checkpoints")
    assert ckpt is not None and int(ckpt.name.split("_")[1]) >= 3
