"""kfm.data.readers, the one reading stack: iter_documents (kfm pack, strict dicts) and iter_unit
(the pipeline, records and counted rejections) over the same formats and line readers.

The pipeline's reader step on top of iter_unit: tests/data_pipeline/test_readers.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfm.data.readers import (
    REJECT_REASONS,
    InputNotFoundError,
    ReaderError,
    ReadUnit,
    Record,
    Rejection,
    UnitKind,
    iter_documents,
    iter_unit,
    text_problem,
    utf8_error_position,
)

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
    docs = list(iter_documents(tmp_path / "dd", text_field="t"))
    assert [d["text"] for d in docs] == ["t1", "t2", "v"]  # splits sorted by name
    assert docs[2]["id"] == f"{tmp_path / 'dd'}/validation:0"


def test_zstd_jsonl_with_several_frames(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DOCS).encode()
    c = zstandard.ZstdCompressor()
    (tmp_path / "d.jsonl.zst").write_bytes(c.compress(raw[:30]) + c.compress(raw[30:]))
    docs = list(iter_documents(tmp_path))  # a folder's .jsonl.zst files are read too
    assert [d["text"] for d in docs] == [r["text"] for r in DOCS]
    assert docs[1]["id"] == f"{tmp_path / 'd.jsonl.zst'}:2"


def test_bom_dropped_and_text_kept_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "bom"}\r\n{"text": "b", "id": ""}\r\n'
    )
    docs = list(iter_documents(tmp_path / "d.jsonl"))
    assert [(d["text"], d["id"]) for d in docs] == [
        ("bom", f"{tmp_path / 'd.jsonl'}:1"),
        ("b", f"{tmp_path / 'd.jsonl'}:2"),  # an empty id is no id
    ]
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    assert [d["text"] for d in iter_documents(tmp_path / "a.txt")] == ["line one\r\nline two\n"]


def test_binary_text_column_is_decoded(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [b"bytes \xea\xb0\x80"]}), tmp_path / "b.parquet")
    assert [d["text"] for d in iter_documents(tmp_path / "b.parquet")] == ["bytes 가"]


def test_text_problem_empty_and_utf8_byte_limit() -> None:
    assert text_problem(" \n\t ", 100) == "empty"
    assert text_problem("abc", 3) is None
    assert text_problem("abcd", 3) == "too_large"
    # 2 Hangul syllables = 6 UTF-8 bytes: the limit is in bytes, not characters.
    assert text_problem("한국", 6) is None
    assert text_problem("한국", 5) == "too_large"
    assert text_problem("x" * 10, 0) is None  # 0 disables the size check


# --- iter_unit: the same files as records, bad records counted instead of raised -----------

MIXED_LINES = [
    b'{"text": "good one", "id": "g1", "url": "u", "tags": ["x"], "license": "CC0-1.0"}',
    b'{"text": "bad byte \xff here"}',  # invalid_utf8
    b'{"text": "unterminated',  # invalid_json
    b"[1, 2]",  # invalid_json (not an object)
    b'{"body": "no text field"}',  # missing_text
    b'{"text": 42}',  # missing_text
    b'{"text": null}',  # missing_text
    b"",
    b'{"text": "good two", "source": "crawler"}',
]


def _unit(path: Path, kind: UnitKind = "jsonl") -> ReadUnit:
    return ReadUnit(kind=kind, path=path, key="k")


def test_iter_unit_records_and_rejections(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(MIXED_LINES) + b"\n")
    out = list(
        iter_unit(
            _unit(tmp_path / "m.jsonl"), text_field="text", id_field="id", text_field_setting="x"
        )
    )
    records = [r for r in out if isinstance(r, Record)]
    rejections = [r for r in out if isinstance(r, Rejection)]
    assert [(r.id, r.text) for r in records] == [("g1", "good one"), ("k:9", "good two")]
    assert records[0].license == "CC0-1.0" and records[0].metadata == {"url": "u"}  # scalars only
    assert records[1].metadata == {"source": "crawler"}  # renaming is the pipeline step's job
    assert [(r.reason, r.where.rsplit(":", 1)[1]) for r in rejections] == [
        ("invalid_utf8", "2"),
        ("invalid_json", "3"),
        ("invalid_json", "4"),
        ("missing_text", "5"),
        ("missing_text", "6"),
        ("missing_text", "7"),
    ]
    assert {r.reason for r in rejections} < set(REJECT_REASONS)
    assert "its fields: body" in rejections[3].detail


def test_iter_unit_names_the_text_field_setting(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    unit = _unit(tmp_path / "d.parquet", "parquet")
    with pytest.raises(ReaderError, match=r"no column 'text' .*set inputs\.text_field"):
        list(
            iter_unit(
                unit, text_field="text", id_field="id", text_field_setting="inputs.text_field"
            )
        )


def test_iter_documents_is_strict_where_iter_unit_counts(tmp_path: Path) -> None:
    """Every line iter_unit rejects stops iter_documents, naming file, line and fix."""
    expected = {
        2: r"not UTF-8.*convert the file to UTF-8",
        3: r"not valid JSON",
        4: r"not valid JSON lines \(a JSON list\)",
        5: r"field 'text' is missing \(its fields: body\).*--text-field",
        6: r"field 'text' is a int, not a string.*--text-field",
    }
    for line_no, message in expected.items():
        path = tmp_path / f"l{line_no}.jsonl"
        path.write_bytes(MIXED_LINES[0] + b"\n" + MIXED_LINES[line_no - 1] + b"\n")
        with pytest.raises(ReaderError, match=rf"l{line_no}\.jsonl:2: {message}"):
            list(iter_documents(path))
    # A null text is an empty document for pack (it counts and skips it), not an error.
    (tmp_path / "null.jsonl").write_bytes(MIXED_LINES[6] + b"\n")
    assert [d["text"] for d in iter_documents(tmp_path / "null.jsonl")] == [""]


def test_json_array_file(tmp_path: Path) -> None:
    (tmp_path / "arr.jsonl").write_text('[\n {"text": "x"}\n]\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"arr\.jsonl: holds one JSON array"):
        list(iter_documents(tmp_path / "arr.jsonl"))


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


def test_truncated_zstd(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    full = zstandard.ZstdCompressor().compress(
        "".join(f'{{"text": "doc {i}"}}\n' for i in range(2000)).encode()
    )
    (tmp_path / "cut.jsonl.zst").write_bytes(full[: len(full) // 2])
    with pytest.raises(ReaderError, match="cut.jsonl.zst: corrupt or truncated zstd"):
        list(iter_documents(tmp_path / "cut.jsonl.zst"))


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


# --- where a byte that is not UTF-8 is: line and byte in the line, both from 1 ---------------


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.txt", "bom.jsonl"])
def test_not_utf8_names_line_and_byte(tmp_path: Path, name: str) -> None:
    lines = [b'{"text": "one"}', b'{"text": "\xed\x95\x9c two"}', b'{"text": "b\xc3(d"}', b""]
    data = b"\n".join(lines)
    line, byte = 3, 12  # 0xc3 starts a 2-byte character; "(" cannot continue it
    if name.startswith("bom"):
        data = b"\xef\xbb\xbf" + data.replace(b"\n", b" ", 2)  # one line: the BOM's 3 bytes count
        line, byte = 1, 3 + len(lines[0]) + 1 + len(lines[1]) + 1 + 12
    path = tmp_path / name
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    path.write_bytes(data)
    expected = rf"{name}:{line}: not UTF-8: byte {byte} of the line is 0xc3 \(invalid continuation"
    with pytest.raises(ReaderError, match=expected):
        list(iter_documents(path))
    assert utf8_error_position(b"ab\ncd\xff", 5) == (2, 3)
