"""Run health (kfm/train/health.py): the hang watchdog and the straggler report, as units and in
real 2-rank gloo runs of `kfm train` driven by ``debug.faults``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kfm.config import Config
from kfm.train.dist import WorldInfo
from kfm.train.health import (
    WATCHDOG_EXIT_CODE,
    StragglerReport,
    apply_nccl_debug_env,
    dump_flight_recorder,
    is_straggler,
    lower_median,
    nccl_debug_env,
)
from tests.conftest import REPO
from tests.parallel.harness import fsdp_run, run_train, shared_root, train_command

# --- units -----------------------------------------------------------------------------------


def run_script(tmp_path: Path, *parts: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the code ``parts`` in a fresh interpreter (a watchdog that fires ends its process)."""
    script = f"from pathlib import Path\nrun_dir = Path({str(tmp_path / 'run')!r})\n"
    script += "".join(textwrap.dedent(part) for part in parts)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


WATCHDOG = """
    import time
    from kfm.config import HealthConfig
    from kfm.train.health import Watchdog

    dog = Watchdog(HealthConfig(watchdog_s=0.5, watchdog_first_step_s=1.0), run_dir, rank={rank})
"""


def test_watchdog_dumps_every_thread_and_exits_with_its_code(tmp_path):
    body = """
            from types import SimpleNamespace

            def blocked_in_a_collective():
                time.sleep(60)

            dog.on_train_start(7)
            dog.on_step_end(SimpleNamespace(step=8))  # heartbeat: from now on the 0.5 s limit
            print("heartbeat", flush=True)
            blocked_in_a_collective()
    """
    t0 = time.monotonic()
    proc = run_script(tmp_path, WATCHDOG.format(rank=0), body)
    elapsed = time.monotonic() - t0
    assert proc.returncode == WATCHDOG_EXIT_CODE == 124, proc.stderr
    assert elapsed < 30
    dump = (tmp_path / "run" / "hang_rank0.txt").read_text()
    header = dump.splitlines()[0]
    assert "kfm watchdog" in header and "rank 0" in header and "after step 8" in header
    assert "pid " in header and "limit 0.5 s" in header
    assert "blocked_in_a_collective" in dump and "Thread 0x" in dump  # the main thread's stack
    assert "blocked_in_a_collective" in proc.stderr  # and the same on stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["requeue"] is True
    assert "watchdog" in status["reason"]


def test_watchdog_heartbeats_keep_it_quiet_and_train_end_stops_it(tmp_path):
    body = """
            from types import SimpleNamespace

            dog.backstop_s = 0.2  # the C-level backstop must be cancelled too
            dog.on_train_start(0)
            for step in range(1, 7):  # 0.9 s of beats, each within the 0.5 s limit
                time.sleep(0.15)
                dog.on_step_end(SimpleNamespace(step=step))
            dog.on_train_end(6, None)
            time.sleep(1.0)  # past both the limit and limit + backstop
            print("alive", flush=True)
    """
    proc = run_script(tmp_path, WATCHDOG.format(rank=3), body)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "alive"
    assert not (tmp_path / "run" / "hang_rank3.txt").exists()


def test_watchdog_backstop_exits_when_the_watchdog_thread_cannot(tmp_path):
    body = """
            dog.backstop_s = 0.5
            dog._fire = lambda *args: time.sleep(60)  # as if the GIL were never released
            dog.on_train_start(0)
            time.sleep(60)
    """
    proc = run_script(tmp_path, WATCHDOG.format(rank=1), body)
    assert proc.returncode == 1, proc.stderr  # faulthandler's exit
    assert "Timeout" in proc.stderr and "Thread 0x" in proc.stderr


def test_nccl_debug_env_names_and_setdefault(tmp_path, monkeypatch):
    env = nccl_debug_env(tmp_path)
    prefix = str(tmp_path.absolute() / "nccl_trace_rank")
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == prefix
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) == int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    for key in env:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the user's own choice wins
    apply_nccl_debug_env(tmp_path / "run")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"].endswith("run/nccl_trace_rank")
    assert (tmp_path / "run").is_dir()
    assert dump_flight_recorder(0) is None  # no process group (and no NCCL) here


def test_straggler_rule():
    assert lower_median([0.004, 0.512]) == 0.004  # two ranks: the faster one is the reference
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert is_straggler(0.512, 0.004, factor=2.0, min_s=0.05)
    assert not is_straggler(0.03, 0.004, factor=2.0, min_s=0.05)  # fast in absolute terms
    assert not is_straggler(1.5, 1.0, factor=2.0, min_s=0.05)  # within the factor


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.records: list[tuple[int, dict, bool]] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def log(self, step: int, metrics: dict, *, console: bool = True) -> None:
        self.records.append((step, metrics, console))


def test_straggler_report_names_the_slow_rank_with_its_place():
    logger = Recorder()
    world = WorldInfo(rank=0, world_size=4, local_rank=0)
    report = StragglerReport(Config(), logger, world)
    report.places = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    table = [[0.004, 0.01], [0.005, 0.01], [0.512, 0.01], [0.004, 0.30]]
    report._report(12, table)
    assert logger.lines == [
        "stragglers at step 12: rank 2 (host b, local rank 0): host work 0.512 s/step vs median "
        "0.004 s; rank 3 (host b, local rank 1): optimizer update 0.300 s/step vs median 0.010 s"
    ]
    [(step, metrics, console)] = logger.records
    assert step == 12 and console is False
    assert metrics["straggler_ranks"] == [2, 3]
    assert metrics["host_s_max"] == 0.512 and metrics["host_s_max_rank"] == 2
    assert metrics["host_s_median"] == 0.004 and metrics["optim_s_max"] == 0.30

    report._report(13, [[0.004, 0.01]] * 4)
    assert len(logger.lines) == 1 and logger.records[-1][1]["straggler_ranks"] == []


def test_straggler_report_is_off_without_a_process_group():
    report = StragglerReport(Config(), Recorder(), WorldInfo(0, 1, 0))
    assert not report.enabled
    report.on_train_start(0)  # no collective: would fail without a process group


# --- 2-rank runs ---------------------------------------------------------------------------

SHORT = ("--train.steps=5", "--eval.interval=0", "--checkpoint.interval=0")


def straggler_records(run) -> dict[int, list[int]]:
    return {r["step"]: r["straggler_ranks"] for r in run.records() if "straggler_ranks" in r}


@pytest.mark.distributed
def test_a_sleeping_rank_is_named_a_straggler(tiny_sources, tmp_path_factory):
    run = run_train(
        tiny_sources,
        shared_root(tmp_path_factory),
        "straggler",
        nproc=2,
        args=(*SHORT, "--debug.faults=[sleep@2-:r1=0.3]"),
    )
    # Step 1 is warm-up (left out); from step 2 on rank 1 sleeps 0.3 s before every step.
    assert straggler_records(run) == {2: [1], 3: [1], 4: [1], 5: [1]}
    named = [line for line in run.stdout.splitlines() if line.startswith("stragglers at step")]
    assert len(named) == 4, run.stdout
    assert all("rank 1 (host " in line and "local rank 1): host work 0.3" in line for line in named)
    assert not any("rank 0 (" in line for line in named)
    record = next(r for r in run.records() if r["step"] == 3 and "straggler_ranks" in r)
    assert record["host_s_max_rank"] == 1 and record["host_s_max"] >= 0.3


@pytest.mark.distributed
def test_a_healthy_run_names_no_straggler(tiny_sources, tmp_path_factory):
    # The plain 2-rank FSDP run the parallel tests share (served from the session cache there).
    run = fsdp_run(tiny_sources, shared_root(tmp_path_factory), 2)
    records = straggler_records(run)
    assert sorted(records) == list(range(2, 11))  # every log step but the warm-up step
    assert all(ranks == [] for ranks in records.values()), records
    assert "stragglers at" not in run.stdout


@pytest.mark.distributed
def test_a_hung_rank_makes_every_rank_dump_its_stacks_and_exit(tiny_sources, tmp_path):
    faults = ("--debug.faults=[hang@3:r1]", "--health.watchdog_s=5")
    args = (*SHORT, *faults, "--health.watchdog_first_step_s=60")
    cmd = train_command(tiny_sources, tmp_path, "hang", nproc=2, args=args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert f"exitcode  : {WATCHDOG_EXIT_CODE}" in proc.stderr  # torchrun's per-rank summary
    run_dir = tmp_path / "hang"
    rank0 = (run_dir / "hang_rank0.txt").read_text()
    rank1 = (run_dir / "hang_rank1.txt").read_text()
    for dump in (rank0, rank1):
        assert "no step completed" in dump and "after step 2" in dump and "Thread 0x" in dump
        assert "run_loop" in dump
    assert "_hang_forever" in rank1  # the fault's wait
    assert "distributed" in rank0 and "_hang_forever" not in rank0  # blocked in a collective
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["requeue"] is True and status["step"] == 2
    assert elapsed < 90, f"the hang took {elapsed:.0f} s to end"
