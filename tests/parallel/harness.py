"""Run `kfm train` under torchrun with N gloo processes (or as one plain process) and read back
what the run wrote: per-step losses, validation metrics, checkpoints, the batch trace.

Every run is a real `python -m torch.distributed.run ... -m kfm_cli train configs/tiny.yaml`, the
same command launch/local.sh runs. Runs are cached per test session by their arguments: a run
that several tests compare against (the single-process reference) starts once. Each process
imports torch (~3-5 s on a busy 2-core machine), so prefer adding asserts to adding runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, tiny_overrides


@dataclass(frozen=True)
class Run:
    """A finished training run."""

    run_dir: Path
    trace_dir: Path
    stdout: str
    stderr: str

    def losses(self) -> dict[int, float]:
        """step -> training loss (a step logged twice keeps the later line)."""
        return losses(self.run_dir)

    def val_losses(self) -> dict[int, float]:
        """step -> validation loss."""
        return {r["step"]: r["val_loss"] for r in self.records() if "val_loss" in r}

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:06d}"

    def trace(self) -> list[dict]:
        """Every micro-batch record of every rank: {"start", "dp_rank", "rows": [hash, ...]}."""
        out = []
        for path in sorted(self.trace_dir.glob("batches_rank*.jsonl")):
            out += [json.loads(line) for line in path.read_text().splitlines()]
        return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from ``run_dir/metrics.jsonl``; a step logged twice (re-run after a
    resume) keeps the later line."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


_CACHE: dict[tuple, Run] = {}


def train_command(
    sources: list[dict], root: Path, name: str, *, nproc: int, args: tuple[str, ...] = ()
) -> list[str]:
    """``kfm train configs/tiny.yaml`` as run ``name`` under ``root`` with ``args`` overrides:
    under torchrun on ``nproc`` gloo processes, or one plain process for ``nproc=0``."""
    train = ["-m", "kfm_cli", "train", "configs/tiny.yaml", *tiny_overrides(sources, root, name)]
    if nproc == 0:
        return [sys.executable, *train, *args]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable, *torchrun, *train, *args]


def run_train(
    sources: list[dict],
    root: Path,
    name: str,
    *,
    nproc: int,
    args: tuple[str, ...] = (),
    timeout: float = 600,
) -> Run:
    """Train configs/tiny.yaml as run ``name`` under ``root``, on ``nproc`` gloo processes.

    ``nproc=0`` runs one plain process without torchrun (the single-process reference: no
    process group at all). ``args`` are extra config overrides. Each rank gets OMP_NUM_THREADS=1
    and writes its batch trace (``--debug.trace_batches``) to ``root/name-trace``. A run with
    the same (root, name, nproc, args) is started once per session and then served from the
    cache.

    Raises:
        AssertionError: the run exited non-zero (stdout/stderr tails in the message).
    """
    key = (str(root), name, nproc, args)
    if key in _CACHE:
        return _CACHE[key]
    trace_dir = root / f"{name}-trace"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # --debug.trace_batches: each rank's consumed samples (kfm/train/debug.py)
    trace = f"--debug.trace_batches={trace_dir}"
    cmd = train_command(sources, root, name, nproc=nproc, args=(trace, *args))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    run = Run(run_dir=root / name, trace_dir=trace_dir, stdout=proc.stdout, stderr=proc.stderr)
    _CACHE[key] = run
    return run


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


_ROOT: list[Path] = []


def shared_root(tmp_path_factory) -> Path:
    """One run root per test session, so test modules share cached runs (e.g. the reference)."""
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("parallel_runs"))
    return _ROOT[0]


STEPS = 10
CKPT_AT = 5
GLOBAL_BATCH = 8  # configs/tiny.yaml
MICRO_BATCH = 2  # so 1, 2 and 4 ranks all hold whole micro-batches: accumulation 4, 2, 1
# grad_clip 0.5 sits below every step's gradient norm (0.66-0.89 here), so clipping of sharded
# (DTensor) gradients is exercised on every step.
COMMON = (
    f"--train.steps={STEPS}",
    f"--train.micro_batch_size={MICRO_BATCH}",
    f"--checkpoint.interval={CKPT_AT}",
    "--optim.grad_clip=0.5",
)


def reference_run(sources: list[dict], root: Path) -> Run:
    """The single-process run (no torchrun, no process group) every parity test compares with."""
    return run_train(sources, root, "single", nproc=0, args=COMMON)


def fsdp_run(sources: list[dict], root: Path, nproc: int, *extra: str) -> Run:
    """FSDP2 on ``nproc`` gloo ranks (mesh from ``extra``, default dp_shard = all ranks)."""
    name = f"fsdp{nproc}" + "".join(e.split(".")[-1].replace("=", "") for e in extra)
    return run_train(sources, root, name, nproc=nproc, args=(*COMMON, *extra))
