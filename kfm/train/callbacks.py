"""Components the training loop calls at fixed points: metrics, evaluation, checkpoints, the guard
monitor and the profiler (the watchdog, the straggler report and the debug fault injector live in
kfm/train/health.py and kfm/train/debug.py).

Every component is a `Callback`; the loop calls, on every rank and in list order::

    on_train_start(step)          after build and resume, before the first step
    on_step_start(step)           before the backend's step
    on_step_end(info)             after it, with the step's output and timings
    on_train_end(step, error)     when the loop ends, normally or by an exception

A component that runs a collective must do so on every rank at the same steps (log steps are the
same everywhere); only rank 0 writes logs. A new concern is a new component, not a loop branch.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kfm.config import Config
from kfm.data import Batch, PackedLoader
from kfm.model.flops import flops_per_token, peak_flops
from kfm.train.backends.base import Backend, StepOutput
from kfm.train.dist import gather_to_all, is_distributed
from kfm.train.loggers import MetricLogger
from kfm.train.ramp import global_batch_at, ramp_on
from kfm.train.validation import evaluate


@dataclass
class StepInfo:
    """One finished step as the components see it."""

    step: int
    out: StepOutput
    last: bool
    """The loop ends after this step (all steps done, or a stop was agreed)."""
    stopping: bool
    """A stop signal was agreed this step: the run saves and exits."""
    host_s: float
    """This rank's own host work in the step: on_step_start components plus data loading."""
    data_s: float
    """Of which loading batches (PackedLoader.next_batch)."""
    step_s: float = 0.0
    """Wall seconds of the step itself on this rank: on_step_start components, data, forward,
    backward, update and the stop check; not the on_step_end components (evaluation,
    checkpoints, logging)."""


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, step: int) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        pass

    def on_step_end(self, info: StepInfo) -> None:
        pass

    def on_train_end(self, step: int, error: BaseException | None) -> None:
        pass


class TimedBatches:
    """The loader as the backend sees it, timing `next_batch` (this rank's data loading)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.seconds = 0.0

    def next_batch(self) -> Batch:
        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        self.seconds += time.perf_counter() - t0
        return batch


def is_log_step(cfg: Config, info: StepInfo) -> bool:
    return info.step % cfg.logging.interval == 0 or info.last


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory (CUDA) or peak resident set size of the process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@dataclass
class Throughput:
    """Tokens/s, TFLOP/s and MFU of a window of steps. Per device = over all ranks (data, tensor
    parallel alike) divided by the world size: each device's share of the global work."""

    tokens_per_step: int
    flops_per_token: float
    world_size: int
    peak_flops_per_device: float | None

    def figures(
        self, steps: int, seconds: float, *, tokens: int | None = None
    ) -> dict[str, float | None]:
        """Figures of ``steps`` steps in ``seconds``; ``tokens``: the global tokens they trained
        on, if not ``steps * tokens_per_step`` (a batch-size ramp)."""
        tokens_global = (steps * self.tokens_per_step if tokens is None else tokens) / seconds
        per_device = tokens_global / self.world_size
        flops_per_device = per_device * self.flops_per_token
        peak = self.peak_flops_per_device
        return {
            "step_time_s": seconds / steps,
            "tokens_per_s_global": tokens_global,
            "tokens_per_s_per_device": per_device,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_per_device / peak if peak else None,
        }


def throughput_for(cfg: Config, device: torch.device, world_size: int) -> Throughput:
    """The throughput model of a run: global batch tokens, the model's training FLOPs per token,
    and the peak of one device for the compute dtype (fp8 when parallel.fp8 is on)."""
    dtype = "fp8" if cfg.parallel.fp8 != "none" else cfg.train.dtype
    peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else peak_flops(device, dtype)
    return Throughput(
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
        world_size=world_size,
        peak_flops_per_device=peak,
    )


class MetricsReporter(Callback):
    """Loss, gradient norm, lr, skipped updates and throughput on log steps (all ranks take part:
    reading the loss syncs the device; only rank 0 writes). Throughput counts each step's own
    batch; with a batch-size ramp (train.batch_ramp_start) the log steps also record
    ``batch_size`` (sequences in that step's global batch) and ``tokens`` (trained on so far,
    from ``tokens_seen``)."""

    def __init__(
        self,
        cfg: Config,
        logger: MetricLogger,
        throughput: Throughput,
        device: torch.device,
        guard: Any,
        *,
        tokens_seen: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokens_seen = tokens_seen
        self.logger = logger
        self.throughput = throughput
        self.device = device
        self.guard = guard
        self._t_last = 0.0
        self._step_last = 0
        self._tokens = 0
        """Global tokens of the steps since the last log line (each step's own batch)."""
        self.train_s = 0.0
        """Training seconds of this process so far: the sum of every step's ``step_s``."""

    def on_train_start(self, step: int) -> None:
        self._t_last, self._step_last = time.perf_counter(), step

    def on_step_end(self, info: StepInfo) -> None:
        self.train_s += info.step_s
        batch = global_batch_at(info.step, self.cfg.train)
        self._tokens += batch * self.cfg.data.seq_len
        if is_log_step(self.cfg, info):
            # .item() syncs the device: only on log steps, which every rank takes together.
            metrics: dict[str, Any] = {
                "loss": info.out.loss.item(),
                "grad_norm": info.out.grad_norm.item(),
                "lr": info.out.lr,
                "skipped": bool(info.out.skipped.item()),
                "skipped_total": int(self.guard.skipped.item()),
            }
            seconds = time.perf_counter() - self._t_last
            metrics |= self.throughput.figures(
                info.step - self._step_last, seconds, tokens=self._tokens
            )
            if ramp_on(self.cfg.train):
                metrics["batch_size"] = batch
                if self.tokens_seen is not None:
                    metrics["tokens"] = self.tokens_seen()
            metrics["peak_memory_gb"] = peak_memory_gb(self.device)
            metrics["train_s"] = self.train_s
            self.logger.log(info.step, metrics)
            self._t_last, self._step_last = time.perf_counter(), info.step
            self._tokens = 0
        elif info.out.skipped.device.type == "cpu" and info.out.skipped.item():
            # On CPU reading the flag costs nothing: say so on the step it happens.
            self.logger.warning(f"step {info.step}: update skipped (non-finite or spiking loss)")
        self.logger.advance()


class GuardMonitor(Callback):
    """Stops the run once the guard has skipped ``guard.max_consecutive_skips`` updates in a row."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def on_step_end(self, info: StepInfo) -> None:
        self.guard.poll(info.step)


BenchmarkHook = Callable[[nn.Module, int], dict[str, float]]
"""In-loop benchmarks: ``hook(model, step)`` scores the live model and returns metrics named
``bench/<task>/<metric>``. Every rank calls it at the same steps (the work is split across them).
kfm_cli builds one from eval/ (eval.inloop.build_hook); kfm/train never imports eval/."""


@dataclass
class Evaluator(Callback):
    """Validation loss and bits per byte (overall, per source, per language) every
    ``eval.interval`` steps, at the end, and at step 0 of a fresh run with ``eval.at_start``;
    then the benchmark hook, if any. Every rank takes part: each evaluates its data-parallel share
    of the batches (a sharded model's forward needs all ranks) and the sums are all-reduced.

    Logged with the step: val_loss, val_bpb, val_tokens, val_bpb/<source>, val_bpb/lang/<code>,
    the hook's bench/<task>/<metric>, ``tokens`` (tokens trained on so far, over all ranks) and
    the seconds each part took (val_time_s, bench_time_s). With train.ema_decay the same
    validation of the EMA weights too: ema/val_loss, ema/val_bpb, ema/val_bpb/<source>...,
    ema/val_time_s (a second validation pass; the benchmark hook sees the training weights)."""

    cfg: Config
    backend: Backend
    batches: list
    token_bytes: np.ndarray
    bos_id: int | None
    device: torch.device
    logger: MetricLogger
    results: dict[str, Any] = field(default_factory=dict)
    benchmark_hook: BenchmarkHook | None = None
    tokens_seen: Callable[[], int] | None = None
    """Tokens trained on so far, over all ranks (the loader's samples_consumed * seq_len)."""
    _contributes: bool | None = None

    def _contributes_to_sums(self) -> bool:
        """Whether this rank's sums count: the first rank of each data-parallel replica (one
        gather of the dp ranks, on the first evaluation)."""
        if self._contributes is None:
            dp_ranks = gather_to_all(self.backend.dp_rank)
            rank = dist.get_rank() if is_distributed() else 0
            self._contributes = dp_ranks.index(self.backend.dp_rank) == rank
        return self._contributes

    def _validate(self) -> dict[str, Any]:
        return evaluate(
            self.backend.module,
            self.batches,
            token_bytes=self.token_bytes,
            bos_id=self.bos_id,
            device=self.device,
            autocast_dtype=self.backend.autocast_dtype,
            sources=self.cfg.data.sources,
            dp_rank=self.backend.dp_rank,
            dp_size=self.backend.dp_size,
            contributes=self._contributes_to_sums(),
        )

    def _run(self, step: int) -> None:
        model = self.backend.module
        t0 = time.perf_counter()
        metrics: dict[str, Any] = self._validate()
        metrics["val_time_s"] = time.perf_counter() - t0
        ema = self.backend.ema
        if ema is not None:
            # The same batches on the EMA weights, swapped into the live model and back.
            t0 = time.perf_counter()
            with ema.applied():
                averaged = self._validate()
            metrics |= {f"ema/{k}": v for k, v in averaged.items() if k != "val_tokens"}
            metrics["ema/val_time_s"] = time.perf_counter() - t0
        if self.benchmark_hook is not None:
            t0 = time.perf_counter()
            was_training = model.training
            model.eval()
            dtype = self.backend.autocast_dtype
            ctx = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
            with torch.no_grad(), ctx:
                bench = self.benchmark_hook(model, step)
            model.train(was_training)
            metrics |= bench
            metrics["bench_time_s"] = time.perf_counter() - t0
        if self.tokens_seen is not None:
            metrics["tokens"] = self.tokens_seen()
        self.results.setdefault("first_eval", metrics)
        self.results["last_eval"] = metrics
        self.logger.log(step, metrics)

    def on_train_start(self, step: int) -> None:
        if step == 0 and self.batches and self.cfg.eval.at_start:
            self._run(0)

    def on_step_end(self, info: StepInfo) -> None:
        interval = self.cfg.eval.interval
        if self.batches and (info.last or info.step % interval == 0):
            self._run(info.step)


class Checkpointing(Callback):
    """A checkpoint every ``checkpoint.interval`` steps, on the last step and when stopping; the
    save in flight is finished when the loop ends (normally or not)."""

    def __init__(
        self, cfg: Config, backend: Backend, loader: PackedLoader, logger: MetricLogger
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.loader = loader
        self.logger = logger

    def on_step_end(self, info: StepInfo) -> None:
        done = self.backend.poll()  # an asynchronous save that has finished meanwhile
        if done is not None:
            self.logger.info(f"saved checkpoint {done}")
        interval = self.cfg.checkpoint.interval
        if not (info.last or (interval > 0 and info.step % interval == 0)):
            return
        done = self.backend.wait()  # the previous save, if still in flight
        if done is not None:
            self.logger.info(f"saved checkpoint {done}")
        # The backend adds its own state (scheduler) and the RNG states.
        self.backend.save(
            info.step,
            {
                "step": info.step,
                "loader": self.loader.state_dict(),
                "numpy_version": np.__version__,
            },
        )

    def on_train_end(self, step: int, error: BaseException | None) -> None:
        if error is not None:
            return  # a save in flight may need ranks that are gone: the backend abandons it
        done = self.backend.wait()
        if done is not None:
            self.logger.info(f"saved checkpoint {done}")


class Profiler(Callback):
    """torch.profiler trace of steps [first, last] of ``health.profile_steps`` into
    RUN_DIR/profile/ (one Chrome trace per rank)."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int) -> None:
        self.first, self.last = cfg.health.profile_steps
        self.out = run_dir / "profile"
        self.rank = rank
        self._prof: torch.profiler.profile | None = None

    def on_step_start(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()

    def on_step_end(self, info: StepInfo) -> None:
        if self._prof is not None and (info.step == self.last or info.last):
            self._stop()

    def on_train_end(self, step: int, error: BaseException | None) -> None:
        if self._prof is not None:
            self._stop()

    def _stop(self) -> None:
        assert self._prof is not None
        self._prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        self._prof = None
