"""The training loop, and the set-up that builds what it calls.

``train(cfg)`` joins the process group (under torchrun), takes the run's lock (one writer per
run: kfm/train/lock.py), builds the backend (model, optimizer, schedule, parallel layout,
checkpoints: kfm/train/backends/), opens and checks the data, resumes from the newest valid
checkpoint (listing every config change since it: kfm/train/resume.py), builds the components (metrics, straggler report, evaluation,
checkpointing, guard monitor, debug faults, watchdog, profiler) and hands everything to
`run_loop`, which only steps the backend and calls the components at fixed points.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfm.config import Config, ConfigError
from kfm.data import PackedLoader, validation_batches
from kfm.data.verify import raise_verify_errors, verification_share, verify_shard_sets
from kfm.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
from kfm.tokenizer.identity import training_fit_problem
from kfm.train.backends import Backend, build_backend
from kfm.train.callbacks import (
    BenchmarkHook,
    Callback,
    Checkpointing,
    Evaluator,
    GuardMonitor,
    MetricsReporter,
    Profiler,
    StepInfo,
    TimedBatches,
    throughput_for,
)
from kfm.train.debug import BatchTrace, FaultInjector
from kfm.train.dist import (
    WorldInfo,
    broadcast_from_rank0,
    gather_to_all,
    process_group,
    world_from_env,
)
from kfm.train.guard import BadStepsError
from kfm.train.health import StragglerReport, Watchdog, apply_nccl_debug_env
from kfm.train.init_from import init_from_weights
from kfm.train.lock import RunLock, RunLockedError
from kfm.train.loggers import MetricLogger
from kfm.train.resume import NothingToDo, manifest_identity, resume
from kfm.train.rundir import prepare_run_dir
from kfm.train.signals import StopRequest
from kfm.train.status import write_status
from kfm.train.validation import describe_groups


@dataclass
class Progress:
    """How far the loop got; readable after it raised."""

    step: int
    """The last step completed (its components called)."""


def run_loop(
    cfg: Config,
    backend: Backend,
    batches: TimedBatches,
    components: list[Callback],
    stop: StopRequest,
    progress: Progress,
    *,
    device: torch.device,
) -> int:
    """Step ``backend`` from ``progress.step`` to ``train.steps`` (or until a stop signal every
    rank agrees on), calling every component at its hooks; returns the last step done."""
    start_step = step = progress.step
    error = None
    for c in components:
        c.on_train_start(start_step)
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batches.seconds = 0.0
            for c in components:
                c.on_step_start(step)
            host_s = time.perf_counter() - t0
            out = backend.step(batches, step=step)
            stopping = stop.agreed(device)
            step_s = time.perf_counter() - t0
            info = StepInfo(
                step=step,
                out=out,
                last=stopping or step == cfg.train.steps,
                stopping=stopping,
                host_s=host_s + batches.seconds,
                data_s=batches.seconds,
                step_s=step_s,
            )
            for c in components:
                c.on_step_end(info)
            progress.step = step
            if stopping:
                break
    except BaseException as e:
        error = e
        raise
    finally:
        for c in reversed(components):
            c.on_train_end(step, error)
    return step


def train(cfg: Config, *, benchmark_hook: BenchmarkHook | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (steps done, first/last validation metrics).

    Under torchrun (WORLD_SIZE > 1) it joins the process group first and leaves it at the end.
    ``benchmark_hook``: in-loop benchmarks run at every evaluation (`Evaluator`); kfm_cli builds
    it from eval.tasks with eval.inloop.build_hook.
    """
    world = world_from_env()
    device = resolve_device(cfg.train.device)
    if not world.distributed:
        return _train(cfg, world, device, benchmark_hook)
    if device.type == "cuda":
        # Before the process group exists: NCCL reads the flight-recorder settings at creation.
        apply_nccl_debug_env(Path(cfg.train.run_root) / cfg.train.name)
    with process_group(cfg.parallel, world, device) as rank_device:
        return _train(cfg, world, rank_device, benchmark_hook)


def _train(
    cfg: Config, world: WorldInfo, device: torch.device, benchmark_hook: BenchmarkHook | None
) -> dict[str, Any]:
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    lock = take_run_lock(run_dir, world)  # before anything in the run dir changes
    try:
        return _train_locked(cfg, world, device, lock, benchmark_hook)
    finally:
        if lock is not None:
            lock.release()


def take_run_lock(run_dir: Path, world: WorldInfo) -> RunLock | None:
    """Rank 0 takes the run's lock (`kfm.train.lock`); every rank learns the outcome, so all
    fail together. Returns the lock on rank 0, None elsewhere.

    Raises:
        RunLockedError: another live process trains this run.
        ConfigError: the run dir cannot be created or written (names train.run_root).
    """
    lock, problem = None, None
    if world.rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLockedError as e:
            problem = ("locked", str(e))
        except OSError as e:
            problem = (
                "io",
                f"cannot write the run directory {run_dir} ({e}); set --train.run_root to a "
                "writable directory",
            )
    problem = broadcast_from_rank0(problem)
    if problem is not None:
        kind, message = problem
        raise RunLockedError(message) if kind == "locked" else ConfigError(message)
    return lock


def _train_locked(
    cfg: Config,
    world: WorldInfo,
    device: torch.device,
    lock: RunLock | None,
    benchmark_hook: BenchmarkHook | None,
) -> dict[str, Any]:
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    backend = build_backend(cfg, world, device)
    ok = False
    try:
        verified = verify_data(cfg, world)
        loader = PackedLoader(
            cfg.data.sources,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            seed=cfg.data.seed,
            rank=backend.dp_rank,
            world_size=backend.dp_size,
            verify=cfg.data.verify,
        )
        tok = check_tokenizer(cfg, loader)
        # Recorded in every checkpoint manifest: kfm eval/export check the tokenizer against it,
        # and a resume refuses shards whose content changed under the same path.
        identity = manifest_identity(loader)
        backend.manifest_extra.update(identity)
        try:
            resumed = resume(cfg, backend, loader, world, identity)
            if resumed.path is None and cfg.checkpoint.init_from:
                resumed.notes += init_from_weights(cfg, backend, world, identity)
        except NothingToDo as e:
            ok = True
            return {"run_dir": str(run_dir), "nothing_to_do": str(e)}
        start_step = resumed.step
        # Only now that data, tokenizer and checkpoint agree with the config is it recorded: a
        # refused resume must not overwrite the run's config.yaml with the config refused.
        if world.rank == 0:
            prepare_run_dir(cfg)
            write_status(run_dir, "running", step=start_step)
        logger = MetricLogger(
            cfg,
            run_dir,
            total_steps=cfg.train.steps,
            start_step=start_step,
            enabled=world.rank == 0,
        )
        if lock is not None and lock.took_over:
            logger.info(lock.took_over)
        for line in resumed.log_lines():
            logger.info(line)
        logger.info(backend.describe())
        if verified:
            logger.info(verified)
        batches = TimedBatches(
            BatchTrace(loader, Path(cfg.debug.trace_batches), world.rank)
            if cfg.debug.trace_batches
            else loader
        )
        evaluator = Evaluator(
            cfg,
            backend,
            validation_batches(
                cfg.data.sources,
                seq_len=cfg.data.seq_len,
                micro_batch_size=cfg.train.micro_batch_size,
                n_batches=cfg.eval.batches,
                verify=cfg.data.verify,
            )
            if cfg.eval.interval > 0
            else [],
            token_byte_lengths(tok),
            tok.bos_token_id,
            device,
            logger,
            benchmark_hook=benchmark_hook,
            tokens_seen=lambda: loader.samples_consumed * cfg.data.seq_len,
        )
        if evaluator.batches:
            logger.info(describe_groups(cfg.data.sources))
        components = build_components(cfg, backend, loader, logger, evaluator, world, device)
        stop, progress = StopRequest(), Progress(step=start_step)
        try:
            step = run_loop(cfg, backend, batches, components, stop, progress, device=device)
        except BaseException as e:
            if world.rank == 0:
                # kfm's own errors (config, data, checkpoint, diverging loss) recur on a rerun;
                # anything else (a lost peer, an I/O error) may not. A user's second Ctrl-C
                # (KeyboardInterrupt) means stop, not requeue.
                retry = not isinstance(
                    e, ConfigError | BadStepsError | ValueError | KeyboardInterrupt
                )
                write_status(
                    run_dir, "failed", step=progress.step, reason=repr(e)[:500], requeue=retry
                )
            raise
        finally:
            stop.restore()
            logger.close()
        if world.rank == 0:
            done = step == cfg.train.steps  # a signal on the last step changes nothing
            write_status(
                run_dir, "finished" if done else "stopped", step=step, reason=stop.signal_name
            )
        if stop.requested or step < cfg.train.steps:
            logger.info(
                f"{stop.signal_name or 'stop signal on another rank'} received: "
                f"checkpoint saved at step {step}, exiting"
            )
        ok = True
    finally:
        backend.close(wait=ok)  # after an error a save in flight is abandoned, not waited for
    return {
        "run_dir": str(run_dir),
        "start_step": start_step,
        "steps_done": step,
        "stopped_by_signal": stop.signal_name,
        **evaluator.results,
    }


def build_components(
    cfg: Config,
    backend: Backend,
    loader: PackedLoader,
    logger: MetricLogger,
    evaluator: Evaluator,
    world: WorldInfo,
    device: torch.device,
) -> list[Callback]:
    """The loop's components, in the order it calls them: metrics and the straggler report first
    (they read the step), then evaluation and the checkpoint (so a fault injected after the step
    finds its checkpoint written), the guard's stop check, the debug faults, and the watchdog's
    heartbeat last."""
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    guard = backend.guard
    components: list[Callback] = [
        MetricsReporter(
            cfg,
            logger,
            throughput_for(cfg, device, world.world_size),
            device,
            guard,
            tokens_seen=lambda: loader.samples_consumed * cfg.data.seq_len,
        ),
        StragglerReport(cfg, logger, world),
        evaluator,
        Checkpointing(cfg, backend, loader, logger),
        GuardMonitor(guard),
    ]
    if cfg.debug.faults:
        components.append(FaultInjector(cfg.debug.faults, backend, world.rank))
    if cfg.health.watchdog_s > 0:
        components.append(Watchdog(cfg.health, run_dir, world.rank))
    if cfg.health.profile_steps:
        components.append(Profiler(cfg, run_dir, world.rank))
    return components


def verify_data(cfg: Config, world: WorldInfo) -> str | None:
    """``data.verify: spread``: every rank checks its share of the shard files (file i by rank
    i mod world size: sha256 of .bin and .idx, the document index), the findings are gathered,
    and any rank's problem stops every rank. Returns a log line, or None for other modes (the
    loader's own open checks sizes, or hashes everything on every rank with ``sha256``).

    Raises:
        ShardError: listing every problem found on any rank.
    """
    if cfg.data.verify != "spread":
        return None
    errors = verify_shard_sets(cfg.data.sources, rank=world.rank, world_size=world.world_size)
    raise_verify_errors(gather_to_all(errors))
    share = verification_share(cfg.data.sources, rank=world.rank, world_size=world.world_size)
    return f"data.verify=spread: {share.describe()}"


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible (set --train.device=cpu)"
        )
    return torch.device(name)


def seed_everything(seed: int, *, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def check_tokenizer(cfg: Config, loader: PackedLoader) -> Any:
    """Load the tokenizer and check it is the one the shards were packed with and fits the model."""
    tok = load_tokenizer(cfg.tokenizer.path)
    problem = training_fit_problem(
        cfg.tokenizer.path,
        len(tok),
        tokenizer_hash(cfg.tokenizer.path),
        vocab_size=cfg.model.vocab_size,
        shard_hashes={name: m["tokenizer_hash"] for name, m in loader.manifests.items()},
    )
    if problem:
        raise ConfigError(problem)
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"shards hold token ids up to vocab {loader.vocab_size} > model.vocab_size="
            f"{cfg.model.vocab_size} (set --model.vocab_size to at least {loader.vocab_size})"
        )
    return tok
