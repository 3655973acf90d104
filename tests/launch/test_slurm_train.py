"""launch/slurm/train.sbatch on a real one-node Slurm: preemption, requeue and resume.

Every job runs configs/tiny.yaml as 2 CPU ranks (srun + torchrun on gloo). A time limit's
``--signal``, ``scancel --signal=USR1`` and a rank killed with SIGKILL each end in a requeue by the
batch script, and the requeued job resumes from the newest checkpoint and finishes with per-step
losses equal (==) to those of an uninterrupted run of the same config. Deterministic failures and a
run that never started end the job without requeue. The tests poll the job's log, status.json,
metrics.jsonl and scontrol; none sleeps a fixed time.

The cluster tracks processes with proctrack/cgroup when this machine allows it (as most clusters
do: a signal reaches only the task srun started, here the script's stop relay, not torchrun's
ranks); the ``scancel --signal=USR1`` drill also runs under proctrack/linuxproc (every process of
the step gets the signal, torchrun included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_overrides
from tests.parallel.harness import losses
from tests.slurm_cluster import (
    REQUEUE_DELAY,
    SlurmCluster,
    missing_cgroup,
    missing_slurm,
    slurm_cluster,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "launch/slurm/train.sbatch"
# The time limit's signal comes 25-55 s after the job starts (below): the job's ranks sleep
# SLEEP_S at each step (debug.faults; no effect on the numbers), so on any machine the run lasts
# more than STEPS_LONG x SLEEP_S = 54 s and the signal lands mid-run.
STEPS_LONG = 600
SLEEP_S = 0.09
STEPS_SHORT = 80
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if reason := missing_slurm():
        pytest.skip(reason)
    proctrack = "cgroup"
    if reason := missing_cgroup():
        warnings.warn(f"proctrack/cgroup untested ({reason}): linuxproc only", stacklevel=1)
        proctrack = "linuxproc"
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), proctrack=proctrack) as c:
        yield c


def train_args(
    sources: list[dict], run_root: Path, name: str, steps: int, *extra: str
) -> list[str]:
    # checkpoint.interval=0: no periodic checkpoint, so the only mid-run one is the signal's.
    return tiny_overrides(sources, run_root, name) + [
        f"--train.steps={steps}",
        "--checkpoint.interval=0",
        "--eval.interval=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(
    tiny_sources: list[dict], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], dict[int, float]]:
    """Per-step losses of an uninterrupted 2-rank run (torchrun, no Slurm), once per step count."""
    root = tmp_path_factory.mktemp("reference")
    cache: dict[int, dict[int, float]] = {}

    def get(steps: int) -> dict[int, float]:
        if steps not in cache:
            name = f"ref{steps}"
            run = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                + ["--nproc-per-node", "2", "-m", "kfm_cli", "train", "configs/tiny.yaml"]
                + train_args(tiny_sources, root, name, steps),
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            cache[steps] = losses(root / name)
            assert sorted(cache[steps]) == list(range(1, steps + 1))
        return cache[steps]

    return get


class Job:
    """One sbatch submission of train.sbatch and what the test reads about it."""

    def __init__(self, cluster: SlurmCluster, out: Path, run_dir: Path, job_id: str):
        self.cluster, self.out, self.run_dir, self.id = cluster, out, run_dir, job_id

    @classmethod
    def submit(
        cls,
        cluster: SlurmCluster,
        tmp: Path,
        args: list[str],
        *sbatch: str,
        doctor: bool = False,
        env: dict[str, str] | None = None,
    ) -> Job:
        name = next(a.split("=", 1)[1] for a in args if a.startswith("--train.name="))
        out = tmp / f"{name}.out"
        env = {**cluster.env, "NPROC": "2", "KFM_DOCTOR": "1" if doctor else "0", **(env or {})}
        if (Path(sys.prefix) / "bin" / "activate").exists():
            env["KFM_VENV"] = sys.prefix  # the venv running the tests
        submit = subprocess.run(
            # no GPUs here: override the template's --gpus-per-node; NPROC=2 CPU ranks on gloo
            ["sbatch", "--gpus-per-node=0", f"--output={out}", f"--chdir={REPO}", *sbatch]
            + [SCRIPT, "configs/tiny.yaml", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        run_root = next(a.split("=", 1)[1] for a in args if a.startswith("--train.run_root="))
        return cls(cluster, out, Path(run_root) / name, submit.stdout.split()[-1])

    def info(self) -> dict[str, str]:
        text = self.cluster.run("scontrol", "show", "job", "-o", self.id, check=False).stdout
        return dict(re.findall(r"(JobState|Restarts|ExitCode|Reason)=(\S+)", text))

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def last_step(self) -> int:
        try:
            return max(losses(self.run_dir), default=0)
        except (OSError, ValueError):  # not there yet, or a line half-written
            return 0

    def wait(self, what: str, ok: Callable[[], Any], timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := ok()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {self.id}: {what} not reached after {timeout:.0f}s; {self.info()}\n"
                    f"--- {self.out}\n{self.log()[-4000:]}\n{self.cluster.log_tail()}"
                )
            time.sleep(0.2)
        return result

    def wait_end(self, timeout: float = 300) -> dict[str, str]:
        return self.wait("the end", lambda: (i := self.info()).get("JobState") in TERMINAL and i)

    def history(self) -> list[str]:
        """States of the job's runs, oldest first (sacct on the jobcomp/filetxt records)."""
        out = self.cluster.run("sacct", "-c", "-j", self.id, "-n", "-P", "--format=State").stdout
        return out.split()


def check_resumed_run(job: Job, reference: dict[int, float], *, restarts: int = 1) -> str:
    """The job ended COMPLETED after ``restarts`` requeues with the uninterrupted run's losses."""
    info = job.wait_end()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == str(restarts), info
    # jobcomp writes a record per run: each requeued one (as PENDING), then the final one
    assert job.history() == ["PENDING"] * restarts + ["COMPLETED"], job.history()
    status = job.status()
    assert status is not None and status["state"] == "finished", status
    assert status["slurm_restart_count"] == restarts, status
    assert f"kfm: status finished at step {max(reference)}" in log, log[-3000:]
    assert log.count(f"job {job.id} start ") == restarts + 1, log[-3000:]
    got = losses(job.run_dir)
    assert sorted(got) == sorted(reference)
    differ = [s for s in reference if got[s] != reference[s]]
    assert not differ, [(s, got[s], reference[s]) for s in differ[:5]]
    return log


def signal_option(seconds: int) -> str:
    """The script's own #SBATCH --signal (same target: steps or batch shell), sent earlier."""
    line = re.search(r"^#SBATCH --signal=(\S+)@\d+$", (REPO / SCRIPT).read_text(), re.M)
    assert line, f"no #SBATCH --signal=...@N line in {SCRIPT}"
    return f"--signal={line.group(1)}@{seconds}"


def test_template_trains_and_finishes(
    cluster: SlurmCluster, tmp_path: Path, tiny_sources: list[dict]
) -> None:
    """The plain path: kfm doctor, then 4 steps; COMPLETED, no requeue."""
    args = tiny_overrides(tiny_sources, tmp_path / "runs", "slurm_tiny") + ["--train.steps=4"]
    job = Job.submit(cluster, tmp_path, args, doctor=True)
    info = job.wait_end()
    log = job.log()
    assert "2 ranks: mesh" in log and "step 4/4 | loss" in log, log[-3000:]
    assert "doctor: all checks passed" in log, log[-3000:]
    assert "kfm: status finished at step 4 (-), srun exit 0: training finished" in log, log[-3000:]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["Restarts"] == "0", info
    assert (job.run_dir / "checkpoints" / "step_000004").is_dir()


def test_time_limit_signal_requeues_and_resumes_exactly(
    cluster: SlurmCluster,
    tmp_path: Path,
    tiny_sources: list[dict],
    reference: Callable[[int], dict[int, float]],
) -> None:
    """--time=1 with the script's --signal 5 s before the end: stop, requeue, resume, finish."""
    args = train_args(
        tiny_sources,
        tmp_path / "runs",
        "timelimit",
        STEPS_LONG,
        f"--debug.faults=[sleep@1-={SLEEP_S}]",
    )
    # slurmctld checks time limits every 30 s and signals when the end is < 30 s + 5 s away:
    # 25-55 s after the start; it kills the job at the first check after the end (>= 30 s later).
    job = Job.submit(cluster, tmp_path, args, "--time=1", signal_option(5))
    t0 = time.monotonic()
    job.wait("the first requeue", lambda: job.info().get("Restarts") == "1")
    t_requeued = time.monotonic()
    # The second start runs the rest to the end (one requeue to check, not a chain of them).
    cluster.run("scontrol", "update", f"JobId={job.id}", "TimeLimit=10")
    log = job.wait("the second start", lambda: "start 2 " in (text := job.log()) and text)
    stop = re.search(
        r"kfm: status stopped at step (\d+) \(SIGUSR1\), srun exit 0: requeue 1/10", log
    )
    assert stop, log[-3000:]
    stopped_at = int(stop.group(1))
    assert 0 < stopped_at < STEPS_LONG
    assert "SIGUSR1 received: checkpoint saved at step" in log
    log = check_resumed_run(job, reference(STEPS_LONG))
    assert f"resumed from {job.run_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in log
    print(
        f"time limit: stopped at step {stopped_at}, requeued {t_requeued - t0:.0f}s after submit, "
        f"finished {time.monotonic() - t0:.0f}s after submit"
    )


def scancel_drill(
    cluster: SlurmCluster, tmp_path: Path, sources: list[dict], reference: dict[int, float]
) -> None:
    """scancel --signal=USR1 JOBID mid-run: stop, requeue, resume, the uninterrupted losses."""
    args = train_args(sources, tmp_path / "runs", "drill", STEPS_SHORT)
    job = Job.submit(cluster, tmp_path, args)
    job.wait("step 10", lambda: job.last_step() >= 10)
    cluster.run("scancel", "--signal=USR1", job.id)
    t_signal = time.monotonic()
    job.wait("status stopped", lambda: (s := job.status()) and s["state"] == "stopped")
    t_stopped = time.monotonic()
    job.wait("pending", lambda: job.info().get("JobState") == "PENDING")
    t_pending = time.monotonic()
    job.wait("the second start", lambda: job.info().get("JobState") == "RUNNING")
    t_started = time.monotonic()
    log = check_resumed_run(job, reference)
    stop = re.search(
        r"kfm: status stopped at step (\d+) \(SIGUSR1\), srun exit 0: requeue 1/10", log
    )
    assert stop, log[-3000:]
    stopped_at = int(stop.group(1))
    assert 10 <= stopped_at < STEPS_SHORT
    assert f"resumed from {job.run_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in log
    # torchrun ignored SIGUSR1 (it gets it itself under linuxproc) and exited 0 after its ranks
    assert "User defined signal" not in log, log[-3000:]
    assert t_started - t_pending >= REQUEUE_DELAY - 1
    print(
        f"scancel --signal=USR1 (proctrack/{cluster.proctrack}): checkpoint + status 'stopped' "
        f"{t_stopped - t_signal:.1f}s after the signal, pending {t_pending - t_signal:.1f}s after "
        f"it, running again {t_started - t_pending:.1f}s later (requeue hold {REQUEUE_DELAY + 1}s)"
    )


def test_scancel_usr1_requeues_and_resumes_exactly(
    cluster: SlurmCluster,
    tmp_path: Path,
    tiny_sources: list[dict],
    reference: Callable[[int], dict[int, float]],
) -> None:
    """The drill: scancel --signal=USR1 JOBID mid-run gives the time limit's outcome."""
    scancel_drill(cluster, tmp_path, tiny_sources, reference(STEPS_SHORT))


def test_scancel_usr1_under_linuxproc(
    cluster: SlurmCluster,
    tmp_path: Path,
    tiny_sources: list[dict],
    reference: Callable[[int], dict[int, float]],
) -> None:
    """The same drill where slurmstepd signals every process of the step, torchrun included."""
    if cluster.proctrack == "linuxproc":
        pytest.skip("the module's cluster already runs proctrack/linuxproc")
    with slurm_cluster(tmp_path / "slurm", proctrack="linuxproc") as other:
        scancel_drill(other, tmp_path, tiny_sources, reference(STEPS_SHORT))


def find_worker(name: str, rank: int) -> int | None:
    """PID of the training process with RANK=rank of run ``name`` on this machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"--train.name={name}".encode() in cmdline
            and b"kfm_cli" in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    return None


def test_killed_rank_requeues_and_resumes_from_last_checkpoint(
    cluster: SlurmCluster,
    tmp_path: Path,
    tiny_sources: list[dict],
    reference: Callable[[int], dict[int, float]],
) -> None:
    """A node failure drill: SIGKILL rank 1 mid-run; torchrun fails, the job requeues and resumes."""
    name = "killed"
    args = train_args(tiny_sources, tmp_path / "runs", name, STEPS_SHORT, "--checkpoint.interval=5")
    job = Job.submit(cluster, tmp_path, args)
    job.wait("step 12", lambda: job.last_step() >= 12)
    pid = job.wait("rank 1's process", lambda: find_worker(name, 1))
    os.kill(pid, signal.SIGKILL)
    killed_after = job.last_step()
    job.wait("the first requeue", lambda: job.info().get("Restarts") == "1")
    log = check_resumed_run(job, reference(STEPS_SHORT))
    decision = re.search(
        r"kfm: status (running|failed) at step (\d+) \((.*)\), srun exit (\d+): requeue 1/10", log
    )
    assert decision, log[-3000:]
    assert decision.group(4) != "0"  # torchrun failed
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", log)
    assert resumed, log[-3000:]
    step = int(resumed.group(1))
    # the newest checkpoint before the kill: a multiple of 5, at least step 10
    assert step % 5 == 0 and 10 <= step <= max(killed_after, int(decision.group(2))) + 1
    print(
        f"killed rank 1 after step {killed_after}: status {decision.group(1)}, "
        f"srun exit {decision.group(4)}, resumed from step {step}"
    )


def test_failures_end_the_job_without_requeue(
    cluster: SlurmCluster, tmp_path: Path, tiny_sources: list[dict]
) -> None:
    """A deterministic failure (loss NaN), a run that never started, and a stop past the requeue
    limit (KFM_MAX_REQUEUES=0): FAILED, not requeued."""
    runs = tmp_path / "runs"
    limit = Job.submit(
        cluster,
        tmp_path,
        train_args(tiny_sources, runs, "limit", STEPS_SHORT),
        env={"KFM_MAX_REQUEUES": "0"},
    )
    limit.wait("step 3", lambda: limit.last_step() >= 3)
    cluster.run("scancel", "--signal=USR1", limit.id)
    nan = Job.submit(
        cluster, tmp_path, train_args(tiny_sources, runs, "nan", 30, "--optim.lr=1e12")
    )
    never = Job.submit(
        cluster,
        tmp_path,
        train_args(tiny_sources, runs, "never", 30, "--tokenizer.path=/nonexistent"),
    )
    for job, expected in (
        (limit, r"kfm: status stopped at step \d+ \(SIGUSR1\), .*: requeue limit reached \(0/0,"),
        (nan, r"kfm: status failed at step \d+ \(.*\), srun exit [1-9]\d*: a rerun would fail"),
        (never, r"kfm: no status\.json from this start in .* training never started, not requeued"),
    ):
        info = job.wait_end()
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
        assert re.search(expected, job.log()), job.log()[-3000:]
        assert job.history() == ["FAILED"]
