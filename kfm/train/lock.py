"""One writer per run: ``RUN_DIR/.lock``, taken by rank 0 before anything in the run dir changes.

Shared file systems (NFS, Lustre) do not make ``flock`` reliable across hosts, so the lock is a
file created with ``O_CREAT | O_EXCL`` (atomic there too) that names its holder: host, pid, start
time and Slurm job id/restart count. A thread refreshes the file's mtime every
``HEARTBEAT_S`` seconds while the run lives. A lock is stale, and taken over, when:

- its holder is on this host and its pid no longer exists (a killed run on a workstation);
- it belongs to this same Slurm job at an earlier restart count (a requeue of the job: the
  previous incarnation is gone before Slurm starts the next);
- its heartbeat is older than ``STALE_AFTER_S`` (a holder on another host that died; times are
  compared with the file system's clock, read from a probe file, so host clock skew does not
  matter).

A live holder makes `RunLock.acquire` raise `RunLockedError` naming host, pid, start time and the
lock file. `RunLock.release` removes the file only if it is still this process's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kfm.checkpoint._fs import pid_alive

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
"""Seconds between refreshes of the lock file's mtime."""
STALE_AFTER_S = 600.0
"""A lock whose mtime is this many seconds old belongs to a holder that is gone (20 missed
heartbeats: generous for a loaded metadata server)."""


class RunLockedError(RuntimeError):
    """Another live process holds the run's lock."""


def _holder_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "token": f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}",
    }


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; None if the file is gone; {} if unreadable (half-written by a holder
    that died between create and write: judged by its mtime alone)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _fs_now(directory: Path) -> float:
    """The file system's current time (the mtime of a file just created in ``directory``)."""
    probe = directory / f"{LOCK_FILE}.probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(path: Path, record: dict[str, Any]) -> str | None:
    """Why the lock at ``path`` with ``record`` no longer protects a live run, or None if its
    holder may still be running."""
    host, pid = record.get("host"), record.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return f"its process {pid} on this host is gone"
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    earlier = int(record.get("slurm_restart_count") or 0) < restart
    if job and record.get("slurm_job_id") == job and earlier:
        return f"it is held by an earlier run of this Slurm job {job} (requeued)"
    try:
        age = _fs_now(path.parent) - path.stat().st_mtime
    except FileNotFoundError:
        return "it was just released"
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """The lock of one run directory; ``acquire`` it once per run (rank 0), ``release`` it in a
    ``finally``."""

    def __init__(self, run_dir: Path, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.took_over: str | None = None
        """Why a stale lock was taken over, if one was (for the log)."""
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; start the heartbeat.

        Raises:
            RunLockedError: a live process holds the lock (the message names it and the fix).
            OSError: the run dir cannot be created or written.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = _holder_record()
        for _ in range(3):
            if self._create(record):
                self._record = record
                self._thread = threading.Thread(target=self._beat, name="kfm-run-lock", daemon=True)
                self._thread.start()
                return
            held = _read(self.path)
            if held is None:
                continue  # released in between: try again
            reason = stale_reason(self.path, held)
            if reason is None:
                raise RunLockedError(self._in_use(held))
            if self._remove_stale(held):
                self.took_over = f"took over the lock of {self._who(held)}: {reason}"
        raise RunLockedError(
            f"could not take the lock {self.path}: other processes keep taking it; "
            "check that no other `kfm train` runs on this run"
        )

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _remove_stale(self, held: dict[str, Any]) -> bool:
        """Move the stale lock aside, unless another process replaced it since we read it (then
        put the new one back). True if the stale lock is gone."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # one of several racing processes wins this
        except FileNotFoundError:
            return False
        if _read(aside) == held:
            aside.unlink(missing_ok=True)
            return True
        with contextlib.suppress(FileExistsError):  # someone's fresh lock: put it back
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):  # a transient NFS error: the next beat retries
                os.utime(self.path)  # no times given: the file system's current time

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._record is not None:
            held = _read(self.path)
            if held is not None and held.get("token") == self._record["token"]:
                self.path.unlink(missing_ok=True)
            self._record = None

    @staticmethod
    def _who(held: dict[str, Any]) -> str:
        return f"host {held.get('host', '?')} pid {held.get('pid', '?')}"

    def _in_use(self, held: dict[str, Any]) -> str:
        job = held.get("slurm_job_id")
        return (
            f"run {self.run_dir} is in use by {self._who(held)}"
            f"{f' (Slurm job {job})' if job else ''} since {held.get('started_at', '?')} "
            f"(lock {self.path}); wait for it, or remove the lock if that process is gone"
        )
