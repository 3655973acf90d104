"""What machine a benchmark ran on, for its results JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def machine_info() -> dict[str, object]:
    """CPU model and count, memory, Python/numpy/torch versions, platform, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def run_env(load_at_start: float) -> dict[str, object]:
    """`machine_info` plus the 1-minute load average at the start and end of the run (a loaded
    machine explains slow figures)."""
    return {
        **machine_info(),
        "load_avg_1m_at_start": load_at_start,
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
