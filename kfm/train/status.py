"""``RUN_DIR/status.json``: what the last training process of a run did, for launchers and people.

Rank 0 writes it atomically at start-up (``running``), and when the loop ends: ``finished`` (all
``train.steps`` done), ``stopped`` (a stop signal: the checkpoint of the last step is saved and a
rerun resumes from it) or ``failed`` (an exception; ``requeue`` says whether running the same
command again can help). A process killed outright (SIGKILL, node failure) leaves ``running``.
The Slurm script (launch/slurm/train.sbatch) reads it to decide whether to requeue the job.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from kfm.fs import atomic_write_text

STATUS_FILE = "status.json"

State = Literal["running", "finished", "stopped", "failed"]


def write_status(
    run_dir: Path,
    state: State,
    *,
    step: int,
    reason: str | None = None,
    requeue: bool | None = None,
) -> None:
    """Replace ``run_dir/status.json`` (atomic: readers see the old or the new file).

    ``requeue`` defaults to True for ``stopped`` and ``running`` (a rerun continues the run) and
    False for ``finished``; a ``failed`` state must say.
    """
    if requeue is None:
        if state == "failed":
            raise ValueError("write_status('failed') needs requeue=True or False")
        requeue = state != "finished"
    record = {
        "state": state,
        "step": step,
        "reason": reason,
        "requeue": requeue,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(record, indent=1) + "\n")


def read_status(run_dir: Path) -> dict | None:
    """The parsed status of a run, or None when it has none (never started) or it is unreadable."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
