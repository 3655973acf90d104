"""Full shard-set verification, spread over ranks: each shard file is hashed by exactly one rank.

A shard file is one ``.bin`` with its ``.idx``. `verify_shard_sets` checks, for the files it is
given: the manifest (format, version, dtype, split totals), each file's existence and size, the
sha256 of both files, and that every .idx offset rises strictly from 0 to the file's token count.

Spreading: the (source, split, file) entries of every shard set are sorted, and entry i goes to
rank ``i % world_size``, so no rank reads the whole corpus and the ranks hash in parallel. The
caller combines the ranks' error lists (the trainer with an all-gather) and calls
`raise_verify_errors`, which raises on every rank if any rank found a problem. This module never
touches a process group, prints nothing, and imports no torch.

Use:

- trainer, ``data.verify: spread``: on every rank ``errors = verify_shard_sets(paths, rank=r,
  world_size=W)``, all-gather the lists, ``raise_verify_errors(gathered)``; log
  ``verification_share(paths, rank=r, world_size=W).describe()``.
- whole corpus, one process (``kfm data verify DIR [DIR ...]``): ``verify_shard_sets(dirs,
  splits=None, workers=n)``, which checks everything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kfm.data.shards import (
    MANIFEST_NAME,
    ShardError,
    check_file_contents,
    check_file_sizes,
    load_manifest,
    token_dtype,
)

DEFAULT_SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardFile:
    """One (source, split, file) entry of a manifest: the unit of work given to one rank.

    Attributes:
        source: the shard set directory, as given.
        split: split name.
        entry: the manifest's file entry (bin, idx, n_docs, n_tokens, sha256_bin, sha256_idx).
        dtype: the set's token dtype.
    """

    source: str
    split: str
    entry: dict[str, Any]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the .bin and .idx as the manifest sizes them (what hashing reads)."""
        return int(self.entry["n_tokens"]) * self.dtype.itemsize + 8 * (
            int(self.entry["n_docs"]) + 1
        )

    @property
    def key(self) -> tuple[str, str, str]:
        """Sort key: (source, split, .bin name)."""
        return (self.source, self.split, str(self.entry["bin"]))


@dataclass(frozen=True)
class VerifyShare:
    """What one rank verifies out of the whole: shard files (a .bin with its .idx) and bytes."""

    rank: int
    world_size: int
    n_files: int
    n_bytes: int
    total_files: int
    total_bytes: int

    def describe(self) -> str:
        """E.g. "verified 12 shard files (3.1 GB) on this rank, 48 files (12.4 GB) over 4 ranks"."""

        def n(count: int, word: str) -> str:
            return f"{count} {word}" if count == 1 else f"{count} {word}s"

        return (
            f"verified {n(self.n_files, 'shard file')} ({self.n_bytes / 1e9:.1f} GB) on this "
            f"rank, {n(self.total_files, 'file')} ({self.total_bytes / 1e9:.1f} GB) over "
            f"{n(self.world_size, 'rank')}"
        )


def _source_paths(paths_or_sources: Iterable[Any] | str | os.PathLike) -> list[str]:
    """Directories of the given paths or DataSourceConfig-like objects (``.path``), deduplicated."""
    if isinstance(paths_or_sources, (str, os.PathLike)):
        paths_or_sources = [paths_or_sources]
    out: list[str] = []
    for item in paths_or_sources:
        p = os.path.normpath(os.fspath(getattr(item, "path", item)))
        if p not in out:
            out.append(p)
    return out


def _collect(
    paths_or_sources: Iterable[Any] | str | os.PathLike, splits: Sequence[str] | None
) -> tuple[list[ShardFile], list[str]]:
    """(every shard file of the sources' splits, sorted; manifest-level problems)."""
    files: list[ShardFile] = []
    errors: list[str] = []
    for source in _source_paths(paths_or_sources):
        try:
            manifest = load_manifest(source)
        except ShardError as e:
            errors.append(str(e))
            continue
        dtype = token_dtype(manifest["vocab_size"])
        wanted = sorted(manifest["splits"]) if splits is None else list(splits)
        for split in wanted:
            if split not in manifest["splits"]:
                errors.append(
                    f"{Path(source) / MANIFEST_NAME}: no split {split!r} (has "
                    f"{sorted(manifest['splits'])}); pack it with `kfm pack` or verify other splits"
                )
                continue
            files.extend(
                ShardFile(source, split, entry, dtype)
                for entry in manifest["splits"][split]["files"]
            )
    files.sort(key=lambda f: f.key)
    return files, errors


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank={rank} must be in [0, world_size={world_size}) with world_size >= 1"
        )


def list_shard_files(
    paths_or_sources: Iterable[Any] | str | os.PathLike,
    *,
    splits: Sequence[str] | None = DEFAULT_SPLITS,
) -> list[ShardFile]:
    """Every shard file of the sources' ``splits`` (None: every split), sorted by (source, split,
    file). Entry i is verified by rank ``i % world_size``. Reads only the manifests.

    Raises:
        ShardError: a manifest is missing or malformed, or lacks a requested split (every problem
            listed).
    """
    files, errors = _collect(paths_or_sources, splits)
    if errors:
        raise_verify_errors([errors])
    return files


def files_for_rank(files: Sequence[ShardFile], rank: int, world_size: int) -> list[ShardFile]:
    """The entries of the sorted list ``files`` that ``rank`` verifies: index i goes to rank
    ``i % world_size``.

    Raises:
        ValueError: rank is not in [0, world_size).
    """
    _check_rank(rank, world_size)
    return list(files[rank::world_size])


def _check_one(f: ShardFile) -> list[str]:
    errors = check_file_sizes(f.source, f.entry, f.dtype)
    return errors or check_file_contents(f.source, f.entry)


def verify_shard_sets(
    paths_or_sources: Iterable[Any] | str | os.PathLike,
    *,
    splits: Sequence[str] | None = DEFAULT_SPLITS,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    on_file: Callable[[ShardFile, list[str]], None] | None = None,
) -> list[str]:
    """Verify this rank's share of the shard sets; return its problems (empty: all good).

    With the defaults (rank 0 of 1) every file is checked: the full verification of
    ``kfm data verify``. Manifest problems (missing, malformed, split absent) are found by every
    rank, since every rank reads the manifests; `raise_verify_errors` lists each distinct message
    once. Never raises for a bad shard set and prints nothing.

    Args:
        paths_or_sources: shard set directories, or objects with a ``.path`` (DataSourceConfig);
            a directory given twice is checked once.
        splits: splits to check; None checks every split of each manifest.
        rank, world_size: this process's share: the i-th file of the sorted list of every (source,
            split, file) goes to rank ``i % world_size``. Every rank must pass the same sources
            and splits.
        workers: threads hashing in parallel on this rank (sha256 and reads release the GIL).
        on_file: called in the calling thread after each file with the file and its problems,
            in file order (e.g. for a progress line).

    Returns:
        Messages naming each bad file and the fix: missing or wrong-size .bin/.idx, sha256
        mismatch, .idx offsets not rising strictly from 0 to the token count, unreadable files.

    Raises:
        ValueError: rank not in [0, world_size), or workers < 1.
    """
    _check_rank(rank, world_size)
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    files, errors = _collect(paths_or_sources, splits)
    mine = files[rank::world_size]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="kfm-verify") if workers > 1 else None
    try:
        results = pool.map(_check_one, mine) if pool else map(_check_one, mine)
        for f, problems in zip(mine, results, strict=True):
            errors.extend(problems)
            if on_file is not None:
                on_file(f, problems)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return errors


def verification_share(
    paths_or_sources: Iterable[Any] | str | os.PathLike,
    *,
    splits: Sequence[str] | None = DEFAULT_SPLITS,
    rank: int = 0,
    world_size: int = 1,
) -> VerifyShare:
    """How many shard files and bytes ``rank`` verifies, and the totals; reads only the manifests.

    Sources whose manifest cannot be read count as 0 files (`verify_shard_sets` reports them).

    Raises:
        ValueError: rank not in [0, world_size).
    """
    _check_rank(rank, world_size)
    files, _ = _collect(paths_or_sources, splits)
    mine = files[rank::world_size]
    return VerifyShare(
        rank=rank,
        world_size=world_size,
        n_files=len(mine),
        n_bytes=sum(f.nbytes for f in mine),
        total_files=len(files),
        total_bytes=sum(f.nbytes for f in files),
    )


def raise_verify_errors(per_rank_errors: Iterable[Sequence[str] | None]) -> None:
    """Raise `ShardError` listing every problem of every rank, if there is any.

    Args:
        per_rank_errors: the error lists of all ranks (e.g. from all_gather_object), None for a
            rank that sent nothing. A message found by several ranks is listed once.

    Raises:
        ShardError: at least one rank found a problem; the message lists them all, one per line.
    """
    seen: dict[str, None] = {}
    for errors in per_rank_errors:
        for e in errors or ():
            seen.setdefault(str(e), None)
    if not seen:
        return
    problems = list(seen)
    head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    raise ShardError(f"shard verification found {head}:\n" + "\n".join(f"- {p}" for p in problems))
