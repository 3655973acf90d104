"""sample_documents: bounded reads, size-weighted file draws, seeded repeatability, all formats."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.pii import audit
from data_pipeline.sample import sample_documents
from kfm.data.readers import ReaderError, iter_documents


def _lines(prefix: str, n: int, pad: int = 80) -> bytes:
    return "".join(
        json.dumps({"id": f"{prefix}{i}", "text": f"{prefix} doc {i} " + "x" * pad}) + "\n"
        for i in range(n)
    ).encode()


def test_plain_jsonl_reads_one_window_at_a_random_offset(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(_lines("a", 20_000))  # ~2.1 MB
    window = 16 << 10
    docs = sample_documents(path, 40, seed=3, window_bytes=window)
    assert len(docs) == 40
    offsets = [int(d.where.rsplit("@", 1)[1]) for d in docs]
    assert offsets == sorted(offsets)
    # One window: all draws lie within window_bytes (plus one line) of each other.
    assert offsets[-1] - offsets[0] <= window
    assert all(d.text.startswith("a doc ") for d in docs)
    with path.open("rb") as f:  # each `where` is the byte offset of that very line
        f.seek(offsets[0])
        assert json.loads(f.readline())["text"] == docs[0].text
    again = sample_documents(path, 40, seed=3, window_bytes=window)
    other = sample_documents(path, 40, seed=4, window_bytes=window)
    assert again == docs and {d.where for d in other} != {d.where for d in docs}


def test_files_are_drawn_in_proportion_to_their_size(tmp_path):
    (tmp_path / "small.jsonl").write_bytes(_lines("s", 1000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "large.jsonl").write_bytes(_lines("l", 9000))
    (tmp_path / "README.md").write_text("not sampled")
    docs = sample_documents(tmp_path, 500, seed=0, window_bytes=1 << 20)
    by_file = Counter(d.text[0] for d in docs)
    assert len(docs) == 500 and 20 <= by_file["s"] <= 80  # expected 50 of 500
    assert [d.text[0] for d in docs] == ["s"] * by_file["s"] + ["l"] * by_file["l"]  # path order


def test_compressed_file_reads_only_its_first_window(tmp_path):
    # Only the head of the gzip stream is valid: a full read fails, the sample never gets there.
    good = gzip.compress(_lines("g", 400))
    path = tmp_path / "part.jsonl.gz"
    path.write_bytes(good + good[: len(good) // 2])
    with pytest.raises(ReaderError, match="corrupt or truncated gzip"):
        list(iter_documents(path))
    docs = sample_documents(path, 10, seed=1, window_bytes=4096)
    assert len(docs) == 10
    lines = [int(d.where.rsplit(":", 1)[1]) for d in docs]
    assert lines == sorted(lines) and lines[-1] <= 4096 // 80 + 1


def test_parquet_reads_one_row_group_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "y" * 50 for i in range(1000)]
    table = pa.table({"id": list(range(1000)), "body": texts})
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=100)
    docs = sample_documents(path, 5, seed=2, text_field="body", window_bytes=1 << 20)
    rows = [int(d.where.rsplit("row ", 1)[1]) for d in docs]
    assert len(docs) == 5 and len({r // 100 for r in rows}) == 1
    assert all(d.text == texts[r] for d, r in zip(docs, rows, strict=True))
    with pytest.raises(ReaderError, match="no column 'text'"):
        sample_documents(path, 5)


def test_small_corpus_gives_what_it_has_and_feeds_the_audit(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "전화 010-0000-1234"}, {"text": "plain"}, {"text": "ip 192.0.2.7"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    docs = sample_documents(path, 50)
    assert sorted(d.text for d in docs) == sorted(r["text"] for r in rows)
    result = audit(d.text for d in docs)
    assert result.documents == 3 and result.documents_with_pii == 2
    assert sample_documents(path, 0) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"text": "ok"}\nnot json\n', "not a JSON object"), ('{"body": 1}\n', "string 'text'")],
)
def test_bad_lines_and_arguments_are_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ReaderError, match=message):
        sample_documents(path, 5)
    with pytest.raises(ValueError, match="n=-1"):
        sample_documents(path, -1)
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(ReaderError, match="no JSON-lines or Parquet files"):
        sample_documents(tmp_path / "only.txt", 1)


def test_missing_path_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sample_documents(tmp_path / "nope", 1)
