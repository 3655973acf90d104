"""Run the curation stages on datatrove's local executor (default) or as Slurm job arrays.

Both keep datatrove's resume rule: a task that finished wrote ``<logs>/<stage>/completions/NNNNN``
and is skipped by the next run of the same command, so a rerun after a crash or a preemption
redoes only the unfinished tasks. Per-task logs are ``<logs>/<stage>/logs/task_NNNNN.log``; the
console gets one line per finished stage and the tasks' warnings (``kfm -v``: datatrove's full
per-task logs too).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.stage import Stage
from data_pipeline.steps import require_datatrove
from kfm.console import NORMAL, VERBOSE, verbosity

try:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.executor.slurm import SlurmPipelineExecutor

    _DATATROVE_MISSING: ImportError | None = None
except ImportError as e:  # configs and plans stay usable without datatrove
    LocalPipelineExecutor = SlurmPipelineExecutor = object
    _DATATROVE_MISSING = e

_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_RESERVED_SBATCH = ("array", "dependency", "job-name", "cpus-per-task")
"""#SBATCH options kfm derives from the stages; sbatch_args may not override them."""


@dataclass(kw_only=True, slots=True)
class SlurmConfig:
    """How each stage becomes a Slurm job array (datatrove's SlurmPipelineExecutor)."""

    partition: str = ""
    """Partition the arrays run in (`sinfo` lists them); required when executor.kind=slurm."""
    time: str = "24:00:00"
    """Wall-clock limit of one array task, in Slurm's format ([D-]HH:MM:SS)."""
    mem_per_cpu_gb: int = 2
    """Memory per allocated CPU in GB (--mem-per-cpu); raise cpus_per_task for more per task."""
    qos: str | None = None
    """Quality of service (--qos); None = the cluster's default."""
    account: str | None = None
    """Account charged (--account); None = your default account."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra #SBATCH lines, option name without dashes -> value ("" for a bare flag)."""
    max_array_size: int = 1001
    """Largest job array the cluster accepts (scontrol show config | grep MaxArraySize, minus 1);
    a stage with more tasks runs several tasks one after another in each array element (so
    `time` must cover them); -1 = no limit."""
    venv_path: str | None = None
    """Python venv activated in every job (source <venv>/bin/activate); None = the venv that runs
    this kfm, if any. The job needs datatrove's `launch_pickled_pipeline` and kfm importable."""
    env_command: str | None = None
    """Shell command run in every job after the venv is activated (module load ..., export ...)."""
    randomize_start_seconds: int = 0
    """Each task first sleeps a random 0..N seconds, so that thousands of tasks starting at once
    do not hammer a shared file system; 0 = start at once."""

    def __post_init__(self) -> None:
        if not _SLURM_TIME.fullmatch(self.time):
            raise ValueError(
                f"executor.slurm.time={self.time!r} is not a Slurm time: use [D-]HH:MM:SS, "
                'e.g. --executor.slurm.time="2-00:00:00"'
            )
        if self.mem_per_cpu_gb < 1:
            raise ValueError(f"executor.slurm.mem_per_cpu_gb={self.mem_per_cpu_gb} must be >= 1")
        if self.max_array_size == 0 or self.max_array_size < -1:
            raise ValueError(
                f"executor.slurm.max_array_size={self.max_array_size} must be >= 1 or -1 (no limit)"
            )
        if self.randomize_start_seconds < 0:
            raise ValueError(
                f"executor.slurm.randomize_start_seconds={self.randomize_start_seconds} must be >= 0"
            )
        for key in self.sbatch_args:
            if key.startswith("-") or key in _RESERVED_SBATCH:
                raise ValueError(
                    f"executor.slurm.sbatch_args: {key!r} is not allowed: write option names "
                    f"without dashes, and not {_RESERVED_SBATCH} (kfm sets those per stage)"
                )


@dataclass(kw_only=True, slots=True)
class ExecutorConfig:
    """Where the stages run: this machine (local) or a Slurm cluster."""

    kind: Literal["local", "slurm", "ray"] = "local"
    """local: datatrove's process pool here; slurm: one job array per stage; ray: not wired yet."""
    workers: int = -1
    """Tasks running at once: local -1 = min(tasks, CPU cores); slurm -1 = no limit (array %N)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Partition, time, memory and job environment when kind=slurm."""
    logging_dir: str | None = None
    """Logs, completion markers, stats and sbatch scripts; None = <output_dir>/logs."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; run_stages calls it again since the CLI may change ``kind``."""
        if self.workers == 0 or self.workers < -1:
            raise ValueError(f"executor.workers={self.workers} must be >= 1 or -1 (automatic)")
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError(
                "executor.slurm.partition is empty but executor.kind=slurm: set "
                "--executor.slurm.partition=<name> (sinfo lists the partitions)"
            )


class TaskFailedError(RuntimeError):
    """A task of a stage raised; the message names the stage, the rank and the task's log file."""

    def __init__(self, stage: str, rank: int, log_file: str, cause: str) -> None:
        # All four go to RuntimeError's args so that the error pickles back from a pool worker.
        super().__init__(stage, rank, log_file, cause)
        self.stage, self.rank, self.log_file, self.cause = stage, rank, log_file, cause

    def __str__(self) -> str:
        return (
            f"stage {self.stage!r}, task {self.rank} failed: {self.cause}\n"
            f"  log: {self.log_file}\n"
            "  fix the cause and rerun the same command: completed tasks are skipped"
        )


class _Console:
    """The console as datatrove's loggers see it while kfm runs a stage.

    datatrove (loguru) writes every task's banner, pipeline listing and statistics table to the
    console as well as to the task's log file (``<logs>/<stage>/logs/task_NNNNN.log``). Given as
    the console, this object passes on what is not a log record unchanged, and of log records
    only warnings and errors, as one line each without traceback (a failed task's exception
    reaches the command line as TaskFailedError, naming its log file, which holds the traceback).
    """

    def __init__(self, stream: Any, label: str) -> None:
        self.stream = stream
        self.label = label

    def write(self, text: str) -> int:
        record = getattr(text, "record", None)  # loguru hands sinks a str with its record
        if record is None:
            return self.stream.write(text)
        if record["level"].no < _WARNING or record["exception"] is not None:
            return len(text)
        first = str(record["message"]).strip().splitlines()[0] if record["message"] else ""
        return self.stream.write(f"{self.label}: {record['level'].name.lower()}: {first}\n")

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding...
        return getattr(self.stream, name)


_WARNING = 30
"""loguru's (and logging's) level number of WARNING."""


@contextmanager
def _quiet_datatrove(label: str, *, task: bool) -> Iterator[None]:
    """Inside: loguru sinks added on ``sys.stderr`` (datatrove's task and default loggers) and
    this process's default sink go through `_Console`. After a ``task`` (which may run in a
    pool worker, where datatrove then logs "k/N tasks completed") the default sink stays
    filtered; after a stage, datatrove's default sink is back. Does nothing with ``kfm -v``."""
    if verbosity() >= VERBOSE:
        yield
        return
    from loguru import logger

    real = sys.stderr
    sys.stderr = _Console(real, label)
    try:
        logger.remove()
        logger.add(sys.stderr, level=0, format="{message}")
        yield
    finally:
        sys.stderr = real
        logger.remove()  # datatrove re-added its default sink on our console after each task
        if task:
            logger.add(_Console(real, label), level=0, format="{message}")
        else:
            from datatrove.utils.logging import setup_default_logger

            setup_default_logger()


class _LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, whose failed tasks raise TaskFailedError."""

    def __init__(self, *args: Any, stage: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        try:
            with _quiet_datatrove(f"{self.stage} task {rank}", task=True):
                return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as e:
            # SystemExit etc. are left alone: a pool worker that dies never reports back, so
            # only exceptions can be turned into an error naming the task.
            log = self.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")
            raise TaskFailedError(self.stage, rank, log, f"{type(e).__name__}: {e}") from e


def _require_datatrove() -> None:
    require_datatrove("running the pipeline", _DATATROVE_MISSING)


def _check_stages(stages: list[Stage]) -> None:
    if not stages:
        raise ValueError("no stages to run")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique (they name log folders): {names}")


def local_workers(stage: Stage, cfg: ExecutorConfig) -> int:
    """Tasks of ``stage`` run at once locally: ``cfg.workers``, or min(tasks, CPU cores) if -1."""
    cores = os.cpu_count() or 1
    return min(stage.tasks, cfg.workers if cfg.workers != -1 else cores)


def _env_command(slurm: SlurmConfig) -> str | None:
    venv = slurm.venv_path or (sys.prefix if sys.prefix != sys.base_prefix else None)
    lines = [f"source {Path(venv) / 'bin' / 'activate'}"] if venv else []
    if slurm.env_command:
        lines.append(slurm.env_command)
    return " && ".join(lines) or None


def tasks_per_array_element(stage: Stage, slurm: SlurmConfig) -> int:
    """Tasks one Slurm array element runs in turn, so that a stage fits in one array.

    One array per stage keeps ``afterok`` exact: datatrove splits a larger stage into arrays
    chained with ``afterany`` and makes the next stage wait on the last one only, which would
    start it even when an earlier array failed.
    """
    if slurm.max_array_size == -1:
        return 1
    return math.ceil(stage.tasks / slurm.max_array_size)


def _slurm_executor(stage: Stage, cfg: ExecutorConfig, logs: Path, depends: Any) -> Any:
    s = cfg.slurm
    extra = dict(s.sbatch_args)
    if s.account:
        extra["account"] = s.account
    return SlurmPipelineExecutor(
        pipeline=stage.pipeline,
        tasks=stage.tasks,
        time=s.time,
        partition=s.partition,
        cpus_per_task=stage.cpus_per_task,
        mem_per_cpu_gb=s.mem_per_cpu_gb,
        workers=cfg.workers,
        job_name=f"kfm-{stage.name}",
        qos=s.qos,
        env_command=_env_command(s),
        sbatch_args=extra,
        max_array_size=s.max_array_size,
        tasks_per_job=tasks_per_array_element(stage, s),
        depends=depends,
        logging_dir=str(logs / stage.name),
        skip_completed=True,
        randomize_start_duration=s.randomize_start_seconds,
        # no mail: datatrove only adds --mail-type when mail_user is set
    )


def _slurm_executors(stages: list[Stage], cfg: ExecutorConfig, logs: Path) -> list[Any]:
    executors: list[Any] = []
    for stage in stages:
        executors.append(_slurm_executor(stage, cfg, logs, executors[-1] if executors else None))
    return executors


def submit_slurm(
    stages: list[Stage], cfg: ExecutorConfig, logging_dir: str | Path
) -> dict[str, str]:
    """Submit one job array per stage, each ``afterok`` the previous; returns stage -> job id.

    The id is "-1" for a stage whose tasks had all completed (nothing submitted; its dependents
    then start without waiting). Raises CalledProcessError when sbatch refuses a script.
    """
    executors = _slurm_executors(stages, cfg, Path(logging_dir))
    executors[-1].run()  # datatrove submits the dependencies first, outside of a Slurm job
    return {stage.name: str(ex.job_id) for stage, ex in zip(stages, executors, strict=True)}


def write_slurm_scripts(
    stages: list[Stage], cfg: ExecutorConfig, logging_dir: str | Path
) -> list[Path]:
    """Write each stage's sbatch script, pickled executor and rank list; submit nothing.

    Returns the scripts' paths (``<logs>/<stage>/launch_script.slurm``). Pickling here also
    proves the pipeline can travel to the compute nodes. A stage whose tasks all completed
    gets no script.
    """
    import json

    import dill
    from dill import CONTENTS_FMODE

    scripts = []
    for ex in _slurm_executors(stages, cfg, Path(logging_dir)):
        ex.depends = None  # as datatrove does before pickling: the dependency is by job id
        ranks = ex.get_incomplete_ranks()
        if not ranks:
            continue
        with ex.logging_dir.open("executor.pik", "wb") as f:
            dill.dump(ex, f, fmode=CONTENTS_FMODE)
        with ex.logging_dir.open("ranks_to_run.json", "w") as f:
            json.dump(ranks, f)
        n_elements = math.ceil(len(ranks) / ex.tasks_per_job)
        pickled = ex.logging_dir.resolve_paths("executor.pik")
        # the same command datatrove's launch_job puts in the script
        script = ex.get_launch_file_contents(
            ex.get_sbatch_args(n_elements), f"srun -l -n 1 launch_pickled_pipeline {pickled}"
        )
        with ex.logging_dir.open("launch_script.slurm", "w") as f:
            f.write(script)
        scripts.append(Path(ex.logging_dir.resolve_paths("launch_script.slurm")))
    return scripts


def run_stages(
    stages: list[Stage], cfg: ExecutorConfig, *, logging_dir: str | Path, dry_run: bool = False
) -> None:
    """Run ``stages`` in order (local) or submit them as dependent job arrays (slurm).

    local: blocks until the last stage finished; a task that raises stops the run with
    TaskFailedError (stage, rank, log file) before the next stage starts. slurm: returns after
    submission and prints the job ids. ``dry_run``: local runs nothing, slurm writes the sbatch
    scripts without submitting them (see :func:`plan_text` for what would run).

    Raises:
        ValueError: bad config (names the key) or stages.
        ImportError: datatrove (``pip install 'kfm[data]'``) or Ray (``pip install ray``) missing.
    """
    cfg.validate()
    _check_stages(stages)
    logs = Path(logging_dir)
    if cfg.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ImportError("executor.kind=ray needs Ray: pip install ray") from e
        raise NotImplementedError(
            "executor.kind=ray is not wired up yet: use --executor.kind=local or slurm"
        )
    _require_datatrove()
    if cfg.kind == "slurm":
        if dry_run:
            for script in write_slurm_scripts(stages, cfg, logs):
                print(f"wrote {script} (not submitted)")
            return
        for name, job_id in submit_slurm(stages, cfg, logs).items():
            state = "already complete, nothing submitted" if job_id == "-1" else f"job {job_id}"
            print(f"stage {name}: {state}", flush=True)
        return
    if dry_run:
        return
    for i, stage in enumerate(stages, start=1):
        # No datatrove `depends=` chain: the stages already run one by one and each is checked
        # complete below. A chain would also pickle every earlier executor into each pool task
        # of a later stage, and a stage run in this process (one worker, e.g. tasks: 1) keeps
        # the steps it ran, loaded models included, which cannot be pickled.
        executor = _LocalExecutor(
            stage.pipeline,
            stage=stage.name,
            tasks=stage.tasks,
            workers=local_workers(stage, cfg),
            logging_dir=str(logs / stage.name),
            skip_completed=True,
        )
        todo = len(executor.get_incomplete_ranks())
        started = time.perf_counter()
        with _quiet_datatrove(stage.name, task=False):
            executor.run()
        if missing := executor.get_incomplete_ranks():
            raise RuntimeError(
                f"stage {stage.name!r}: tasks {missing} did not complete; see "
                f"{logs / stage.name / 'logs'} and rerun the same command"
            )
        if verbosity() >= NORMAL:
            print(_stage_line(i, len(stages), stage, todo, time.perf_counter() - started))


def _stage_line(i: int, n: int, stage: Stage, ran: int, seconds: float) -> str:
    """One console line per finished stage: "stage 2/5 dedup: 4 tasks in 12.3 s" (or how many
    were already complete from an earlier run)."""
    done = stage.tasks - ran
    what = f"{ran} task{'s' if ran != 1 else ''} in {seconds:.1f} s" if ran else "nothing to do"
    if done:
        what += f" ({done} already complete)"
    return f"stage {i}/{n} {stage.name}: {what}"


def plan_text(stages: list[Stage], cfg: ExecutorConfig, logging_dir: str | Path) -> str:
    """What ``run_stages`` would do: stages in order, tasks, executor, log folders, sbatch scripts."""
    _check_stages(stages)
    logs, s = Path(logging_dir), cfg.slurm
    lines = [f"executor: {cfg.kind}", f"logging_dir: {logs}"]
    if cfg.kind == "slurm":
        lines.append(
            f"slurm: partition={s.partition} time={s.time} mem_per_cpu_gb={s.mem_per_cpu_gb}"
            f" qos={s.qos} account={s.account} max_array_size={s.max_array_size}"
            f" workers={cfg.workers} env={_env_command(s)!r}"
        )
    for i, stage in enumerate(stages):
        n_steps = len(stage.pipeline)
        steps = ", ".join(type(p).__name__ for p in stage.pipeline)
        head = f"{i + 1}. {stage.name}: {stage.tasks} tasks x {stage.cpus_per_task} cpu"
        if cfg.kind == "local":
            head += f", {local_workers(stage, cfg)} at once"
        lines += [head, f"   steps ({n_steps}): {steps}", f"   logs: {logs / stage.name}"]
        if cfg.kind == "slurm":
            per = tasks_per_array_element(stage, s)
            size = f"array of {math.ceil(stage.tasks / per)}" + (
                f" x {per} tasks" if per > 1 else ""
            )
            after = f"afterok:{stages[i - 1].name}" if i else "none"
            lines += [
                f"   sbatch: {logs / stage.name / 'launch_script.slurm'}"
                f" (job kfm-{stage.name}, {size}, dependency {after})"
            ]
    return "\n".join(lines)
