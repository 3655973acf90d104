"""Reader step: every input format, every bad-input case, sharding, and the shipped-set adapters.

The reading functions underneath (kfm.data.readers) are tested in tests/data/test_readers.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document  # noqa: E402
from datatrove.utils.logging import logger  # noqa: E402

from data_pipeline import shipped  # noqa: E402
from data_pipeline.shipped import BENCHMARK_PARTS, SHIPPED_SETS, group, unique  # noqa: E402
from data_pipeline.steps.read import InputConfig, KfmReader  # noqa: E402
from eval.registry import EVAL_SETS, data_root, iter_items  # noqa: E402
from kfm.data.readers import REJECT_REASONS, ReaderError, Record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _shared() -> Path:
    try:
        return data_root()
    except FileNotFoundError:
        pytest.skip("shared data folder not found (set KFM_SHARED_DATA)")


def _read(*inputs: InputConfig, rank: int = 0, world_size: int = 1) -> tuple[list, dict]:
    step = KfmReader(list(inputs))
    docs = list(step.run(None, rank, world_size))
    stats = {k: v.total for k, v in step.stats.stats.items()}
    return docs, stats


def _reconciles(stats: dict) -> bool:
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    return stats.get("total", 0) == stats.get("forwarded", 0) + dropped and dropped == stats.get(
        "dropped", 0
    )


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


RECORDS = [
    {"id": "a1", "text": "첫 번째 문서입니다.", "url": "https://example.org/1", "tags": ["x"]},
    {"text": "Second document, no id.", "license": "CC0-1.0", "source": "crawler-7"},
    {"id": 7, "text": "Third: numeric id.", "title": "T"},
]


# ---- pure helpers ----


def test_unique_and_group() -> None:
    assert unique([" a", "b", "a ", "", "  ", "c"]) == ["a", "b", "c"]
    assert group(["1", "2", "3"], 2) == ["1\n2", "3"]


# ---- formats ----


def test_jsonl_documents_ids_metadata_and_license(tmp_path: Path) -> None:
    (tmp_path / "part.jsonl").write_bytes(
        _jsonl_bytes(RECORDS[:2]) + b"\n  \n" + _jsonl_bytes(RECORDS[2:])
    )
    docs, stats = _read(InputConfig(name="web", paths=[str(tmp_path / "part.jsonl")]))
    assert [d.id for d in docs] == ["web/a1", "web/part:2", "web/7"]
    assert docs[0].text == RECORDS[0]["text"]
    assert docs[0].metadata == {
        "source": "web",
        "license": "unknown",
        "url": "https://example.org/1",
    }  # lists are not kept; no language unless configured
    assert docs[1].metadata["license"] == "CC0-1.0"  # the record's own license
    assert docs[1].metadata["record_source"] == "crawler-7"  # source belongs to the pipeline
    assert docs[2].metadata["title"] == "T"
    assert stats["total"] == stats["forwarded"] == 3 and _reconciles(stats)

    docs, _ = _read(
        InputConfig(name="web", paths=[str(tmp_path)], license="CC-BY-4.0", language="ko")
    )
    assert {d.metadata["license"] for d in docs} == {"CC-BY-4.0"}  # config overrides records
    assert {(d.metadata["language"], d.metadata["language_score"]) for d in docs} == {("ko", 1.0)}


def test_custom_text_and_id_fields(tmp_path: Path) -> None:
    recs = [{"key": "k1", "body": "hello", "text": "not this"}]
    (tmp_path / "f.jsonl").write_bytes(_jsonl_bytes(recs))
    docs, _ = _read(InputConfig(name="s", paths=[str(tmp_path)], text_field="body", id_field="key"))
    assert [(d.id, d.text) for d in docs] == [("s/k1", "hello")]
    assert docs[0].metadata["text"] == "not this"  # other fields travel as metadata


def test_compressed_jsonl_reads_like_plain(tmp_path: Path) -> None:
    import zstandard

    raw = _jsonl_bytes(RECORDS)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    # Two zstd frames in one file (concatenated shards are common): both must be read.
    c = zstandard.ZstdCompressor()
    (tmp_path / "b.jsonl.zst").write_bytes(c.compress(raw[:50]) + c.compress(raw[50:]))
    docs, stats = _read(InputConfig(name="c", paths=[str(tmp_path / "*.jsonl.*")]))
    texts = [d.text for d in docs]
    assert texts == [r["text"] for r in RECORDS] * 2
    assert [d.id for d in docs][:2] == ["c/a1", "c/a:2"]
    assert [d.id for d in docs][4] == "c/b:2"
    assert stats["forwarded"] == 6 and _reconciles(stats)


def test_parquet_streamed_over_row_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 2500  # more than one batch and several row groups
    table = pa.table(
        {"text": [f"row {i} text" for i in range(n)], "score": [float(i) for i in range(n)]}
    )
    pq.write_table(table, tmp_path / "shard.parquet", row_group_size=1000)
    docs, stats = _read(InputConfig(name="pq", paths=[str(tmp_path)]))
    assert len(docs) == n and stats["forwarded"] == n
    assert docs[0].id == "pq/shard:0" and docs[-1].id == f"pq/shard:{n - 1}"
    assert docs[1234].text == "row 1234 text" and docs[1234].metadata["score"] == 1234.0


def test_text_folder_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta\nbody", encoding="utf-8")
    (tmp_path / "sub" / "skip.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    docs, stats = _read(InputConfig(name="notes", paths=[str(tmp_path)], format="text"))
    assert [(d.id, d.text) for d in docs] == [
        ("notes/a", "alpha text"),
        ("notes/sub/b", "# beta\nbody"),
    ]
    assert stats["dropped_invalid_utf8"] == 1 and stats["dropped_empty"] == 1
    assert _reconciles(stats)


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "two"], "lang": ["en", "en"]})
    ds.save_to_disk(str(tmp_path / "single"))
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["t0", "t1", "t2"]}),
            "test": datasets.Dataset.from_dict({"content": ["s0"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "multi"))
    docs, _ = _read(InputConfig(name="hf", paths=[str(tmp_path / "single")]))
    assert [(d.id, d.text, d.metadata["lang"]) for d in docs] == [
        ("hf/single:0", "one", "en"),
        ("hf/single:1", "two", "en"),
    ]
    docs, _ = _read(
        InputConfig(
            name="hf2", paths=[str(tmp_path / "multi")], format="hf_disk", text_field="content"
        )
    )
    assert [d.id for d in docs] == [
        "hf2/multi/test:0",
        "hf2/multi/train:0",
        "hf2/multi/train:1",
        "hf2/multi/train:2",
    ]
    with pytest.raises(ReaderError, match="no column 'text'.*content.*text_field"):
        _read(InputConfig(name="hf3", paths=[str(tmp_path / "multi")]))


def test_ids_stay_unique_across_folders_with_same_file_names(tmp_path: Path) -> None:
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "part-0.jsonl").write_bytes(_jsonl_bytes([{"text": sub}]))
    docs, _ = _read(InputConfig(name="m", paths=[str(tmp_path / "x"), str(tmp_path / "y")]))
    assert [d.id for d in docs] == ["m/x/part-0:1", "m/y/part-0:1"]
    (tmp_path / "x" / "part-0.jsonl.gz").write_bytes(gzip.compress(b'{"text": "dup"}\n'))
    with pytest.raises(ReaderError, match="same ids"):
        KfmReader([InputConfig(name="m", paths=[str(tmp_path / "x")])])


def test_upstream_documents_pass_through(tmp_path: Path) -> None:
    (tmp_path / "f.jsonl").write_bytes(_jsonl_bytes([{"text": "mine"}]))
    step = KfmReader([InputConfig(name="r", paths=[str(tmp_path)])])
    earlier = Document(text="earlier", id="other/1", metadata={"source": "other", "license": "x"})
    assert [d.id for d in step.run(iter([earlier]))] == ["other/1", "r/f:1"]


# ---- bad input ----


def test_missing_path_and_empty_glob_fail_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ReaderError, match=r"input 'gone'.*nope\.jsonl"):
        KfmReader([InputConfig(name="gone", paths=[str(missing)])])
    with pytest.raises(ReaderError, match=r"input 'g'.*\*\.parquet.*matches no file"):
        KfmReader([InputConfig(name="g", paths=[str(tmp_path / "*.parquet")])])
    (tmp_path / "notes.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ReaderError, match="holds no"):
        KfmReader([InputConfig(name="e", paths=[str(tmp_path)])])


@pytest.mark.parametrize("case", ["garbage_gz", "truncated_gz", "garbage_zst", "truncated_zst"])
def test_corrupt_compressed_file_names_the_file(tmp_path: Path, case: str) -> None:
    import zstandard

    raw = _jsonl_bytes([{"text": f"document number {i} " * 20} for i in range(200)])
    data = {
        "garbage_gz": b"\x1f\x8b\x08\x00 not really gzip",
        "truncated_gz": gzip.compress(raw)[:-40],
        "garbage_zst": b"this is not zstd at all",
        "truncated_zst": zstandard.ZstdCompressor().compress(raw)[:-30],
    }[case]
    name = "bad.jsonl.gz" if case.endswith("gz") else "bad.jsonl.zst"
    (tmp_path / name).write_bytes(data)
    step = KfmReader([InputConfig(name="z", paths=[str(tmp_path / name)])])
    with pytest.raises(ReaderError, match=rf"{name}: corrupt or truncated"):
        list(step.run())


def test_unreadable_parquet_and_missing_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(ReaderError, match=r"broken\.parquet: not a readable Parquet"):
        list(KfmReader([InputConfig(name="p", paths=[str(tmp_path / "broken.parquet")])]).run())
    pq.write_table(pa.table({"body": ["x"], "id": ["1"]}), tmp_path / "cols.parquet")
    with pytest.raises(ReaderError) as err:
        list(KfmReader([InputConfig(name="p", paths=[str(tmp_path / "cols.parquet")])]).run())
    msg = str(err.value)
    assert "cols.parquet" in msg and "'text'" in msg and "body, id" in msg and "text_field" in msg


def test_per_record_problems_are_counted_not_fatal(tmp_path: Path) -> None:
    lines = [
        b'{"text": "good one"}',
        b'{"text": "bad byte \xff here"}',  # invalid_utf8
        b'{"text": "unterminated',  # invalid_json
        b"[1, 2]",  # invalid_json (not an object)
        b'{"body": "no text field"}',  # missing_text
        b'{"text": 42}',  # missing_text
        b'{"text": null}',  # missing_text
        b'{"text": "   "}',  # empty
        b'{"text": "' + b"x" * 200 + b'"}',  # too_large
        b'{"text": "good two"}',
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(str(m)), level="WARNING")
    try:
        docs, stats = _read(
            InputConfig(name="mix", paths=[str(tmp_path / "mixed.jsonl")], max_doc_bytes=100)
        )
    finally:
        logger.remove(sink)
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [d.id for d in docs] == ["mix/mixed:1", "mix/mixed:10"]  # line numbers stay true
    assert stats["total"] == 10 and stats["forwarded"] == 2 and stats["dropped"] == 8
    assert {k: v for k, v in stats.items() if k.startswith("dropped_")} == {
        "dropped_invalid_utf8": 1,
        "dropped_invalid_json": 2,
        "dropped_missing_text": 3,
        "dropped_empty": 1,
        "dropped_too_large": 1,
    }
    assert set(REJECT_REASONS) == {k.removeprefix("dropped_") for k in stats if "dropped_" in k}
    assert _reconciles(stats)
    # The first few rejections are logged with file and line; the rest only counted.
    assert any("mixed.jsonl:2 (invalid_utf8" in m for m in seen)
    assert not any("mixed.jsonl:7 (" in m for m in seen)
    assert any("8 records dropped in all" in m for m in seen)


def test_utf8_bom_and_json_array_file(tmp_path: Path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes([{"text": "bom"}]))
    docs, _ = _read(InputConfig(name="b", paths=[str(tmp_path / "bom.jsonl")]))
    assert [d.text for d in docs] == ["bom"]
    (tmp_path / "arr.json").write_text('[\n {"text": "x"}\n]\n', encoding="utf-8")
    with pytest.raises(ReaderError, match="JSON array"):
        list(KfmReader([InputConfig(name="a", paths=[str(tmp_path / "arr.json")])]).run())


def test_input_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"inputs\.name='Web-1'"):
        InputConfig(name="Web-1", paths=["x"])
    with pytest.raises(ValueError, match=r"inputs\.paths.*'w'.*empty"):
        InputConfig(name="w")
    with pytest.raises(ValueError, match=r"inputs\.limit=-2"):
        InputConfig(name="w", paths=["x"], limit=-2)
    with pytest.raises(ValueError, match=r"inputs\.max_doc_bytes"):
        InputConfig(name="w", paths=["x"], max_doc_bytes=-1)
    with pytest.raises(ValueError, match=r"inputs\.weight"):
        InputConfig(name="w", paths=["x"], weight=float("nan"))
    with pytest.raises(ValueError, match=r"inputs\.language='Korean'"):
        InputConfig(name="w", paths=["x"], language="Korean")
    with pytest.raises(ValueError, match=r"inputs\.shipped.*format 'shipped'"):
        InputConfig(name="w", paths=["x"], format="jsonl", shipped="medquad")
    with pytest.raises(ValueError, match=r"did you mean 'medquad'"):
        InputConfig(name="w", format="shipped", shipped="medquadd")
    with pytest.raises(ValueError, match="used twice"):
        KfmReader([InputConfig(name="w", shipped="medquad")] * 2)
    cfg = InputConfig(name="mq", paths=["/somewhere/medquad"], format="shipped")
    assert cfg.shipped == "medquad"  # defaults to the folder name


@pytest.mark.parametrize("name", sorted({*EVAL_SETS, "medqa_usmle", "pubmedqa"}))
def test_eval_sets_are_refused_as_input(name: str) -> None:
    with pytest.raises(ValueError, match="evaluation set"):
        InputConfig(name="x", format="shipped", shipped=name)
    with pytest.raises(ValueError, match="evaluation set"):
        InputConfig(name="x", format="shipped", paths=[f"/anywhere/{name}"])


def test_eval_files_are_refused_as_generic_input() -> None:
    root = _shared()
    with pytest.raises(ValueError, match="evaluation set 'medmcqa'"):
        KfmReader([InputConfig(name="sneaky", paths=[str(root / "medmcqa")], format="jsonl")])


# ---- sharding and limits ----


def test_files_are_sharded_over_ranks(tmp_path: Path) -> None:
    for i in range(7):
        recs = [{"text": f"file {i} doc {j}"} for j in range(i + 1)]
        (tmp_path / f"f{i}.jsonl").write_bytes(_jsonl_bytes(recs))
    (tmp_path / "t.txt").write_text("a text file", encoding="utf-8")
    inputs = [
        InputConfig(name="one", paths=[str(tmp_path / "*.jsonl")]),
        InputConfig(name="two", paths=[str(tmp_path / "t.txt")]),
    ]
    everything = {d.id for d in _read(*inputs)[0]}
    per_rank = [[d.id for d in _read(*inputs, rank=r, world_size=3)[0]] for r in range(3)]
    assert all(per_rank)
    assert sum(map(len, per_rank)) == len(everything) == 29
    assert set().union(*map(set, per_rank)) == everything
    # Whole files per rank, file k on rank k % 3: f0, f3, f6 on rank 0.
    assert {i.split(":")[0] for i in per_rank[0]} == {"one/f0", "one/f3", "one/f6"}
    assert per_rank[1][-1] == "two/t"  # unit 7 (the 8th) -> rank 1


def test_limit_counts_forwarded_documents(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes([{"text": ""}] + [{"text": "x"}] * 5))
    (tmp_path / "b.jsonl").write_bytes(_jsonl_bytes([{"text": "y"}] * 5))
    docs, stats = _read(InputConfig(name="l", paths=[str(tmp_path)], limit=7))
    assert len(docs) == 7 and [d.text for d in docs] == ["x"] * 5 + ["y"] * 2
    assert stats["total"] == 8 and _reconciles(stats)
    assert _read(InputConfig(name="l", paths=[str(tmp_path)], limit=0))[0] == []


# ---- shipped sets (real files) ----

EXPECTED_LANGUAGES = {"korean_english_news": {"ko", "en"}}


@pytest.mark.parametrize("name", sorted(SHIPPED_SETS))
def test_shipped_set_with_limit(name: str) -> None:
    root = _shared()
    adapter = SHIPPED_SETS[name]
    docs, stats = _read(
        InputConfig(name=name, format="shipped", paths=[str(root / name)], limit=40)
    )
    assert 0 < len(docs) <= 40 and _reconciles(stats)
    languages = EXPECTED_LANGUAGES.get(name, {adapter.language})
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids)
    for d in docs:
        assert d.id.startswith(f"{name}/") and d.text.strip()
        assert d.metadata["source"] == name and d.metadata["license"]
        assert d.metadata["language"] in languages and d.metadata["language_score"] == 1.0
    licenses = Counter(d.metadata["license"] for d in docs)
    if name == "ohsumed_abstracts":
        assert set(licenses) == {next(iter(licenses))} and next(iter(licenses)).startswith(
            "unknown"
        )
    elif name == "craft_fulltext":
        assert all(d.metadata["copyright_notice"] for d in docs)
        assert licenses["CC-BY"] > 0
    elif name == "plos_starter_corpus":
        assert all(d.metadata["doi"].startswith("10.1371/") for d in docs)
        assert set(licenses) <= {"CC-BY", "CC0-1.0", "public-domain"}
    elif name.startswith("openstax"):
        assert set(licenses) == {"CC-BY-NC-SA-4.0"}
        assert all("OpenStax" in d.metadata["attribution"] for d in docs)
    elif name in ("klue_dev", "kornlu", "korean_chatbot_data", "korean_english_news"):
        lines = docs[0].text.split("\n")  # grouped: paragraphs of one-liners
        assert len(lines) == (40 if name == "korean_chatbot_data" else 20)
        assert set(licenses) == {adapter.license}
    else:
        assert set(licenses) == {adapter.license}


def test_shipped_full_counts_and_unique_ids_over_all_sets() -> None:
    root = _shared()
    inputs = [InputConfig(name=n, format="shipped", paths=[str(root / n)]) for n in SHIPPED_SETS]
    step = KfmReader(inputs)
    by_source: Counter[str] = Counter()
    ids: set[str] = set()
    for d in step.run():
        by_source[d.metadata["source"]] += 1
        ids.add(d.id)
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert by_source["medquad"] == 16_407  # answered pairs (SOURCE.md)
    assert stats["dropped_empty"] == 47_441 - 16_407  # MedlinePlus rows without an answer
    assert by_source["medical_abstracts_tc"] == 2_888
    assert by_source["ohsumed_abstracts"] == 7_400
    assert by_source["plos_starter_corpus"] == 121 and by_source["craft_fulltext"] == 84
    assert by_source["openstax_anatomy_physiology_2e"] == 198
    assert by_source["openstax_microbiology"] == 159
    assert len(ids) == sum(by_source.values())  # ids unique over the whole run
    assert _reconciles(stats)


def test_klue_ner_tags_removed_and_dp_rebuilt() -> None:
    _shared()  # the default folder: <shared data root>/klue_dev
    docs, _ = _read(InputConfig(name="klue", shipped="klue_dev"))
    parts = Counter(d.id.split("/")[1] for d in docs)
    assert parts == {"sts": 52, "ner": 250, "dp": 100}  # no "nli": KLUE-NLI is a benchmark
    ner = "\n".join(d.text for d in docs if d.id.startswith("klue/ner/"))
    assert ner.startswith("경찰은 또 성매매 알선 자금을 관리한 박씨의 딸(32)과")
    assert ":PS>" not in ner and ":OG>" not in ner
    dp = next(d.text for d in docs if d.id == "klue/dp/0000")
    assert dp.startswith("'K팝스타3’ 유희열이 홍정희의 탈락에 눈물을 흘렸다.\n")


@cache
def _nli_sentences() -> frozenset[str]:
    """Every premise and hypothesis of the registered Korean NLI benchmarks, spaces collapsed."""
    root = _shared()
    return frozenset(
        " ".join(s.split())
        for name in ("klue_nli", "xnli_ko")
        for item in iter_items(name, root=root)
        for s in (item.context or "", item.question)
    )


def _leaked(texts: list[str]) -> list[str]:
    nli = _nli_sentences()
    return [line for t in texts for line in t.split("\n") if " ".join(line.split()) in nli]


def test_benchmark_parts_are_refused_and_not_read() -> None:
    """KLUE-NLI and XNLI-ko sit in pretraining folders: their parts are never read."""
    root = _shared()
    for name, held in BENCHMARK_PARTS.items():
        adapter = SHIPPED_SETS[name]
        assert adapter.benchmark_parts == held and set(held.values()) <= set(EVAL_SETS)
        for part, eval_set in held.items():
            assert part not in adapter.parts
            assert EVAL_SETS[eval_set].path.split("/")[0] == name  # the benchmark's folder
            with pytest.raises(
                ValueError, match=f"part '{part}' is the benchmark set '{eval_set}'"
            ):
                adapter.read(root / name, part)
        docs, _ = _read(InputConfig(name=name, format="shipped", paths=[str(root / name)]))
        assert {d.id.split("/")[1] for d in docs} == set(adapter.parts)
        assert _leaked([d.text for d in docs]) == []
    with pytest.raises(ValueError, match="has no part 'nil'; its parts: sts, ner, dp"):
        SHIPPED_SETS["klue_dev"].read(root / "klue_dev", "nil")


def test_benchmark_part_is_read_once_unregistered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exclusion follows the registry: without klue_nli registered, NLI is input again."""
    root = _shared()
    monkeypatch.delitem(EVAL_SETS, "klue_nli")
    files = {p: (f"klue-{p}-v1.1_dev.json",) for p in ("nli", "sts")}
    adapter = shipped._with_parts("klue_dev", "CC-BY-SA-4.0", "ko", files, shipped._klue)
    assert adapter.parts == ("nli", "sts") and adapter.benchmark_parts == {}
    nli = [r.text for r in adapter.read(root / "klue_dev", "nli") if isinstance(r, Record)]
    assert len(nli) == 200 and len(_leaked(nli)) == 4000  # premises + hypotheses, 20 per doc


@pytest.mark.parametrize("sample", ["klue", "kornlu"])
def test_sample_holds_no_nli_benchmark_sentence(sample: str) -> None:
    """No line of the bundled Korean sample is a KLUE-NLI / XNLI-ko premise or hypothesis."""
    with gzip.open(REPO / "data/sample" / f"{sample}.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == {"klue": 402, "kornlu": 771}[sample]
    assert _leaked(texts) == []


def test_make_sample_output_is_unchanged(tmp_path: Path) -> None:
    """scripts/make_sample.py uses data_pipeline.shipped; data/sample must not change."""
    root = _shared()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/make_sample.py"),
            "--src",
            str(root),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    committed = REPO / "data/sample"
    for f in sorted(committed.rglob("*")):
        if f.is_file():
            new = tmp_path / f.relative_to(committed)
            assert (
                hashlib.sha256(new.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
            ), f
