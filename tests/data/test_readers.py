"""Document readers: every input type, the document dicts they yield, and their errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfm.data.readers import InputNotFoundError, ReaderError, iter_documents

DOCS = [
    {"id": "a", "text": "첫 번째 문서입니다.", "source": "s1"},
    {"text": "Second document,\nwith a newline.", "source": "s2"},
    {"id": 7, "text": "third", "source": "s3"},
]


def _write_jsonl(path: Path, records: list, *, gz: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if gz:
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl(tmp_path: Path, gz: bool) -> None:
    path = _write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), DOCS, gz=gz)
    docs = list(iter_documents(path))
    assert [d["text"] for d in docs] == [r["text"] for r in DOCS]
    assert [d["id"] for d in docs] == ["a", f"{path}:2", "7"]  # own id, else FILE:LINE
    assert [d["source"] for d in docs] == ["s1", "s2", "s3"]  # other fields pass through


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x"}\n\n{"text": "y"}\n', encoding="utf-8")
    assert [d["id"] for d in iter_documents(path)] == [f"{path}:1", f"{path}:3"]


def test_other_text_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "hello", "text": "not this"}])
    (doc,) = iter_documents(path, text_field="body")
    assert doc["text"] == "hello"


def test_null_text_is_empty_document(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": None}])
    assert [d["text"] for d in iter_documents(path)] == [""]


def test_parquet_in_batches(tmp_path: Path) -> None:
    texts = [f"문서 {i} document" for i in range(2500)]  # > one 1024-row batch
    table = pa.table({"content": texts, "n": list(range(2500))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=700)
    docs = list(iter_documents(tmp_path / "d.parquet", text_field="content"))
    assert [d["text"] for d in docs] == texts
    assert docs[1234]["id"] == f"{tmp_path / 'd.parquet'}:1234"
    assert docs[1234]["n"] == 1234


def test_txt_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    (doc,) = iter_documents(tmp_path / "a.txt")
    assert doc == {"text": "line one\nline two\n", "id": str(tmp_path / "a.txt")}


def test_directory_sorted_recursive_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    _write_jsonl(tmp_path / "b" / "z.jsonl", [{"text": "b/z"}])
    _write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "a"}], gz=True)
    (tmp_path / "c.txt").write_text("c", encoding="utf-8")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    (tmp_path / "x.json.gz").write_bytes(gzip.compress(b'[{"text": "skipped"}]'))
    assert [d["text"] for d in iter_documents(tmp_path)] == ["a", "b/z", "c"]


def test_bundled_sample_reads() -> None:
    sample = Path(__file__).parents[2] / "data" / "sample"
    docs = list(iter_documents(sample / "klue.jsonl.gz"))
    assert len(docs) > 100
    assert all(d["text"] and d["license"] == "CC-BY-SA-4.0" for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)


def test_hf_save_to_disk(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["가나다", "abc", ""], "lang": ["ko", "en", "en"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = list(iter_documents(tmp_path / "ds"))
    assert [d["text"] for d in docs] == ["가나다", "abc", ""]
    assert docs[1]["lang"] == "en" and docs[1]["id"] == f"{tmp_path / 'ds'}:1"

    dd = datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"t": ["v"]}),
         "train": datasets.Dataset.from_dict({"t": ["t1", "t2"]})}
    )  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d["text"] for d in iter_documents(tmp_path / "dd", text_field="t")] == ["t1", "t2", "v"]


# --- errors -------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_documents(tmp_path / "nope.jsonl"))
    with pytest.raises(InputNotFoundError):
        list(iter_documents(str(tmp_path / "nope")))


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    docs = iter_documents(path)
    assert next(docs)["text"] == "ok"
    with pytest.raises(ReaderError, match=r"d\.jsonl:3: not valid JSON"):
        list(docs)


def test_missing_text_field_lists_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "title": "t"}])
    with pytest.raises(ReaderError) as e:
        list(iter_documents(path))
    msg = str(e.value)
    assert "'text'" in msg and "body, title" in msg and "--text-field" in msg and "d.jsonl:1" in msg
    assert isinstance(e.value, ValueError)


def test_non_string_text(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": ["a", "b"]}])
    with pytest.raises(ReaderError, match="not a string"):
        list(iter_documents(path))


def test_parquet_without_text_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ReaderError, match=r"no column 'text' \(its columns: content\)"):
        list(iter_documents(tmp_path / "d.parquet"))


def test_corrupt_and_truncated_gzip(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(ReaderError, match="bad.jsonl.gz: corrupt or truncated gzip"):
        list(iter_documents(tmp_path / "bad.jsonl.gz"))
    full = gzip.compress(("".join(f'{{"text": "doc {i}"}}\n' for i in range(2000))).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ReaderError, match="cut.jsonl.gz: corrupt or truncated gzip"):
        list(iter_documents(tmp_path / "cut.jsonl.gz"))


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes('{"text": "한글"}\n'.encode("euc-kr"))
    with pytest.raises(ReaderError, match="not UTF-8"):
        list(iter_documents(tmp_path / "d.jsonl"))


def test_unsupported_file_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ReaderError, match="unsupported file type"):
        list(iter_documents(tmp_path / "d.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match="holds no"):
        list(iter_documents(tmp_path / "empty"))
