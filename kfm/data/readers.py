"""Read text documents from JSONL, gzip JSONL, Parquet, plain text and Hugging Face datasets.

Every reader yields dicts with at least ``"text"`` (str) and ``"id"`` (str); the other fields of
the record are passed through. Documents come out in a fixed order (files sorted by path, rows in
file order) so that everything downstream (tokenizer training, packing) is reproducible.

Accepted inputs of :func:`iter_documents`:

- a ``.jsonl`` / ``.jsonl.gz`` file: one JSON object per line;
- a ``.parquet`` file, read in row batches (never loaded whole);
- a ``.txt`` file: the whole file is one document;
- a directory written by ``datasets.Dataset.save_to_disk`` (holds ``dataset_info.json`` or
  ``state.json``, or ``dataset_dict.json`` for a DatasetDict);
- any other directory: the files above found under it, recursively, sorted; files of other types
  (``.md``, licenses, ``.json.gz``, ...) are skipped;
- ``hf://NAME`` or ``hf://NAME#SPLIT``: streamed with ``datasets.load_dataset`` (needs network).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
"""File types read by iter_documents; anything else inside a directory is skipped."""
PARQUET_BATCH_ROWS = 1024
"""Rows per Parquet record batch: bounds memory on files with long documents."""


class ReaderError(ValueError):
    """An input exists but cannot be read as documents (bad JSON, missing field, corrupt file)."""


class InputNotFoundError(ReaderError, FileNotFoundError):
    """An input path does not exist."""


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    return None


def _is_hf_saved(path: Path) -> bool:
    return any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ReaderError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "(none)"
        raise ReaderError(
            f"{where}: record has no field {text_field!r} (its fields: {fields}); "
            f"pass the field holding the text with --text-field"
        )
    text = record[text_field]
    if text is None:  # a null text is an empty document; pack counts and skips it
        return ""
    if not isinstance(text, str):
        raise ReaderError(
            f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
            f"pass the field holding the text with --text-field"
        )
    return text


def _document(record: dict, text: str, default_id: str) -> dict:
    doc = dict(record)
    doc["text"] = text
    if doc.get("id") is None:
        doc["id"] = default_id
    else:
        doc["id"] = str(doc["id"])
    return doc


def _iter_jsonl(path: Path, text_field: str) -> Iterator[dict]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReaderError(
                        f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                        "each line of a .jsonl file must be one JSON object"
                    ) from e
                yield _document(record, _text_of(record, text_field, where), where)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ReaderError(
            f"{path}: corrupt or truncated gzip data after line {line_no} ({e}); "
            "re-download or re-create the file"
        ) from e
    except UnicodeDecodeError as e:
        raise ReaderError(
            f"{path}:{line_no + 1}: not UTF-8 text ({e.reason} at byte {e.start}); "
            "convert the file to UTF-8"
        ) from e


def _iter_txt(path: Path) -> Iterator[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReaderError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
        ) from e
    yield {"text": text, "id": str(path)}


def _iter_parquet(path: Path, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses that vary by version
        raise ReaderError(f"{path}: not a readable Parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise ReaderError(
            f"{path}: Parquet file has no column {text_field!r} (its columns: "
            f"{', '.join(columns) or '(none)'}); pass the text column with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            where = f"{path}:row {row}"
            yield _document(record, _text_of(record, text_field, where), f"{path}:{row}")
            row += 1


def _iter_rows(rows: Any, name: str, text_field: str) -> Iterator[dict]:
    """Documents of a (streaming) Hugging Face Dataset, ids NAME:ROW when it has no id column."""
    for i, record in enumerate(rows):
        where = f"{name} row {i}"
        yield _document(record, _text_of(record, text_field, where), f"{name}:{i}")


def _iter_hf_saved(path: Path, text_field: str) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError for broken dirs
        raise ReaderError(
            f"{path}: looks like a Hugging Face save_to_disk directory but cannot be loaded ({e})"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        for split in sorted(ds):
            yield from _iter_rows(ds[split], f"{path}[{split}]", text_field)
    else:
        yield from _iter_rows(ds, str(path), text_field)


def _iter_hf_hub(spec: str, text_field: str) -> Iterator[dict]:
    import datasets

    name, _, split = spec[len(HF_PREFIX) :].partition("#")
    if not name:
        raise ReaderError(
            f"{spec!r}: write hf://NAME or hf://NAME#SPLIT (e.g. hf://org/corpus#train)"
        )
    # Streaming keeps a large hub corpus from being downloaded and cached whole before use.
    rows = datasets.load_dataset(name, split=split or "train", streaming=True)
    yield from _iter_rows(rows, spec, text_field)


def list_files(path: str | Path) -> list[Path]:
    """The readable document files under `path` (itself if a file), sorted by path.

    Raises:
        InputNotFoundError: `path` does not exist.
        ReaderError: `path` is a file of an unsupported type, or a directory without any
            readable file.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(
            f"{p}: no such file or directory (for a Hugging Face Hub dataset write hf://NAME)"
        )
    if p.is_file():
        if _suffix(p) is None:
            raise ReaderError(f"{p}: unsupported file type; use one of {', '.join(SUFFIXES)}")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) is not None)
    if not files:
        raise ReaderError(f"{p}: directory holds no {', '.join(SUFFIXES)} files")
    return files


def check_input(path: str | Path) -> None:
    """Fail fast if `path` cannot be an input of iter_documents (``hf://`` names pass unchecked).

    Raises:
        InputNotFoundError: the path does not exist.
        ReaderError: unsupported file type, or a directory without readable files.
    """
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return
    p = Path(path)
    if not (p.is_dir() and _is_hf_saved(p)):
        list_files(p)


def iter_documents(path: str | Path, *, text_field: str = "text") -> Iterator[dict]:
    """Yield the documents of one input (file, directory, saved dataset or ``hf://NAME``).

    Each document is a dict with ``"text"`` (the record's `text_field`, as str) and ``"id"``
    (the record's own ``id`` if present, else ``FILE:LINE`` / ``FILE:ROW`` / the file path for
    ``.txt``), plus the record's other fields. Order is deterministic.

    Raises:
        InputNotFoundError: the path does not exist (a FileNotFoundError).
        ReaderError: invalid JSON (file and line named), a record or Parquet file without
            `text_field`, a non-string text, corrupt gzip, non-UTF-8 text, unsupported file type
            (a ValueError).
    """
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        yield from _iter_hf_hub(path, text_field)
        return
    p = Path(path)
    if p.is_dir() and _is_hf_saved(p):
        yield from _iter_hf_saved(p, text_field)
        return
    for f in list_files(p):
        suffix = _suffix(f)
        if suffix == ".parquet":
            yield from _iter_parquet(f, text_field)
        elif suffix == ".txt":
            yield from _iter_txt(f)
        else:
            yield from _iter_jsonl(f, text_field)
