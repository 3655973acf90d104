"""Ctrl-C saves like SIGTERM: the step finishes, a checkpoint is written, status.json says
"stopped", and a resume gives the losses of an uninterrupted run. A second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kfm.checkpoint import find_latest_valid
from kfm.train import signals
from kfm.train.signals import StopRequest
from kfm.train.status import read_status
from tests.conftest import REPO
from tests.parallel.harness import losses, train_command

STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(sources: list[dict], root: Path, name: str, *extra: str) -> list[str]:
    # --checkpoint.interval=0: only the stop (or the end) saves
    args = (f"--train.steps={STEPS}", "--checkpoint.interval=0", "--eval.interval=0", *extra)
    return train_command(sources, root, name, nproc=0, args=args)


def start_and_wait_for_step(command: list[str], step: int, **popen) -> subprocess.Popen:
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
            return proc
    raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-3000:]}")


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tiny_sources, tmp_path) -> None:
    straight = subprocess.run(
        cmd(tiny_sources, tmp_path, "straight"), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Steps from 4 on sleep 0.5 s, so the signal lands mid-run (sleeping changes no number).
    args = cmd(tiny_sources, tmp_path, "ctrl_c", "--debug.faults=[sleep@4-=0.5]")
    proc = start_and_wait_for_step(args, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    run_dir = tmp_path / "ctrl_c"
    stopped_at = max(losses(run_dir))
    assert 3 <= stopped_at < STEPS
    assert f"SIGINT received: checkpoint saved at step {stopped_at}, exiting" in out
    assert find_latest_valid(run_dir / "checkpoints").name == f"step_{stopped_at:06d}"
    status = read_status(run_dir)
    assert (status["state"], status["step"], status["reason"]) == ("stopped", stopped_at, "SIGINT")

    resumed = subprocess.run(args[:-1], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    a, b = losses(tmp_path / "straight"), losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s] == b[s] for s in a)  # bitwise


def test_second_ctrl_c_exits_at_once_with_one_clean_line(tiny_sources, tmp_path) -> None:
    # Step 3 sleeps 120 s: the first Ctrl-C only asks for a stop after that step; the second,
    # 1.5 s later, must end the process long before.
    args = cmd(tiny_sources, tmp_path, "twice", "--debug.faults=[sleep@3=120]")
    proc = start_and_wait_for_step(args, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 130
    assert "kfm train: interrupted (Ctrl-C)" in err
    assert "Traceback" not in err
    status = read_status(tmp_path / "twice")
    assert (status["state"], status["requeue"]) == ("failed", False)  # the user said stop
    assert not (tmp_path / "twice" / ".lock").exists()  # released on this exit path too


def test_stop_request_counts_a_forwarded_copy_as_the_same_ctrl_c(monkeypatch) -> None:
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy: within SAME_KEYPRESS_S
        assert stop.requested and stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # repeated stop signals change nothing
        assert stop.signal_name == "SIGINT"
        monkeypatch.setattr(signals, "SAME_KEYPRESS_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.distributed
def test_ctrl_c_at_a_terminal_stops_torchrun_ranks_with_a_checkpoint(tiny_sources, tmp_path):
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group (torchrun
    and both ranks). torchrun forwards another SIGINT to its workers; the ranks take both as one
    Ctrl-C, agree on the stop and save."""
    extra = ("--checkpoint.interval=0", "--eval.interval=0", "--train.steps=200")
    command = train_command(
        tiny_sources, tmp_path, "torchrun", nproc=2, args=(*extra, "--debug.faults=[sleep@4-=0.3]")
    )
    proc = start_and_wait_for_step(command, 3, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    run_dir = tmp_path / "torchrun"
    status = read_status(run_dir)
    assert status is not None and status["state"] == "stopped", status
    stopped_at = status["step"]
    assert find_latest_valid(run_dir / "checkpoints").name == f"step_{stopped_at:06d}"
    assert max(losses(run_dir)) == stopped_at
    assert not (run_dir / ".lock").exists()
