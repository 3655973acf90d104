"""The one document-reading stack: files, datasets and Hub sets -> records, for `kfm pack`, the
tokenizer trainer and the curation pipeline (``data_pipeline`` reads through this module).

Formats (`FORMATS`): JSON lines (``.jsonl``, ``.json``, ``.ndjson``, plain, ``.gz`` or ``.zst``,
one JSON object per line), Parquet (read in row batches, never loaded whole), text files (the whole
file is one document), folders written by ``datasets`` ``save_to_disk`` and, for `iter_documents`
only, ``hf://NAME[#SPLIT]`` (streamed from the Hub; needs network).

Everything is read as one stream of records per `ReadUnit` (a file or a saved dataset), in file
order. A record that cannot become a document is a `Rejection` with a reason (`REJECT_REASONS`),
file and line or row: ``invalid_utf8`` (a line or text field that is not UTF-8), ``invalid_json``
(a line that is not JSON, or JSON but not an object), ``missing_text`` (no text field, or one that
is not a string). A file that cannot be read at all (missing, corrupt or truncated gzip/zstd,
unreadable Parquet, no text column, a ``.json`` file holding one JSON array) raises `ReaderError`
naming the file and the fix. Lines count from 1, Parquet and dataset rows from 0; a UTF-8
byte-order mark at the start of a file is dropped; text is kept byte for byte (no newline
translation).

The two faces over that stream:

- `iter_unit` (the pipeline): `Record`s and `Rejection`s; the caller counts the rejections and
  goes on (``data_pipeline.steps.read.KfmReader``).
- `iter_documents` (``kfm pack``, ``kfm tokenizer train``): plain dicts, strict: the first
  rejection raises `ReaderError` naming the file, the line and the fix, so that a pack never
  silently drops documents. Its inputs: a file of a `PACK_SUFFIXES` type, a folder (read
  recursively, sorted by path; other files such as README.md are skipped), a ``save_to_disk``
  folder or ``hf://NAME[#SPLIT]``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

__all__ = [
    "FORMATS",
    "HF_PREFIX",
    "FileKind",
    "PACK_SUFFIXES",
    "REJECT_REASONS",
    "InputNotFoundError",
    "ReadUnit",
    "ReaderError",
    "Record",
    "Rejection",
    "UnitKind",
    "check_input",
    "file_kind",
    "is_hf_saved",
    "iter_documents",
    "iter_unit",
    "json_lines",
    "list_files",
    "text_lines",
    "text_problem",
    "utf8_error_position",
]

HF_PREFIX = "hf://"
FORMATS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson"),
    "parquet": (".parquet",),
    "text": (".txt", ".md"),
}
"""File name endings of each file format (the pipeline's ``format: auto`` reads all of them)."""
PACK_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")
"""Endings `iter_documents` reads; in a folder, other files (README.md, metadata .json) are skipped."""
REJECT_REASONS = ("invalid_utf8", "invalid_json", "missing_text", "empty", "too_large")
"""Reasons a record is dropped: the first three come from reading, the last two from
`text_problem` (the pipeline counts each as dropped_<reason>)."""
PARQUET_BATCH_ROWS = 1024
"""Rows per Parquet record batch: bounds memory on files of long documents."""
ZSTD_READ_BYTES = 1 << 20
"""Compressed bytes read per step from a .zst file."""
PACK_TEXT_FIELD_SETTING = "--text-field"
"""How an `iter_documents` user sets the text field (kfm pack, kfm tokenizer train)."""

FileKind = Literal["jsonl", "parquet", "text"]
UnitKind = Literal["jsonl", "parquet", "text", "hf_disk", "shipped"]
_T = TypeVar("_T")


class ReaderError(ValueError):
    """An input exists but cannot be read as documents (bad JSON, missing field, corrupt file)."""


class InputNotFoundError(ReaderError, FileNotFoundError):
    """An input path does not exist."""


@dataclass(frozen=True, slots=True)
class ReadUnit:
    """One independently readable piece of an input; pipeline tasks are assigned whole units."""

    kind: UnitKind
    """A `FORMATS` key, "hf_disk" (a save_to_disk folder) or "shipped" (a shared-data set, read
    by its own adapter in ``data_pipeline.shipped``, not by `iter_unit`)."""
    path: Path
    """The file (or folder for hf_disk / shipped)."""
    key: str
    """Id prefix of the unit's records that have no id of their own (``<key>:<line or row>``)."""


@dataclass(slots=True)
class Record:
    """A readable record: the text and what the reader knows about it."""

    id: str
    """Record id: the record's own, else ``<unit key>:<line or row>``."""
    text: str
    where: str
    """File and line/row, for messages."""
    license: str | None = None
    """The record's own license, if it states one."""
    language: str | None = None
    """Language known from the source (a shipped set's file), else None."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The record's other scalar fields (url, title, doi, copyright_notice...)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that cannot become a document: why (a `REJECT_REASONS` entry), where, and a
    human-readable detail."""

    reason: str
    where: str
    detail: str


def text_problem(text: str, max_doc_bytes: int) -> str | None:
    """The rejection reason for a record's text ("empty", "too_large"), or None if it is fine.

    Empty means whitespace only; `max_doc_bytes` counts UTF-8 bytes, 0 disables the size check.
    """
    if not text.strip():
        return "empty"
    if max_doc_bytes > 0:
        # UTF-8 needs 1..4 bytes per character: only encode when the length alone cannot decide.
        if len(text) > max_doc_bytes:
            return "too_large"
        if 4 * len(text) > max_doc_bytes and len(text.encode("utf-8")) > max_doc_bytes:
            return "too_large"
    return None


# ---- which files are what ----


def file_kind(path: Path, fmt: str = "auto") -> FileKind | None:
    """The `FORMATS` key of a file by its name ("auto": any format; else only `fmt`), or None."""
    name = path.name.lower()
    kinds = FORMATS if fmt == "auto" else {fmt: FORMATS.get(fmt, ())}
    for kind, suffixes in kinds.items():
        if name.endswith(suffixes):
            return cast(FileKind, kind)
    return None


def is_hf_saved(path: Path) -> bool:
    """True if `path` is a folder written by ``datasets`` ``save_to_disk``."""
    return path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


# ---- lines of a possibly compressed file ----


def _zstd_chunks(f: Any) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError as e:
        raise ImportError(
            f"reading {f.name} needs the zstandard package: pip install zstandard (or 'kfm[data]')"
        ) from e

    dctx = zstandard.ZstdDecompressor()
    dobj, pending = dctx.decompressobj(), False
    while chunk := f.read(ZSTD_READ_BYTES):
        while chunk:
            pending = True
            out = dobj.decompress(chunk)
            if out:
                yield out
            if not dobj.eof:
                break
            # A frame ended: the rest of the chunk starts the next frame (files may hold several).
            chunk, dobj, pending = dobj.unused_data, dctx.decompressobj(), False
    if pending:  # zstandard's stream reader would silently return a truncated frame's prefix
        raise EOFError("zstd frame ends before its end marker (truncated file)")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _byte_lines(path: Path) -> Iterator[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
    elif name.endswith(".zst"):
        with path.open("rb") as f:
            yield from _split_lines(_zstd_chunks(f))
    else:
        with path.open("rb") as f:
            yield from f


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:  # zstandard.ZstdError does not derive from OSError
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _corrupt(path: Path, line_no: int, e: BaseException) -> str:
    name = path.name.lower()
    codec = "gzip " if name.endswith(".gz") else "zstd " if name.endswith(".zst") else ""
    return (
        f"{path}: corrupt or truncated {codec}data after line {line_no} "
        f"({type(e).__name__}: {e}); re-create or re-download the file"
    )


_BOM = b"\xef\xbb\xbf"


def _utf8_detail(bad: int, byte: int, reason: str) -> str:
    """What the reader says about a line that is not UTF-8; `byte` counts from 1, like lines."""
    return f"not UTF-8: byte {byte} of the line is 0x{bad:02x} ({reason})"


def utf8_error_position(data: bytes, start: int) -> tuple[int, int]:
    """(line, byte in that line) of byte offset `start` (from 0) of `data`, both from 1."""
    line_start = data.rfind(b"\n", 0, start) + 1
    return data.count(b"\n", 0, start) + 1, start - line_start + 1


def text_lines(path: Path) -> Iterator[tuple[int, str | Rejection]]:
    """(line number from 1, decoded line without its newline) of a possibly compressed file.

    ``.gz`` and ``.zst`` (several frames allowed) are decompressed as a stream. A line that is not
    UTF-8 comes as a `Rejection` ("invalid_utf8") instead of stopping the file. A UTF-8
    byte-order mark at the start of the file is removed.

    Raises:
        ReaderError: the compressed stream is corrupt or truncated, or the file cannot be read.
    """
    errors = _stream_errors()
    line_no = 0
    try:
        for line_no, raw in enumerate(_byte_lines(path), start=1):
            bom = 3 if line_no == 1 and raw.startswith(_BOM) else 0
            try:
                yield line_no, raw[bom:].decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                # Positions in the line as stored: the byte-order mark counts.
                detail = _utf8_detail(raw[bom + e.start], bom + e.start + 1, e.reason)
                yield line_no, Rejection("invalid_utf8", f"{path}:{line_no}", detail)
    except errors as e:
        raise ReaderError(_corrupt(path, line_no, e)) from e


def json_lines(path: Path) -> Iterator[tuple[int, dict | Rejection]]:
    """(line number, object) for each non-blank line of a JSON-lines file; bad lines are
    `Rejection`s ("invalid_utf8", "invalid_json": not JSON, or JSON but not an object).

    Raises:
        ReaderError: as `text_lines`, and for a file that holds one JSON array.
    """
    for line_no, line in text_lines(path):
        if isinstance(line, Rejection):
            yield line_no, line
            continue
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if line_no == 1 and line.strip() == "[":
            raise ReaderError(
                f"{path}: holds one JSON array, not one JSON object per line; convert it to "
                "JSON lines (e.g. jq -c '.[]') or use a shipped-set adapter"
            )
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, Rejection("invalid_json", where, f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield line_no, Rejection("invalid_json", where, f"a JSON {type(obj).__name__}")
            continue
        yield line_no, obj


# ---- the rows of a unit: fields as stored, before either face builds its documents ----


@dataclass(frozen=True, slots=True)
class _Row:
    fields: dict[str, Any]
    where: str
    default_id: str


def _missing_column(
    where: object, text_field: str, columns: list[str], setting: str
) -> ReaderError:
    return ReaderError(
        f"{where}: no column {text_field!r} (its columns: {', '.join(columns) or '(none)'}); "
        f"set {setting} to the column holding the text"
    )


def _jsonl_rows(unit: ReadUnit) -> Iterator[_Row | Rejection]:
    for line_no, obj in json_lines(unit.path):
        if isinstance(obj, Rejection):
            yield obj
        else:
            yield _Row(obj, f"{unit.path}:{line_no}", f"{unit.key}:{line_no}")


def _parquet_rows(unit: ReadUnit, text_field: str, setting: str) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses that vary by version
        raise ReaderError(f"{unit.path}: not a readable Parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise _missing_column(unit.path, text_field, columns, setting)
    row = 0
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page is only found when its row group is decoded
            raise ReaderError(f"{unit.path}: unreadable Parquet data after row {row} ({e})") from e
        if batch is None:
            return
        for obj in batch.to_pylist():
            yield _Row(obj, f"{unit.path}:row {row}", f"{unit.key}:{row}")
            row += 1


def _text_file_rows(unit: ReadUnit, text_field: str) -> Iterator[_Row | Rejection]:
    where = str(unit.path)
    data = unit.path.read_bytes()
    bom = 3 if data.startswith(_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line, byte = utf8_error_position(data, bom + e.start)
        detail = _utf8_detail(data[bom + e.start], byte, e.reason)
        yield Rejection("invalid_utf8", f"{where}:{line}", detail)
        return
    yield _Row({text_field: text}, where, unit.key)  # the whole file is the text field


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "reading a Hugging Face dataset needs the datasets library: pip install datasets"
        ) from e
    return datasets


def _dataset_rows(
    part: Any, name: str, key: str, text_field: str, setting: str, *, error_at: object
) -> Iterator[_Row]:
    columns = part.column_names  # None for a streamed Hub set of unknown features
    if columns is not None and text_field not in columns:
        raise _missing_column(error_at, text_field, columns, setting)
    for row, obj in enumerate(part):
        yield _Row(obj, f"{name}:row {row}", f"{key}:{row}")


def _hf_disk_rows(unit: ReadUnit, text_field: str, setting: str) -> Iterator[_Row]:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(unit.path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError for broken folders
        raise ReaderError(f"{unit.path}: cannot load this save_to_disk dataset ({e})") from e
    splits = (
        [(s, ds[s]) for s in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    )
    for split, part in splits:
        name = f"{unit.path}[{split or 'rows'}]"
        key = f"{unit.key}/{split}" if split else unit.key
        yield from _dataset_rows(part, name, key, text_field, setting, error_at=unit.path)


def _hf_hub_rows(spec: str, text_field: str, setting: str) -> Iterator[_Row]:
    name, _, split = spec[len(HF_PREFIX) :].partition("#")
    if not name:
        raise ReaderError(
            f"{spec!r}: write hf://NAME or hf://NAME#SPLIT (e.g. hf://org/corpus#train)"
        )
    # Streaming keeps a large hub corpus from being downloaded and cached whole before use.
    rows = _datasets().load_dataset(name, split=split or "train", streaming=True)
    yield from _dataset_rows(rows, spec, spec, text_field, setting, error_at=spec)


def _rows(unit: ReadUnit, text_field: str, setting: str) -> Iterator[_Row | Rejection]:
    if unit.kind == "jsonl":
        return _jsonl_rows(unit)
    if unit.kind == "parquet":
        return _parquet_rows(unit, text_field, setting)
    if unit.kind == "text":
        return _text_file_rows(unit, text_field)
    if unit.kind == "hf_disk":
        return _hf_disk_rows(unit, text_field, setting)
    raise ValueError(f"{unit.path}: {unit.kind} units are read by data_pipeline.shipped")


def _text_of(row: _Row, text_field: str) -> str | Rejection:
    text = row.fields.get(text_field)
    if isinstance(text, bytes):  # a binary Parquet / dataset column
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            return Rejection("invalid_utf8", row.where, f"{text_field!r} is not UTF-8 ({e.reason})")
    if isinstance(text, str):
        return text
    if text_field in row.fields:
        what = f"a {type(text).__name__}, not a string"
    else:
        what = f"missing (its fields: {', '.join(sorted(map(str, row.fields))) or '(none)'})"
    return Rejection("missing_text", row.where, f"field {text_field!r} is {what}")


def _id_of(row: _Row, id_field: str) -> str:
    rid = row.fields.get(id_field)
    return row.default_id if rid is None or rid == "" else str(rid)


# ---- the pipeline's face: records and rejections ----


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool)


def _record(row: _Row, text_field: str, id_field: str) -> Record | Rejection:
    text = _text_of(row, text_field)
    if isinstance(text, Rejection):
        return text
    lic = row.fields.get("license")
    meta = {
        k: v
        for k, v in row.fields.items()
        if k not in (text_field, id_field, "license") and _scalar(v)
    }
    return Record(
        id=_id_of(row, id_field),
        text=text,
        where=row.where,
        license=lic if isinstance(lic, str) and lic.strip() else None,
        metadata=meta,
    )


def iter_unit(
    unit: ReadUnit, *, text_field: str, id_field: str, text_field_setting: str
) -> Iterator[Record | Rejection]:
    """The records of one unit, in file order; a record that cannot be read is a `Rejection`.

    A record's text is its `text_field` (bytes are decoded as UTF-8), its id the `id_field`
    (else ``<unit key>:<line or row>``), its license a non-blank ``license`` string field, its
    metadata the other scalar fields (lists and objects are dropped). A text file is one record
    with id ``<unit key>``.

    Args:
        text_field_setting: how the user sets `text_field`, named in errors (e.g.
            "inputs.text_field").

    Raises:
        ReaderError: the file is corrupt or truncated, or has no `text_field` column (Parquet,
            save_to_disk datasets).
        ValueError: a "shipped" unit (read by its adapter, not here).
    """
    for row in _rows(unit, text_field, text_field_setting):
        yield row if isinstance(row, Rejection) else _record(row, text_field, id_field)


# ---- kfm pack's face: strict, plain dicts ----

_FIXES = {
    "invalid_utf8": "{where}: {detail}; convert the file to UTF-8",
    "invalid_json": "{where}: not valid JSON lines ({detail}); each line must be one JSON object",
    "missing_text": "{where}: {detail}; set {setting} to the field holding the text",
}


def _strict(item: _T | Rejection) -> _T:
    """`item`, or ReaderError naming file, line and fix for what the pipeline would reject."""
    if isinstance(item, Rejection):
        template = _FIXES.get(item.reason, "{where}: {detail}")
        raise ReaderError(
            template.format(where=item.where, detail=item.detail, setting=PACK_TEXT_FIELD_SETTING)
        )
    return item


def _document(row: _Row, text_field: str) -> dict:
    if text_field in row.fields and row.fields[text_field] is None:
        text = ""  # a null text is an empty document (pack counts and skips it)
    else:
        text = _strict(_text_of(row, text_field))
    doc = dict(row.fields)
    doc["text"] = text
    doc["id"] = _id_of(row, "id")
    return doc


def _pack_kind(path: Path) -> FileKind | None:
    return file_kind(path) if path.name.lower().endswith(PACK_SUFFIXES) else None


def list_files(path: str | Path) -> list[Path]:
    """The `PACK_SUFFIXES` files under `path` (itself if a file), sorted by path.

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
        if _pack_kind(p) is None:
            raise ReaderError(f"{p}: unsupported file type; use one of {', '.join(PACK_SUFFIXES)}")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and _pack_kind(f) is not None)
    if not files:
        raise ReaderError(f"{p}: directory holds no {', '.join(PACK_SUFFIXES)} files")
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
    if not is_hf_saved(p):
        list_files(p)


def iter_documents(path: str | Path, *, text_field: str = "text") -> Iterator[dict]:
    """Yield the documents of one input (file, directory, saved dataset or ``hf://NAME``).

    Each document is a dict with ``"text"`` (the record's `text_field`, as str; a null text is
    "") and ``"id"`` (the record's own non-empty ``id``, else ``FILE:LINE`` / ``FILE:ROW`` /
    ``DIR/SPLIT:ROW`` / the file path for ``.txt``), plus the record's other fields. Order is
    deterministic: files sorted by path, records in file order, dataset splits sorted by name.

    Strict: where the pipeline would count a rejection (a line that is not UTF-8 or not a JSON
    object, a record without a string `text_field`), this raises.

    Raises:
        InputNotFoundError: the path does not exist (a FileNotFoundError).
        ReaderError: a bad record (file and line named), a Parquet file or dataset without
            `text_field`, corrupt gzip/zstd, unsupported file type (a ValueError).
    """
    setting = PACK_TEXT_FIELD_SETTING
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        for row in _hf_hub_rows(path, text_field, setting):
            yield _document(row, text_field)
        return
    p = Path(path)
    if is_hf_saved(p):
        units = [ReadUnit(kind="hf_disk", path=p, key=str(p))]
    else:
        units = [
            ReadUnit(kind=cast(FileKind, _pack_kind(f)), path=f, key=str(f)) for f in list_files(p)
        ]
    for unit in units:
        for item in _rows(unit, text_field, setting):
            yield _document(_strict(item), text_field)
