"""One writer per run: a second `kfm train` on a run in use refuses; stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfm.checkpoint import validate_checkpoint
from kfm.train import lock as lock_mod
from kfm.train.lock import LOCK_FILE, RunLock, RunLockedError
from kfm.train.status import read_status
from tests.conftest import REPO
from tests.parallel.harness import train_command


def train_cmd(sources: list[dict], root: Path, name: str, *extra: str) -> list[str]:
    return train_command(sources, root, name, nproc=0, args=extra)


def test_second_trainer_on_the_same_run_refuses_and_the_first_is_intact(
    tiny_sources, tmp_path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Steps 2-7 sleep 3 s each: the first trainer holds the run for ~18 s after its first step,
    # longer than the second needs to start (python + torch imports) and reach the lock.
    first = subprocess.Popen(
        train_cmd(
            tiny_sources,
            tmp_path,
            "shared",
            "--train.steps=8",
            "--checkpoint.interval=4",
            "--eval.interval=0",
            "--debug.faults=[sleep@2-7=3]",
        ),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    for line in first.stdout:  # the lock is taken before the first step
        if line.startswith("step"):
            break
    second = subprocess.run(
        train_cmd(tiny_sources, tmp_path, "shared", "--train.steps=8", "--eval.interval=0"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rest, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]

    assert second.returncode != 0, f"the second trainer was not refused:\n{second.stdout}"
    run_dir = tmp_path / "shared"
    assert (
        f"run {run_dir} is in use by host {socket.gethostname()} pid {first.pid}" in second.stderr
    )
    assert f"(lock {run_dir / LOCK_FILE}); wait for it" in second.stderr
    assert "Traceback" not in second.stderr

    # The first run's records: every step logged once, in order; its checkpoints valid.
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9))
    for step in (4, 8):
        assert validate_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}")["step"] == step
    assert read_status(run_dir)["state"] == "finished"
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def _write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": "2026-01-01T00:00:00+00:00",
        "slurm_job_id": None,
        "slurm_restart_count": 0,
        "token": "someone-else",
        **fields,
    }
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(record))
    return path


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path / "run", pid=dead)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
        assert lock.took_over is not None and f"pid {dead}" in lock.took_over
        assert "is gone" in lock.took_over
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no probe or stale file left


def test_live_holder_refuses_until_its_heartbeat_is_stale(tmp_path, monkeypatch) -> None:
    # A holder on another host: its pid cannot be checked, only its heartbeat (the mtime).
    path = _write_lock(tmp_path / "run", host="other-node", pid=4242)
    with pytest.raises(RunLockedError, match="in use by host other-node pid 4242 since 2026"):
        RunLock(tmp_path / "run").acquire()
    old = time.time() - lock_mod.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.took_over is not None and "heartbeat" in lock.took_over
    lock.release()


def test_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch) -> None:
    _write_lock(tmp_path / "run", host="node7", pid=99, slurm_job_id="123", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunLockedError, match=r"\(Slurm job 123\)"):  # same incarnation: live
        RunLock(tmp_path / "run").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.took_over is not None and "requeued" in lock.took_over
    lock.release()


def test_heartbeat_refreshes_the_mtime_and_release_keeps_a_foreign_lock(tmp_path) -> None:
    lock = RunLock(tmp_path / "run", heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / "run" / LOCK_FILE
    os.utime(path, (1_000_000, 1_000_000))
    deadline = time.time() + 10
    while path.stat().st_mtime == 1_000_000 and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 60
    path.write_text(json.dumps({"host": "x", "pid": 1, "token": "not-ours"}))
    lock.release()
    assert path.exists()  # someone else's lock is not removed
