"""Durable, atomic file-system writes shared by every writer in kfm (shards, tokenizer,
checkpoints, exports, run directory).

The rule: a reader sees the old state or the complete new one, never a mix. Files are written
under a temporary name, fsynced, then renamed; directories are built under a temporary name and
renamed into place; the parent directory is fsynced after a rename, since the rename lives in
the directory's entries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_HASH_CHUNK = 8 << 20  # 8 MiB reads: sha256 runs ~1 GB/s per core, so a 10 GB file is ~10 s


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so renames and new entries in it survive a crash.

    Some file systems refuse fsync on a directory; that is not an error worth failing a run for.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every regular file below ``path`` and every directory, deepest first."""
    root = Path(path)
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def publish_dir(tmp: str | Path, out: str | Path, *, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``out`` (same file system), durably.

    An existing ``out`` is replaced only with ``overwrite``: it is moved aside first, removed
    after the rename succeeds, and put back if the rename fails.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    backup = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    fsync_dir(out.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
