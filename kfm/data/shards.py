"""The shard format: token ids on disk, written by `kfm pack` and read by the training loader.

A shard set is a directory::

    OUT/
      manifest.json                  written LAST, atomically; without it the directory is not a set
      train-00000.bin  train-00000.idx  train-00001.bin  train-00001.idx ...
      val-00000.bin    val-00000.idx

- ``.bin``: raw little-endian token ids, uint16 if vocab_size <= 65536 else uint32, no header, so a
  file maps straight into memory with ``np.memmap``. Documents are concatenated; a document never
  spans two files.
- ``.idx``: raw little-endian int64 document start offsets within that .bin plus the end offset:
  n_docs + 1 entries, the first 0, the last the file's token count.
- ``manifest.json``: format, version, dtype, vocab_size, tokenizer_hash, bos_id, eos_id, sources,
  and per split the file list with token/document counts and sha256 of every file.

The packer stores each document as ``[bos_id] + ids + [eos_id]``; the writer stores what it gets.
A split reads back as one continuous token stream over its files (`ShardSet`), every .bin and .idx
memory-mapped, so opening costs one stat per file whatever the corpus size.

Checks: `ShardSet.open(verify="size")` checks the manifest and the file sizes (reads no data);
`check_file_contents` hashes one file pair and checks every .idx offset. `kfm.data.verify` runs
the content checks over whole shard sets, each file on one rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kfm.fs import atomic_write_bytes, fsync_dir, sha256_file

FORMAT = "kfm-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"

_IDX_DTYPE = np.dtype("<i8")
_HASH_CHUNK_BYTES = 8 << 20
_REQUIRED_KEYS = ("format", "version", "dtype", "vocab_size", "tokenizer_hash", "bos_id", "eos_id")
_FILE_KEYS = ("bin", "idx", "n_docs", "n_tokens", "sha256_bin", "sha256_idx")


class ShardError(RuntimeError):
    """A shard set is missing, malformed or corrupt; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian on-disk dtype for token ids of a vocabulary of ``vocab_size`` entries.

    Raises:
        ValueError: vocab_size is not in [1, 2**32].
    """
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Writes one split's .bin/.idx files; each file is written as NAME.tmp then os.replace'd on roll/close.

    Files are named ``{split}-{n:05d}.bin/.idx``. A new file starts when the next document would
    push the current one past ``shard_tokens`` tokens (a single longer document gets a file of its
    own). sha256 is computed while writing, so closing never re-reads a file. Creating a writer
    removes an existing ``manifest.json`` in ``out_dir``: files are about to be replaced, so the old
    manifest would no longer describe them. Use as a context manager to drop the temporary file on
    error.
    """

    def __init__(
        self, out_dir: str | Path, split: str, *, vocab_size: int, shard_tokens: int = 1 << 27
    ) -> None:
        """Prepare to write ``split`` into ``out_dir`` (created if missing).

        Args:
            out_dir: the shard set directory.
            split: split name, e.g. "train" or "val"; a plain name without path separators.
            vocab_size: tokenizer vocabulary size; picks the dtype and bounds the ids.
            shard_tokens: soft maximum tokens per file (default 2**27 = 256 MiB at uint16).

        Raises:
            ValueError: bad split name, vocab_size or shard_tokens.
        """
        if not split or "/" in split or "\\" in split or split.startswith("."):
            raise ValueError(f"split={split!r} must be a plain name such as 'train' or 'val'")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
        self.out_dir = Path(out_dir)
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._files: list[dict[str, Any]] = []
        self._closed = False
        self._n_docs_total = 0
        self._f: Any = None  # the open .bin.tmp file, or None between files
        self._bin_hash: Any = None
        self._offsets: list[int] = [0]

    @property
    def n_docs(self) -> int:
        """Documents added so far."""
        return self._n_docs_total

    def _name(self, ext: str) -> str:
        return f"{self.split}-{len(self._files):05d}.{ext}"

    def _start_file(self) -> None:
        # Stays open across add_document calls; closed by _finish_file or abort.
        self._f = open(self.out_dir / (self._name("bin") + ".tmp"), "wb")  # noqa: SIM115
        self._bin_hash = hashlib.sha256()
        self._offsets = [0]

    def _finish_file(self) -> None:
        bin_name, idx_name = self._name("bin"), self._name("idx")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        idx_bytes = np.asarray(self._offsets, dtype=_IDX_DTYPE).tobytes()
        atomic_write_bytes(self.out_dir / idx_name, idx_bytes)
        os.replace(self.out_dir / (bin_name + ".tmp"), self.out_dir / bin_name)
        fsync_dir(self.out_dir)
        self._files.append(
            {
                "bin": bin_name,
                "idx": idx_name,
                "n_docs": len(self._offsets) - 1,
                "n_tokens": self._offsets[-1],
                "sha256_bin": self._bin_hash.hexdigest(),
                "sha256_idx": hashlib.sha256(idx_bytes).hexdigest(),
            }
        )

    def add_document(self, ids: np.ndarray | Sequence[int]) -> None:
        """Append one document (already including bos/eos if wanted) to the split.

        Raises:
            ValueError: ids is empty, not a 1-D integer sequence, or holds an id outside
                [0, vocab_size).
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError(f"ShardWriter for split {self.split!r} is closed")
        arr = np.asarray(ids)
        doc = self._n_docs_total
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"document {doc}: ids must be a non-empty 1-D sequence, got {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"document {doc}: ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"document {doc}: token id {bad} outside [0, vocab_size={self.vocab_size}); "
                "the tokenizer and vocab_size disagree"
            )
        if self._f is not None and self._offsets[-1] + arr.size > self.shard_tokens:
            self._finish_file()
        if self._f is None:
            self._start_file()
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._f.write(data)
        self._bin_hash.update(data)
        self._offsets.append(self._offsets[-1] + arr.size)
        self._n_docs_total += 1

    def close(self) -> dict:
        """Finish the last file and return this split's manifest entry.

        Returns:
            ``{"n_docs", "n_tokens", "files": [{"bin", "idx", "n_docs", "n_tokens", "sha256_bin",
            "sha256_idx"}, ...]}``; ``files`` is empty if no document was added. Calling close again
            returns the same entry.
        """
        if not self._closed:
            if self._f is not None:
                self._finish_file()
            self._closed = True
        return {
            "n_docs": sum(f["n_docs"] for f in self._files),
            "n_tokens": sum(f["n_tokens"] for f in self._files),
            "files": [dict(f) for f in self._files],
        }

    def abort(self) -> None:
        """Drop the file being written (its .tmp); files already finished stay on disk."""
        if self._f is not None:
            self._f.close()
            (self.out_dir / (self._name("bin") + ".tmp")).unlink(missing_ok=True)
            self._f = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_manifest(manifest: Any, where: str, fix: str) -> None:
    """Raise ShardError unless ``manifest`` has the keys and types of format version 1."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: manifest must be a JSON object; {fix}")
    missing = [k for k in (*_REQUIRED_KEYS, "splits") if k not in manifest]
    if missing:
        raise ShardError(f"{where}: manifest lacks {missing}; {fix}")
    if manifest["format"] != FORMAT:
        raise ShardError(f"{where}: format={manifest['format']!r}, expected {FORMAT!r}; {fix}")
    if manifest["version"] != VERSION:
        raise ShardError(
            f"{where}: version={manifest['version']!r} is not supported (this kfm reads version "
            f"{VERSION}); {fix}"
        )
    vocab_size = manifest["vocab_size"]
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= 1 << 32:
        raise ShardError(f"{where}: vocab_size={vocab_size!r} must be an int in [1, 2**32]; {fix}")
    if manifest["dtype"] != token_dtype(vocab_size).name:
        raise ShardError(
            f"{where}: dtype={manifest['dtype']!r} but vocab_size={vocab_size} needs "
            f"{token_dtype(vocab_size).name!r}; {fix}"
        )
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise ShardError(f"{where}: 'splits' must be an object of split entries; {fix}")
    for split, entry in splits.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
            raise ShardError(f"{where}: split {split!r} needs a 'files' list; {fix}")
        for i, f in enumerate(entry["files"]):
            if not isinstance(f, dict) or any(k not in f for k in _FILE_KEYS):
                raise ShardError(
                    f"{where}: split {split!r} file {i} needs keys {_FILE_KEYS}; {fix}"
                )
            for k in ("bin", "idx"):
                if Path(f[k]).name != f[k] or f[k] in ("", ".", ".."):
                    raise ShardError(
                        f"{where}: split {split!r} file name {f[k]!r} must be a plain file name "
                        f"inside the shard set; {fix}"
                    )
        for key in ("n_docs", "n_tokens"):
            total = sum(f[key] for f in entry["files"])
            if entry.get(key) != total:
                raise ShardError(
                    f"{where}: split {split!r} {key}={entry.get(key)!r} but its files sum to "
                    f"{total}; {fix}"
                )


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``out_dir/manifest.json`` atomically (temp file, fsync, os.replace); returns its path.

    Call it last, after every ShardWriter is closed: the manifest is what makes the directory a
    shard set.

    Raises:
        ShardError: the manifest lacks required keys, has the wrong format/version/dtype, its
            split totals disagree with its files, or a listed file does not exist.
    """
    out = Path(out_dir)
    _check_manifest(manifest, str(out / MANIFEST_NAME), "fix the manifest passed to write_manifest")
    for split, entry in manifest["splits"].items():
        for f in entry["files"]:
            for k in ("bin", "idx"):
                if not (out / f[k]).is_file():
                    raise ShardError(
                        f"{out / f[k]}: listed in split {split!r} but missing; close every "
                        "ShardWriter before write_manifest"
                    )
    path = out / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path


_REPACK = "re-run `kfm pack` to rebuild the shard set"
_CORRUPT = (
    "the file is corrupt; copy it again from an intact copy of the shard set or re-run `kfm pack` "
    "to rebuild the shard set"
)


def load_manifest(path: str | Path) -> dict:
    """Read and check ``path/manifest.json`` (format, version, dtype, split totals); no data read.

    Raises:
        ShardError: no such directory, no manifest, invalid JSON, or a manifest that is not format
            version 1; the message names the file and the fix.
    """
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ShardError(f"{root}: not a shard set (no such directory); run `kfm pack` first")
    if not mpath.is_file():
        raise ShardError(
            f"{root}: not a shard set (no {MANIFEST_NAME}; packing may have been interrupted); "
            "run `kfm pack`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{mpath}: not valid JSON ({e}); {_REPACK}") from e
    except OSError as e:
        raise ShardError(
            f"{mpath}: cannot be read ({e}); check the path and its permissions"
        ) from e
    _check_manifest(manifest, str(mpath), _REPACK)
    return manifest


def check_file_sizes(root: str | Path, entry: dict, dtype: np.dtype) -> list[str]:
    """Problems with the existence and sizes of one manifest file entry's .bin and .idx.

    Args:
        root: the shard set directory.
        entry: one item of ``manifest["splits"][split]["files"]`` (already checked by
            `load_manifest`).
        dtype: the set's token dtype (`token_dtype` of its vocab_size).

    Returns:
        One message per bad file (missing, unreadable, or of the wrong size), each naming the file
        and the fix; empty if both files are present with the sizes the manifest implies. Reads no
        data: one stat per file.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    errors = []
    want_bin = int(entry["n_tokens"]) * dtype.itemsize
    want_idx = (int(entry["n_docs"]) + 1) * _IDX_DTYPE.itemsize
    for name, want in ((entry["bin"], want_bin), (entry["idx"], want_idx)):
        p = root / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            errors.append(f"{p}: listed in {mpath} but missing; {_REPACK}")
            continue
        except OSError as e:
            errors.append(f"{p}: cannot be read ({e}); check the file system and permissions")
            continue
        if size != want:
            errors.append(
                f"{p}: {size} bytes, manifest says {want} (truncated or overwritten); {_REPACK}"
            )
    return errors


def _idx_errors_and_hash(path: Path, n_tokens: int) -> tuple[str | None, str]:
    """(problem with the offsets or None, hex sha256) of an .idx file, in one chunked read."""
    digest = hashlib.sha256()
    rising = True
    first: int | None = None
    last: int | None = None
    with open(path, "rb") as f:
        # The chunk size is a multiple of 8, so only a file of the wrong size ends mid-entry.
        while raw := f.read(_HASH_CHUNK_BYTES):
            digest.update(raw)
            if not rising or len(raw) % _IDX_DTYPE.itemsize:
                rising = False
                continue
            offsets = np.frombuffer(raw, dtype=_IDX_DTYPE)
            if first is None:
                first = int(offsets[0])
            rising = (last is None or int(offsets[0]) > last) and bool(
                np.all(offsets[1:] > offsets[:-1])
            )
            last = int(offsets[-1])
    if not rising or first != 0 or last != n_tokens:
        problem = f"{path}: document offsets must rise strictly from 0 to {n_tokens}; {_REPACK}"
        return problem, digest.hexdigest()
    return None, digest.hexdigest()


def check_file_contents(root: str | Path, entry: dict) -> list[str]:
    """Problems with the bytes of one manifest file entry: sha256 of the .bin and the .idx, and the
    .idx offsets rising strictly from 0 to the file's token count.

    Reads both files once, in 8 MiB chunks (sha256 runs ~1 GB/s per core). Check sizes first with
    `check_file_sizes`: a file of the wrong size is reported there, and hashing it adds nothing.

    Returns:
        One message per problem, each naming the file and the fix; empty if the files match the
        manifest.
    """
    root = Path(root)
    errors = []
    bpath, ipath = root / entry["bin"], root / entry["idx"]
    try:
        actual = sha256_file(bpath)
        if actual != entry["sha256_bin"]:
            errors.append(
                f"{bpath}: sha256 mismatch (expected {entry['sha256_bin']}, actual {actual}); "
                f"{_CORRUPT}"
            )
    except OSError as e:
        errors.append(f"{bpath}: cannot be read ({e}); check the file system and permissions")
    try:
        idx_error, actual = _idx_errors_and_hash(ipath, int(entry["n_tokens"]))
        if actual != entry["sha256_idx"]:
            errors.append(
                f"{ipath}: sha256 mismatch (expected {entry['sha256_idx']}, actual {actual}); "
                f"{_CORRUPT}"
            )
        if idx_error is not None:
            errors.append(idx_error)
    except OSError as e:
        errors.append(f"{ipath}: cannot be read ({e}); check the file system and permissions")
    return errors


class ShardSet:
    """One split of one shard set, as a single continuous token stream over its files (the .bin and
    .idx files memory-mapped read-only: each holds one open file descriptor).

    Attributes:
        path: the shard set directory.
        manifest: the parsed manifest.json.
        split: the split read ("train", "val", ...).
        n_tokens, n_docs: totals of the split.
        vocab_size, tokenizer_hash, bos_id, eos_id: from the manifest.
    """

    manifest: dict
    split: str
    n_tokens: int
    n_docs: int
    vocab_size: int
    tokenizer_hash: str

    def __init__(
        self, path: Path, manifest: dict, split: str, bins: list[np.ndarray], idxs: list[np.ndarray]
    ) -> None:
        """Use `ShardSet.open`; this constructor trusts its already-checked arguments."""
        self.path = path
        self.manifest = manifest
        self.split = split
        self.vocab_size = int(manifest["vocab_size"])
        self.tokenizer_hash = str(manifest["tokenizer_hash"])
        self.bos_id = int(manifest["bos_id"])
        self.eos_id = int(manifest["eos_id"])
        self._bins = bins
        self._idxs = idxs
        # Global start of each file in tokens and documents, with the total at the end.
        self._tok_starts = np.cumsum([0] + [b.size for b in bins], dtype=np.int64)
        self._doc_starts = np.cumsum([0] + [i.size - 1 for i in idxs], dtype=np.int64)
        self.n_tokens = int(self._tok_starts[-1])
        self.n_docs = int(self._doc_starts[-1])

    @classmethod
    def open(cls, path: str | Path, split: str = "train", *, verify: str = "size") -> ShardSet:
        """Open ``split`` of the shard set at ``path`` after checking it against its manifest.

        Every .bin and .idx file is memory-mapped read-only: opening reads the manifest, stats each
        file and reads the first and last offset of each .idx, whatever the corpus size.

        Args:
            path: directory written by `kfm pack`.
            split: split to read.
            verify: "size" (default) checks the manifest, every file's size and each .idx's first
                and last offset, and reads no other data. "spread" is the same here: the hashing
                part of "spread" is `kfm.data.verify.verify_shard_sets`, which the trainer runs
                with each file checked by one rank. "sha256" also hashes every byte of every
                file of the split and checks every .idx offset (one full read of the split, ~1 s
                per GB; on every rank that opens it, so slow at scale).

        Raises:
            ShardError: missing directory or manifest, bad JSON, unknown format/version, split
                absent, missing or truncated file, bad .idx, or sha256 mismatch; each names the
                file.
            ValueError: unknown ``verify`` mode.
        """
        if verify not in ("size", "spread", "sha256"):
            raise ValueError(f"verify={verify!r} must be 'size', 'spread' or 'sha256'")
        root = Path(path)
        manifest = load_manifest(root)
        mpath = root / MANIFEST_NAME
        if split not in manifest["splits"]:
            raise ShardError(
                f"{mpath}: no split {split!r} (has {sorted(manifest['splits'])}); pack it with "
                "`kfm pack` or pick another split"
            )
        dtype = token_dtype(manifest["vocab_size"])
        bins: list[np.ndarray] = []
        idxs: list[np.ndarray] = []
        for f in manifest["splits"][split]["files"]:
            errors = check_file_sizes(root, f, dtype)
            if not errors and verify == "sha256":
                errors = check_file_contents(root, f)
            if errors:
                raise ShardError(errors[0])
            bpath, ipath = root / f["bin"], root / f["idx"]
            n_tokens, n_docs = int(f["n_tokens"]), int(f["n_docs"])
            # Mapped, not read: a split of 1e9 documents has 8 GB of offsets. doc_index's binary
            # search touches a few pages per window. The full monotonic check is in
            # check_file_contents (verify="sha256" here, or verify_shard_sets).
            idx = np.memmap(ipath, dtype=_IDX_DTYPE, mode="r", shape=(n_docs + 1,))
            if idx[0] != 0 or idx[-1] != n_tokens:
                raise ShardError(
                    f"{ipath}: document offsets must rise strictly from 0 to {n_tokens} (they run "
                    f"from {int(idx[0])} to {int(idx[-1])}); {_REPACK}"
                )
            # np.memmap cannot map an empty file; documents are non-empty, so only n_docs=0 is.
            tokens = (
                np.memmap(bpath, dtype=dtype, mode="r", shape=(n_tokens,))
                if n_tokens
                else np.zeros(0, dtype=dtype)
            )
            bins.append(tokens)
            idxs.append(idx)
        return cls(root, manifest, split, bins, idxs)

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(
                f"{self.path} [{self.split}]: range [{start}, {start + length}) outside the "
                f"stream of {self.n_tokens} tokens"
            )

    def _segments(self, start: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(file, local start, count, offset in the output) for each file the range touches."""
        self._check_range(start, length)
        pos, end = start, start + length
        f = int(np.searchsorted(self._tok_starts, start, side="right")) - 1
        while pos < end:
            local = pos - int(self._tok_starts[f])
            take = min(end - pos, self._bins[f].size - local)
            yield f, local, take, pos - start
            pos += take
            f += 1

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream as int64 (may cross files).

        Raises:
            IndexError: the range is not inside [0, n_tokens).
        """
        out = np.empty(length, dtype=np.int64)
        for f, local, take, at in self._segments(start, length):
            out[at : at + take] = self._bins[f][local : local + take]
        return out

    def doc_index(self, start: int, length: int) -> np.ndarray:
        """Global document index (int64) of each token in ``[start, start + length)``.

        Raises:
            IndexError: the range is not inside [0, n_tokens).
        """
        out = np.empty(length, dtype=np.int64)
        for f, local, take, at in self._segments(start, length):
            positions = np.arange(local, local + take, dtype=np.int64)
            doc = np.searchsorted(self._idxs[f], positions, side="right") - 1
            out[at : at + take] = doc + self._doc_starts[f]
        return out

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.path)!r}, split={self.split!r}, n_tokens={self.n_tokens}, "
            f"n_docs={self.n_docs}, vocab_size={self.vocab_size})"
        )
