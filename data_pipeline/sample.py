"""A fixed random sample of documents from a large corpus, read without reading the corpus.

For audits of a finished corpus (``kfm release`` runs the PII audit on such a sample): the
curated output of ``kfm data run`` is tens of GB of JSON lines, too much to read for a check.

How the sample is drawn (`sample_documents`):

- Files: the JSON-lines (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) and Parquet files under the
  given paths (``kfm.data.readers.list_files``; other files are skipped). The ``n`` draws are
  spread over the files with probability proportional to each file's size on disk (a seeded
  multinomial draw), so a file twice as large gives about twice as many documents.
- In a file, one window of about ``window_bytes`` of text is read and the file's draws are taken
  uniformly, without replacement, from the documents in that window. The window starts at a
  random byte of a plain JSON-lines file (the partial line there is skipped), at the start of a
  random row group of a Parquet file (only the text column is read), and at the start of a
  compressed JSON-lines file (gzip and zstd streams cannot be entered in the middle). A window
  with fewer documents than its draws gives all of its documents, so the sample may be smaller
  than ``n``; more files or a larger window give a larger one.

Reads are bounded by (files drawn) x ``window_bytes``, whatever the corpus size. The same paths,
``n``, ``seed`` and ``window_bytes`` give the same sample.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kfm.data.readers import ReaderError, Rejection, file_kind, json_lines, list_files

SAMPLE_WINDOW_BYTES = 8 << 20
"""Default bytes of text read per sampled file."""


@dataclass(frozen=True, slots=True)
class SampledDocument:
    """One sampled document: its text and where it is (``FILE@BYTE``, ``FILE:LINE``, ``FILE:row N``)."""

    text: str
    where: str


def _reservoir(
    items: Iterable[SampledDocument], k: int, rng: random.Random
) -> list[SampledDocument]:
    """``k`` of ``items`` uniformly without replacement (all if fewer), kept in their order."""
    chosen: list[tuple[int, SampledDocument]] = []
    for i, item in enumerate(items):
        if i < k:
            chosen.append((i, item))
        elif (j := rng.randrange(i + 1)) < k:
            chosen[j] = (i, item)
    return [item for _, item in sorted(chosen, key=lambda c: c[0])]


def _text(obj: object, where: str, text_field: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise ReaderError(f"{where}: expected a JSON object with a string {text_field!r} field")
    return obj[text_field]


def _plain_window(
    path: Path, start: int, window_bytes: int, text_field: str
) -> Iterator[SampledDocument]:
    with path.open("rb") as f:
        f.seek(start)
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line holding byte start-1: the window starts after it
        used = 0
        while used < window_bytes:
            offset = f.tell()
            raw = f.readline()
            if not raw:
                return
            used += len(raw)
            if not raw.strip():
                continue
            where = f"{path}@{offset}"
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ReaderError(f"{where}: not a JSON object ({e})") from e
            yield SampledDocument(_text(obj, where, text_field), where)


def _compressed_window(path: Path, window_bytes: int, text_field: str) -> Iterator[SampledDocument]:
    used = 0
    for line_no, obj in json_lines(path):
        where = f"{path}:{line_no}"
        if isinstance(obj, Rejection):
            raise ReaderError(f"{obj.where}: {obj.detail}")
        text = _text(obj, where, text_field)
        yield SampledDocument(text, where)
        used += len(text)
        if used >= window_bytes:
            return


def _parquet_window(
    path: Path, rng: random.Random, window_bytes: int, text_field: str
) -> Iterator[SampledDocument]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors vary by version
        raise ReaderError(f"{path}: not a readable Parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise ReaderError(f"{path}: no column {text_field!r}; pass the text column's name")
    meta = pf.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if not sum(sizes):
        return
    group = rng.choices(range(len(sizes)), weights=sizes)[0]
    row, used = sum(sizes[:group]), 0
    for batch in pf.iter_batches(batch_size=256, row_groups=[group], columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield SampledDocument(text, f"{path}:row {row}")
                used += len(text)
            row += 1
            if used >= window_bytes:
                return


def sample_documents(
    paths: str | Path | Iterable[str | Path],
    n: int,
    *,
    seed: int = 0,
    text_field: str = "text",
    window_bytes: int = SAMPLE_WINDOW_BYTES,
) -> list[SampledDocument]:
    """Up to ``n`` documents drawn from the JSON-lines and Parquet files under ``paths``.

    See the module docstring for how files and documents are drawn. Documents come in file
    order (files sorted by path), then in their order in the file.

    Raises:
        ValueError: ``n`` or ``window_bytes`` is negative / not positive.
        InputNotFoundError: a path does not exist.
        ReaderError: no JSON-lines or Parquet file under ``paths``; a sampled line is not a JSON
            object with a string ``text_field``; a Parquet file has no such column; a compressed
            stream is corrupt within the window read.
    """
    if n < 0:
        raise ValueError(f"sample_documents: n={n} must be >= 0")
    if window_bytes <= 0:
        raise ValueError(f"sample_documents: window_bytes={window_bytes} must be > 0")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = sorted(
        {f for p in paths for f in list_files(p) if file_kind(f) in ("jsonl", "parquet")}
    )
    if not files:
        raise ReaderError(f"{', '.join(map(str, paths))}: no JSON-lines or Parquet files to sample")
    sizes = [f.stat().st_size for f in files]
    if n == 0 or not sum(sizes):
        return []
    rng = random.Random(seed)
    draws = Counter(rng.choices(range(len(files)), weights=sizes, k=n))
    sample: list[SampledDocument] = []
    for i in sorted(draws):
        path, file_rng = files[i], random.Random(f"{seed}/{files[i]}")
        kind, name = file_kind(path), path.name.lower()
        window: Iterator[SampledDocument]
        if kind == "parquet":
            window = _parquet_window(path, file_rng, window_bytes, text_field)
        elif name.endswith((".gz", ".zst")):
            window = _compressed_window(path, window_bytes, text_field)
        else:
            start = file_rng.randrange(max(1, sizes[i] - window_bytes + 1))
            window = _plain_window(path, start, window_bytes, text_field)
        sample.extend(_reservoir(window, draws[i], file_rng))
    return sample
