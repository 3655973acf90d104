"""Durable file-system primitives for checkpoints: fsync, hashing, atomic renames, dead writers.

Durability here means: after a function returns, a power cut leaves either the old or the new
state on disk, never a mix. That needs the file's data fsynced before a rename, and the parent
directory fsynced after it (the rename itself lives in the directory's entries).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kfm.fs import fsync_dir, sha256_file

__all__ = [
    "files_under",
    "fsync_dir",
    "pid_alive",
    "remove_tree",
    "sha256_file",
    "write_bytes_durable",
]


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (atomicity comes from renaming the parent later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def files_under(path: Path) -> list[Path]:
    """Regular files below ``path``, recursively, sorted by relative path."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def remove_tree(path: Path) -> None:
    """Delete a directory tree, or a file/symlink; missing paths are fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)
