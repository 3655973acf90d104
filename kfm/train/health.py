"""Run health: the hang watchdog, the NCCL flight recorder settings and the per-rank straggler
report (docs/training.md, "Hangs and stragglers").

`Watchdog`: if no step completes for ``health.watchdog_s`` seconds (``watchdog_first_step_s``
for the first step after start or resume), the rank writes every thread's Python stack to stderr
and to ``RUN_DIR/hang_rank{rank}.txt`` and exits with `WATCHDOG_EXIT_CODE` (124, as timeout(1)).
When one rank blocks, the others block in the next collective, so every rank's watchdog fires:
each rank leaves its own dump, torchrun sees failed workers and ends, and the Slurm script
(launch/slurm/train.sbatch) requeues the job (rank 0 records ``failed``, ``requeue: true`` with
the reason in status.json).

`nccl_debug_env` / `apply_nccl_debug_env`: the NCCL flight recorder (a ring buffer of the last
collectives of every process group) and where it is dumped.

`StragglerReport`: on log steps, every rank contributes its own per-step work (host work and the
optimizer update: the parts no collective has equalised yet); rank 0 names the ranks well above
the median, with host and local rank, on the console and in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from kfm.config import Config, HealthConfig
from kfm.train.callbacks import Callback, StepInfo, is_log_step
from kfm.train.dist import WorldInfo, is_distributed
from kfm.train.loggers import MetricLogger
from kfm.train.status import write_status

WATCHDOG_EXIT_CODE = 124
"""Exit status of a rank whose watchdog fired (as timeout(1)); torchrun reports it per rank
("exitcode: 124") and itself exits 1."""

EXIT_GRACE_S = 5.0
"""After dumping, a rank waits this long before exiting, so that the ranks whose deadline comes
a moment later (rank 0 logs after each step, so it arrives last) dump too instead of failing in
a collective the exiting rank breaks off."""

BACKSTOP_S = 120.0
"""A C-level faulthandler timer dumps the stacks to stderr and exits (status 1) this long after
the deadline if the watchdog thread itself cannot run (a hang in C code that holds the GIL)."""

FLIGHT_RECORDER_BUFFER = "2000"
"""Collectives kept per process in the NCCL flight recorder's ring buffer."""


def nccl_debug_env(run_dir: Path) -> dict[str, str]:
    """The environment that turns on the NCCL flight recorder (torch 2.13 names and aliases):

    - ``TORCH_FR_BUFFER_SIZE`` / ``TORCH_NCCL_TRACE_BUFFER_SIZE``: entries in each process's ring
      buffer of collectives (start/end, sequence id, sizes, state, Python stack); 0 disables.
    - ``TORCH_NCCL_DUMP_ON_TIMEOUT=1``: when a collective times out (the process group timeout,
      ``parallel.collective_timeout_s``) the NCCL watchdog writes the buffer to a file per rank
      before aborting; needs ``TORCH_NCCL_ENABLE_MONITORING=1`` (the default) and a buffer.
    - ``TORCH_FR_DUMP_TEMP_FILE`` / ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``: the dump path prefix; the
      rank number is appended: ``RUN_DIR/nccl_trace_rank<r>``.
    - ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (TearDown): a failed or timed-out collective tears the
      process down instead of leaving it blocked (torch's own default is 3, SkipCleanUp; torchrun
      already sets 1 for its workers unless the variable is set).

    Read the dumps with ``torchfrtrace RUN_DIR --prefix nccl_trace_rank`` (torch's
    torch.distributed.flight_recorder.fr_trace): it lines the ranks' collectives up and names
    the ones some ranks never entered.
    """
    prefix = str(Path(run_dir).absolute() / "nccl_trace_rank")
    return {
        "TORCH_FR_BUFFER_SIZE": FLIGHT_RECORDER_BUFFER,
        "TORCH_NCCL_TRACE_BUFFER_SIZE": FLIGHT_RECORDER_BUFFER,
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def apply_nccl_debug_env(run_dir: Path) -> None:
    """Set `nccl_debug_env` in os.environ where not already set (a user's own setting wins).

    Call it on CUDA before ``torch.distributed.init_process_group``: ProcessGroupNCCL reads these
    variables when it is created. The run directory is created here so the dump can be written.
    """
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for key, value in nccl_debug_env(run_dir).items():
        os.environ.setdefault(key, value)


def _flight_recorder_prefix() -> str | None:
    return os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or os.environ.get(
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"
    )


def dump_flight_recorder(rank: int, timeout_s: float = 30.0) -> Path | None:
    """Write the NCCL flight recorder buffer of this process to ``<prefix><rank>`` (prefix from
    `nccl_debug_env`) now; returns the path, or None off NCCL, without a prefix or on failure.

    The watchdog calls it: its limit is usually below the collective timeout, so NCCL's own
    dump on timeout would never come. Runs in a helper thread bounded by ``timeout_s``.
    """
    prefix = _flight_recorder_prefix()
    if not prefix or not is_distributed() or dist.get_backend() != "nccl":
        return None
    from torch._C import _distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace", None) or getattr(c10d, "_dump_fr_trace", None)
    if dump is None:
        return None
    path = Path(f"{prefix}{rank}")
    done: list[Path] = []

    def write() -> None:
        data = dump()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        done.append(path)

    thread = threading.Thread(target=write, name="kfm-fr-dump", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return done[0] if done else None


class Watchdog(Callback):
    """Dumps every thread's stack and exits the process when steps stop completing.

    ``on_step_end`` is the heartbeat; a daemon thread started in ``on_train_start`` watches the
    deadline (``health.watchdog_first_step_s`` until the first step after start or resume ends,
    then ``health.watchdog_s``; the limit covers the whole step including evaluation and the
    checkpoint save). On firing it appends a header (time, host, pid, rank, last step, seconds
    waited) and ``faulthandler.dump_traceback(all_threads=True)`` to stderr and to
    ``run_dir/hang_rank{rank}.txt``, dumps the NCCL flight recorder (`dump_flight_recorder`),
    records ``failed`` (requeue) in status.json on rank 0, waits `EXIT_GRACE_S` and calls
    ``os._exit(WATCHDOG_EXIT_CODE)``: no cleanup, which a hung process could not do anyway.
    ``on_train_end`` stops the watch without a dump.
    """

    def __init__(self, cfg: HealthConfig, run_dir: Path, rank: int) -> None:
        self.limit_s = cfg.watchdog_s
        self.first_limit_s = cfg.watchdog_first_step_s or cfg.watchdog_s
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.exit_code = WATCHDOG_EXIT_CODE
        self.grace_s = min(EXIT_GRACE_S, self.limit_s)
        self.backstop_s = BACKSTOP_S
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._step = 0
        self._since = 0.0
        self._limit = 0.0
        self._backstop = False

    @property
    def dump_path(self) -> Path:
        return self.run_dir / f"hang_rank{self.rank}.txt"

    def on_train_start(self, step: int) -> None:
        if self.limit_s <= 0:
            return
        self._stopped = False
        self._beat(step, self.first_limit_s)
        self._thread = threading.Thread(target=self._watch, name="kfm-watchdog", daemon=True)
        self._thread.start()

    def on_step_end(self, info: StepInfo) -> None:
        if self._thread is not None:
            self._beat(info.step, self.limit_s)

    def on_train_end(self, step: int, error: BaseException | None) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._backstop:
            faulthandler.cancel_dump_traceback_later()
            self._backstop = False
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _beat(self, step: int, limit: float) -> None:
        with self._cond:
            self._step, self._since, self._limit = step, time.monotonic(), limit
            self._cond.notify()  # the deadline may now be earlier (first step -> later steps)
        self._arm_backstop(limit)

    def _arm_backstop(self, limit: float) -> None:
        # Replaces the previous timer. stderr only: the hang file must not exist without a hang.
        try:
            faulthandler.dump_traceback_later(
                limit + self.backstop_s, exit=True, file=sys.__stderr__ or sys.stderr
            )
            self._backstop = True
        except (ValueError, OSError, AttributeError, RuntimeError):
            self._backstop = False  # no usable stderr (e.g. detached)

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                remaining = self._since + self._limit - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopped:
                return
            step, since, limit = self._step, self._since, self._limit
        self._fire(step, time.monotonic() - since, limit)

    def _fire(self, step: int, waited: float, limit: float) -> None:
        header = (
            f"=== kfm watchdog {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
            f"host {socket.gethostname()} pid {os.getpid()} rank {self.rank}: no step completed "
            f"for {waited:.1f} s (limit {limit:g} s) after step {step}; stacks of all threads "
            f"follow, then exit {self.exit_code} ===\n"
        )
        streams: list[IO[str]] = []
        err = sys.__stderr__ or sys.stderr
        if err is not None:
            streams.append(err)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            streams.append(open(self.dump_path, "a", encoding="utf-8"))  # noqa: SIM115
        except OSError as e:
            print(f"kfm watchdog: cannot write {self.dump_path}: {e}", file=err, flush=True)
        for stream in streams:
            try:
                stream.write(header)
                stream.flush()
                faulthandler.dump_traceback(file=stream, all_threads=True)
                stream.flush()
            except (OSError, ValueError):
                pass
        fr = None
        try:
            fr = dump_flight_recorder(self.rank)
        except Exception as e:  # noqa: BLE001 -- diagnostics must not stop the exit
            print(f"kfm watchdog: flight recorder dump failed: {e!r}", file=err, flush=True)
        if fr is not None:
            for stream in streams:
                try:
                    stream.write(f"NCCL flight recorder written to {fr}\n")
                    stream.flush()
                except (OSError, ValueError):
                    pass
        for stream in streams[1:]:
            stream.close()
        if self.rank == 0:
            with contextlib.suppress(OSError):
                write_status(
                    self.run_dir,
                    "failed",
                    step=step,
                    reason=f"watchdog: no step completed for {waited:.0f} s after step {step} "
                    "(stacks in hang_rank*.txt)",
                    requeue=True,
                )
        time.sleep(self.grace_s)
        os._exit(self.exit_code)


# Per-rank figures the straggler report gathers, in this order: (key, description).
_FIGURES = (("host_s", "host work"), ("optim_s", "optimizer update"))


class StragglerReport(Callback):
    """Names ranks whose own per-step work is well above the other ranks' on log steps.

    Every rank sums, over the steps since the last log step, ``info.host_s`` (its on_step_start
    components plus data loading: the host work before the step's first collective) and the
    optimizer update time (``info.out.optim_timer``: local compute with no collective inside, so
    a slow device shows there). The optimizer timer holds only the latest step's value and
    reading it on CUDA waits for the step's end event, so on CUDA it is read on log steps only
    (the log step's update stands for the window); on CPU, where reading costs nothing, every
    step is read. On each log step all ranks run one ``all_gather`` of the per-step means (every
    rank on the same steps); rank 0 compares each figure with the lower median over ranks and
    names the ranks above ``health.straggler_factor`` x median and at least
    ``health.straggler_min_s`` above it, with host and local rank (gathered once at start), via
    ``logger.info``, and records ``straggler_ranks``, ``{host,optim}_s_{max,median}`` and the
    slowest rank of each in metrics.jsonl (not on the console). The first step after start or
    resume (warm-up) is left out: no figures, no collective, no record.

    Off (no collective at all) with ``health.straggler_factor=0`` or without a process group.
    """

    def __init__(self, cfg: Config, logger: MetricLogger, world: WorldInfo) -> None:
        self.cfg = cfg
        self.logger = logger
        self.world = world
        self.factor = cfg.health.straggler_factor
        self.min_s = cfg.health.straggler_min_s
        self.places: list[tuple[str, int]] = []
        """(host, local rank) of every global rank, from on_train_start."""
        self._device = torch.device("cpu")
        self._warming_up = True
        self._reset()

    @property
    def enabled(self) -> bool:
        return self.factor > 0 and self.world.distributed and is_distributed()

    def _reset(self) -> None:
        self._steps = 0
        self._host_s = 0.0
        self._optim_s = 0.0
        self._optim_n = 0

    def on_train_start(self, step: int) -> None:
        self._reset()
        self._warming_up = True
        if not self.enabled:
            return
        if dist.get_backend() == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        places: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(places, (socket.gethostname(), self.world.local_rank))
        self.places = [(str(h), int(lr)) for h, lr in places]

    def on_step_end(self, info: StepInfo) -> None:
        if not self.enabled:
            return
        if self._warming_up:
            # The first step after start or resume allocates optimizer state, fills caches and
            # compiles: its per-rank times say nothing about a rank's health. Every rank skips it
            # (so the collectives still line up).
            self._warming_up = False
            return
        self._steps += 1
        self._host_s += info.host_s
        log_step = is_log_step(self.cfg, info)
        if log_step or info.out.loss.device.type == "cpu":
            self._optim_s += info.out.optim_timer.seconds()
            self._optim_n += 1
        if not log_step:
            return
        mine = torch.tensor(
            [self._host_s / self._steps, self._optim_s / max(self._optim_n, 1)],
            dtype=torch.float64,
            device=self._device,
        )
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        self._reset()
        if self.world.rank == 0:
            table = torch.stack(gathered).cpu().tolist()
            self._report(info.step, table)

    def _place(self, rank: int) -> str:
        if rank < len(self.places):
            host, local = self.places[rank]
            return f"rank {rank} (host {host}, local rank {local})"
        return f"rank {rank}"

    def _report(self, step: int, table: list[list[float]]) -> None:
        """Rank 0: ``table[rank][figure]`` seconds per step -> console line and metrics."""
        metrics: dict[str, Any] = {}
        named: dict[int, list[str]] = {}
        for j, (key, what) in enumerate(_FIGURES):
            values = [row[j] for row in table]
            median = lower_median(values)
            slowest = max(range(len(values)), key=values.__getitem__)
            metrics[f"{key}_max"] = values[slowest]
            metrics[f"{key}_median"] = median
            metrics[f"{key}_max_rank"] = slowest
            for rank, v in enumerate(values):
                if is_straggler(v, median, self.factor, self.min_s):
                    named.setdefault(rank, []).append(
                        f"{what} {v:.3f} s/step vs median {median:.3f} s"
                    )
        metrics = {"straggler_ranks": sorted(named), **metrics}
        if named:
            parts = [f"{self._place(r)}: {', '.join(named[r])}" for r in sorted(named)]
            self.logger.info(f"stragglers at step {step}: " + "; ".join(parts))
        self.logger.log(step, metrics, console=False)


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values for an even count: with two ranks the faster one is
    the reference (the mean of the two would hide a single slow rank of two)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def is_straggler(value: float, median: float, factor: float, min_s: float) -> bool:
    """``value`` exceeds ``median`` by ``factor`` times and by at least ``min_s`` seconds."""
    return value > factor * median and value - median >= min_s
