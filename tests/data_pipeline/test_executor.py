"""Executors: local stages run in order and resume after a crash; Slurm scripts run on a real Slurm.

The toy pipeline is JsonlReader -> a step -> JsonlWriter (uncompressed, so outputs of two runs can
be compared byte for byte). Its steps live in this module, importable by datatrove's forkserver
workers and, with PYTHONPATH set to the repo, by Slurm jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datatrove", reason="needs datatrove: pip install 'kfm[data]'")

import dill  # noqa: E402  (datatrove's dependency)
from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.typeshelper import StatHints  # noqa: E402

from data_pipeline.executor import (  # noqa: E402
    ExecutorConfig,
    SlurmConfig,
    TaskFailedError,
    plan_text,
    run_stages,
    write_slurm_scripts,
)
from data_pipeline.stage import Stage  # noqa: E402
from data_pipeline.steps.pii_scrub import PIIScrubber  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class Shout(PipelineStep):
    """Upper-cases text, records each (stage, rank) run in ``calls``, and crashes on demand."""

    name = "shout"
    type = "Formatter"

    def __init__(self, tag: str, calls: str, crash_flag: str | None = None, crash_rank: int = 1):
        super().__init__()
        self.tag, self.calls, self.crash_flag, self.crash_rank = tag, calls, crash_flag, crash_rank

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        with open(self.calls, "a") as f:
            f.write(f"{self.tag}:{rank}\n")
        for i, doc in enumerate(data):
            # The flag file makes the crash happen once: a rerun finds it gone. Crashing after
            # the first document leaves a half-written output file for the rerun to replace.
            if i == 1 and rank == self.crash_rank and self.crash_flag:
                flag = Path(self.crash_flag)
                if flag.exists():
                    flag.unlink()
                    raise RuntimeError(f"simulated crash of {self.tag} rank {rank}")
            self.stat_update(StatHints.total)
            doc.text = doc.text.upper()
            doc.metadata[self.tag] = rank
            self.stat_update(StatHints.forwarded)
            yield doc


def make_inputs(folder: Path, n_files: int = 4, per_file: int = 3) -> None:
    folder.mkdir(parents=True)
    for f in range(n_files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for d in range(per_file):
                rec = {"id": f"{f}-{d}", "text": f"doc {d} of file {f} 환자", "source": "toy"}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def toy_stages(work: Path, crash_flag: Path | None = None, tasks: int = 2) -> list[Stage]:
    calls = str(work / "calls.txt")
    return [
        Stage(
            name="first",
            tasks=tasks,
            pipeline=[
                JsonlReader(str(work / "in")),
                Shout("first", calls, str(crash_flag) if crash_flag else None),
                JsonlWriter(str(work / "mid"), compression=None),
            ],
        ),
        Stage(
            name="second",
            tasks=tasks,
            pipeline=[
                JsonlReader(str(work / "mid"), add_file_path=False),
                Shout("second", calls),
                JsonlWriter(str(work / "out"), compression=None),
            ],
        ),
    ]


def read_outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}


def check_toy_output(work: Path, tasks: int = 2) -> None:
    docs = [json.loads(line) for p in sorted((work / "out").glob("*.jsonl")) for line in p.open()]
    assert sorted(d["id"] for d in docs) == sorted(f"{f}-{d}" for f in range(4) for d in range(3))
    assert all(d["text"].startswith("DOC ") and d["text"].endswith("환자") for d in docs)
    assert all(d["metadata"]["source"] == "toy" and "first" in d["metadata"] for d in docs)
    for stage in ("first", "second"):
        logs = work / "logs" / stage
        for rank in range(tasks):
            assert (logs / "completions" / f"{rank:05d}").is_file()
            assert "Processing done" in (logs / "logs" / f"task_{rank:05d}.log").read_text()


# ---- local executor (default suite) ----


def test_local_two_stages_then_rerun_after_crash(tmp_path: Path) -> None:
    work = tmp_path / "w"
    make_inputs(work / "in")
    cfg = ExecutorConfig(workers=1)  # in-process: no forkserver pool inside pytest
    run_stages(toy_stages(work), cfg, logging_dir=work / "logs")
    check_toy_output(work)
    clean = read_outputs(work / "out"), read_outputs(work / "mid")
    assert (work / "calls.txt").read_text().split() == [
        "first:0",
        "first:1",
        "second:0",
        "second:1",
    ]

    # Same paths again (reader metadata holds file paths), now with a crash in first/rank 1.
    for sub in ("mid", "out", "logs"):
        subprocess.run(["rm", "-rf", str(work / sub)], check=True)
    (work / "calls.txt").unlink()
    flag = work / "crash_once"
    flag.touch()
    with pytest.raises(TaskFailedError) as err:
        run_stages(toy_stages(work, flag), cfg, logging_dir=work / "logs")
    log = work / "logs" / "first" / "logs" / "task_00001.log"
    assert (err.value.stage, err.value.rank, err.value.log_file) == ("first", 1, str(log))
    msg = str(err.value)
    assert "'first'" in msg and "task 1" in msg and str(log) in msg and "simulated crash" in msg
    assert "simulated crash" in log.read_text()  # the traceback is in the task's own log
    assert not (work / "logs" / "second").exists()  # the next stage never started
    assert (work / "mid" / "00001.jsonl").exists()  # half-written by the crashed task

    run_stages(toy_stages(work, flag), cfg, logging_dir=work / "logs")
    calls = (work / "calls.txt").read_text().split()
    assert calls == ["first:0", "first:1", "first:1", "second:0", "second:1"]  # rank 0 skipped
    assert (read_outputs(work / "out"), read_outputs(work / "mid")) == clean

    run_stages(toy_stages(work), cfg, logging_dir=work / "logs")  # all complete: nothing runs
    assert (work / "calls.txt").read_text().split() == calls


CLI_SCRIPT = """
import sys
from pathlib import Path
from data_pipeline.executor import ExecutorConfig, run_stages
from tests.data_pipeline.test_executor import toy_stages

def main() -> int:
    work = Path(sys.argv[1])
    flag = work / "crash_once" if len(sys.argv) > 2 else None
    run_stages(toy_stages(work, flag), ExecutorConfig(workers=2), logging_dir=work / "logs")
    return 0
"""


def run_cli(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Like a console-script entry point: main() is imported and called, not run at import time.
    # workers=2 makes datatrove start its forkserver pool.
    code = f"import sys; sys.path[:0] = [{str(work)!r}, {str(REPO)!r}]; import cli_entry; sys.exit(cli_entry.main())"
    return subprocess.run(
        [sys.executable, "-c", code, str(work), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=work,
    )


def test_local_pool_from_a_cli_entry_point(tmp_path: Path) -> None:
    work = tmp_path / "w"
    make_inputs(work / "in")
    (work / "cli_entry.py").write_text(textwrap.dedent(CLI_SCRIPT))
    (work / "crash_once").touch()
    failed = run_cli(work, "crash")
    assert failed.returncode == 1, failed.stderr[-3000:]
    # TaskFailedError crossed the pool back to the parent intact.
    log = work / "logs" / "first" / "logs" / "task_00001.log"
    assert "TaskFailedError: stage 'first', task 1 failed" in failed.stderr
    assert f"log: {log}" in failed.stderr
    done = run_cli(work)
    assert done.returncode == 0, done.stderr[-3000:]
    check_toy_output(work)
    assert sorted((work / "calls.txt").read_text().split()).count("first:0") == 1


def test_dry_run_local_runs_nothing(tmp_path: Path) -> None:
    make_inputs(tmp_path / "in")
    run_stages(toy_stages(tmp_path), ExecutorConfig(), logging_dir=tmp_path / "logs", dry_run=True)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "calls.txt").exists()


def test_plan_text(tmp_path: Path) -> None:
    stages = toy_stages(tmp_path, tasks=3)
    local = plan_text(stages, ExecutorConfig(workers=2), tmp_path / "logs")
    assert local.splitlines()[:2] == ["executor: local", f"logging_dir: {tmp_path / 'logs'}"]
    assert "1. first: 3 tasks x 1 cpu, 2 at once" in local
    assert "2. second: 3 tasks x 1 cpu, 2 at once" in local
    assert "steps (3): JsonlReader, Shout, JsonlWriter" in local
    assert "sbatch" not in local
    cfg = ExecutorConfig(kind="slurm", slurm=SlurmConfig(partition="cpu", max_array_size=2))
    slurm = plan_text(stages, cfg, tmp_path / "logs")
    assert "slurm: partition=cpu time=24:00:00 mem_per_cpu_gb=2" in slurm
    assert (
        f"sbatch: {tmp_path / 'logs' / 'second' / 'launch_script.slurm'} "
        "(job kfm-second, array of 2 x 2 tasks, dependency afterok:first)"
    ) in slurm
    assert "(job kfm-first, array of 2 x 2 tasks, dependency none)" in slurm
    cfg.slurm.max_array_size = -1
    assert "(job kfm-first, array of 3, dependency none)" in plan_text(stages, cfg, tmp_path)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"executor\.slurm\.partition is empty"):
        ExecutorConfig(kind="slurm")
    cfg = ExecutorConfig()
    cfg.kind = "slurm"  # as `kfm data run --executor slurm` does after loading
    with pytest.raises(ValueError, match=r"--executor\.slurm\.partition="):
        run_stages([Stage(name="a")], cfg, logging_dir="unused", dry_run=True)
    with pytest.raises(ValueError, match=r"executor\.slurm\.time='1 day'"):
        SlurmConfig(time="1 day")
    for ok in ("30", "1:00:00", "2-00:00:00", "2-12"):
        SlurmConfig(time=ok)
    with pytest.raises(ValueError, match=r"executor\.slurm\.sbatch_args: 'array'"):
        SlurmConfig(sbatch_args={"array": "0-3"})
    with pytest.raises(ValueError, match=r"executor\.slurm\.sbatch_args: '--gres'"):
        SlurmConfig(sbatch_args={"--gres": "gpu:1"})
    with pytest.raises(ValueError, match=r"executor\.workers=0"):
        ExecutorConfig(workers=0)
    with pytest.raises(ValueError, match="unique"):
        plan_text([Stage(name="a"), Stage(name="a")], ExecutorConfig(), "logs")


def test_ray_without_ray_names_the_install() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install ray"):
            run_stages([Stage(name="a")], ExecutorConfig(kind="ray"), logging_dir="unused")
    else:
        with pytest.raises(NotImplementedError, match="kind=ray"):
            run_stages([Stage(name="a")], ExecutorConfig(kind="ray"), logging_dir="unused")


def test_pipeline_pickles_like_slurm_does(tmp_path: Path) -> None:
    """datatrove's Slurm executor dill-pickles the pipeline: a round trip must keep it working."""
    make_inputs(tmp_path / "in")
    stage = toy_stages(tmp_path)[0]
    stage.pipeline.insert(2, PIIScrubber())
    copy = dill.loads(dill.dumps(stage.pipeline))
    assert [type(s) for s in copy] == [type(s) for s in stage.pipeline]
    docs = list(copy[2].run(copy[1].run(copy[0].run(None, 0, 2), 0, 2), 0, 2))
    assert len(docs) == 6 and docs[0].text == "DOC 0 OF FILE 0 환자"


def test_slurm_dry_run_writes_scripts_without_sbatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_inputs(tmp_path / "in")
    # Only the venv on PATH: any attempt to call sbatch would fail with FileNotFoundError.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    cfg = ExecutorConfig(
        kind="slurm",
        workers=1,
        slurm=SlurmConfig(partition="cpu", account="med", sbatch_args={"constraint": "x86"}),
    )
    run_stages(toy_stages(tmp_path), cfg, logging_dir=tmp_path / "logs", dry_run=True)
    for name in ("first", "second"):
        folder = tmp_path / "logs" / name
        script = (folder / "launch_script.slurm").read_text()
        for line in (
            "#SBATCH --partition=cpu",
            "#SBATCH --cpus-per-task=1",
            "#SBATCH --mem-per-cpu=2G",
            f"#SBATCH --job-name=kfm-{name}",
            "#SBATCH --array=0-1%1",
            "#SBATCH --account=med",
            "#SBATCH --constraint=x86",
            f"source {Path(sys.prefix) / 'bin' / 'activate'}",
            f"srun -l -n 1 launch_pickled_pipeline {folder / 'executor.pik'}",
        ):
            assert line in script, (line, script)
        assert json.loads((folder / "ranks_to_run.json").read_text()) == [0, 1]
        with open(folder / "executor.pik", "rb") as f:
            executor = dill.load(f)
        assert executor.job_name == f"kfm-{name}" and executor.depends is None
    assert not (tmp_path / "calls.txt").exists()


# ---- a real one-node Slurm (slow: starts munged, slurmctld and slurmd) ----


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tests.slurm_cluster import missing_slurm, slurm_cluster

    if reason := missing_slurm():
        pytest.skip(reason)
    with slurm_cluster(tmp_path / "slurm") as c:
        monkeypatch.setenv("SLURM_CONF", str(c.conf))  # datatrove calls sbatch with os.environ
        yield c


def slurm_cfg(partition: str, max_array_size: int = 1001) -> ExecutorConfig:
    # Jobs import this test module (Shout) when they unpickle the pipeline.
    slurm = SlurmConfig(
        partition=partition,
        time="10:00",
        env_command=f"export PYTHONPATH={REPO}",
        max_array_size=max_array_size,
    )
    return ExecutorConfig(kind="slurm", slurm=slurm)


@pytest.mark.slow
def test_slurm_runs_two_dependent_arrays(
    cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "w"
    make_inputs(work / "in")
    # 3 tasks in arrays of at most 2: each stage is one array of 2 elements running 2 + 1 tasks.
    cfg = slurm_cfg(cluster.partition, max_array_size=2)
    run_stages(toy_stages(work, tasks=3), cfg, logging_dir=work / "logs")
    printed = capsys.readouterr().out
    assert "stage first: job " in printed and "stage second: job " in printed, printed
    first = printed.split("stage first: job ")[1].split()[0]
    second = printed.split("stage second: job ")[1].split()[0]
    deps = cluster.run("scontrol", "show", "job", second).stdout
    # Slurm clears the field once the dependency is met, which a fast stage 1 may already be.
    assert f"Dependency=afterok:{first}_*" in deps or "Dependency=(null)" in deps, deps
    cluster.wait_idle(timeout=240)
    check_toy_output(work, tasks=3)
    for stage in ("first", "second"):
        slurm_logs = list((work / "logs" / stage / "slurm_logs").glob("*.out"))
        assert len(slurm_logs) == 3, slurm_logs  # 2 array elements + datatrove's merge_stats
        assert "#SBATCH --array=0-1" in (work / "logs" / stage / "launch_script.slurm").read_text()
        assert (work / "logs" / stage / "stats.json").is_file()  # datatrove's merge_stats job
        script = work / "logs" / stage / "launch_script.slurm"
        test_only = cluster.run("sbatch", "--test-only", str(script), check=False)
        assert test_only.returncode == 0, test_only.stderr
    run_stages(toy_stages(work, tasks=3), cfg, logging_dir=work / "logs")  # nothing to submit
    assert "stage second: already complete" in capsys.readouterr().out
    assert not cluster.queued_jobs()


@pytest.mark.slow
def test_slurm_dry_run_submits_nothing_and_scripts_pass_test_only(
    cluster: Any, tmp_path: Path
) -> None:
    make_inputs(tmp_path / "in")
    run_stages(
        toy_stages(tmp_path),
        slurm_cfg(cluster.partition),
        logging_dir=tmp_path / "logs",
        dry_run=True,
    )
    jobs = cluster.run("scontrol", "show", "jobs").stdout
    assert "No jobs in the system" in jobs, jobs
    scripts = write_slurm_scripts(
        toy_stages(tmp_path), slurm_cfg(cluster.partition), tmp_path / "logs"
    )
    assert [s.parent.name for s in scripts] == ["first", "second"]
    for script in scripts:
        test_only = cluster.run("sbatch", "--test-only", str(script), check=False)
        assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    assert "No jobs in the system" in cluster.run("scontrol", "show", "jobs").stdout
    assert not (tmp_path / "calls.txt").exists()


@pytest.mark.slow
def test_slurm_failed_task_blocks_next_stage_and_rerun_resumes(
    cluster: Any, tmp_path: Path
) -> None:
    import time

    work = tmp_path / "w"
    make_inputs(work / "in")
    (work / "crash_once").touch()
    cfg = slurm_cfg(cluster.partition)
    run_stages(toy_stages(work, work / "crash_once"), cfg, logging_dir=work / "logs")
    # Task 1 of stage first fails; afterok then never holds, so stage second must stay pending.
    deadline = time.monotonic() + 120
    while True:
        queue = cluster.run("squeue", "--noheader", "--format=%j %T %r").stdout.split("\n")
        queue = [line for line in queue if line.strip()]
        # (the merge_stats job of stage second waits on a stage that waits: plain "Dependency")
        blocked = "kfm-second PENDING DependencyNeverSatisfied" in queue
        if blocked and all(" PENDING " in line for line in queue):
            break
        assert time.monotonic() < deadline, queue
        time.sleep(0.5)
    assert not (work / "out").exists()
    log = work / "logs" / "first" / "logs" / "task_00001.log"
    assert "simulated crash" in log.read_text()
    assert not (work / "logs" / "first" / "completions" / "00001").exists()
    cluster.run("scancel", "--full", f"--partition={cluster.partition}")
    cluster.wait_idle(timeout=60)

    run_stages(toy_stages(work, work / "crash_once"), cfg, logging_dir=work / "logs")
    assert json.loads((work / "logs" / "first" / "ranks_to_run.json").read_text()) == [1]
    cluster.wait_idle(timeout=240)
    check_toy_output(work)
    calls = sorted((work / "calls.txt").read_text().split())
    assert calls == ["first:0", "first:1", "first:1", "second:0", "second:1"]


@pytest.mark.parametrize("level", [-1, 0, 1])
def test_console_gets_one_line_per_stage(tmp_path: Path, capfd, monkeypatch, level: int) -> None:
    """datatrove's banners and statistics go to the task logs only; the console gets one line
    per stage (none with kfm -q, everything with kfm -v)."""
    from kfm.console import VERBOSITY_ENV

    monkeypatch.setenv(VERBOSITY_ENV, str(level))
    work = tmp_path / "w"
    make_inputs(work / "in")
    run_stages(toy_stages(work), ExecutorConfig(workers=1), logging_dir=work / "logs")
    out, err = capfd.readouterr()
    stage_lines = [line for line in out.splitlines() if line.startswith("stage ")]
    if level >= 0:
        assert [line.split(":")[0] for line in stage_lines] == [
            "stage 1/2 first",
            "stage 2/2 second",
        ]
        assert stage_lines[0].startswith("stage 1/2 first: 2 tasks in ")
    else:
        assert stage_lines == []
    assert ("PIPELINE" in err) == (level == 1), err[-2000:]
    assert "PIPELINE" in (work / "logs" / "first" / "logs" / "task_00000.log").read_text()
    run_stages(toy_stages(work), ExecutorConfig(workers=1), logging_dir=work / "logs")
    if level >= 0:
        assert "stage 1/2 first: nothing to do (2 already complete)" in capfd.readouterr().out
