"""The run directory: resolved config and the provenance of a run (commit, dirty diff, versions)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kfm
from kfm.config import Config, dump_yaml
from kfm.fs import atomic_write_text

_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "safetensors", "numpy", "kfm")


def _git(*args: str) -> str | None:
    repo = Path(kfm.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def provenance() -> dict[str, Any]:
    """Git commit + dirty flag of the kfm checkout, package versions, host and command line."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "packages": versions,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "argv": sys.argv,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_run_dir(cfg: Config) -> Path:
    """Create runs/<name>/ and write config.yaml (resolved) and run_info.json (provenance).

    A dirty checkout also gets git_diff.patch so the exact code of the run can be rebuilt.
    """
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    info = provenance()
    atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
    if info["git_dirty"]:
        diff = _git("diff", "HEAD")
        if diff:
            atomic_write_text(run_dir / "git_diff.patch", diff)
    return run_dir
