"""kfm pack: deterministic shards for any worker count, exact counts, exact round trips."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kfm.data.pack import pack
from kfm.data.readers import ReaderError
from kfm.data.shards import ShardSet
from kfm.fs import OutputError
from kfm.tokenizer import train_tokenizer

SAMPLE = Path(__file__).parents[2] / "data" / "sample"


def _sample(name: str, n: int, skip: int = 0) -> list[str]:
    with gzip.open(SAMPLE / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()[skip : skip + n]
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = _sample("ko_chatbot", 40) + _sample("kornlu", 40) + _sample("medquad", 80)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(texts, out, vocab_size=1000, n_reserved=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """Two JSONL inputs (Korean, English) with an empty and a blank document; returns (paths,
    non-empty texts in input order)."""
    d = tmp_path_factory.mktemp("corpus")
    ko = _sample("klue", 60) + [""] + _sample("ko_chatbot", 40, skip=300)
    en = _sample("medquad", 100, skip=400) + ["  \n "] + _sample("plos", 1)
    for name, texts in (("ko.jsonl", ko), ("en.jsonl.gz", en)):
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        if name.endswith(".gz"):
            (d / name).write_bytes(gzip.compress(lines.encode()))
        else:
            (d / name).write_text(lines, encoding="utf-8")
    texts = [t for t in ko + en if t.strip()]
    return [str(d / "ko.jsonl"), str(d / "en.jsonl.gz")], texts


def _docs(path: Path, split: str) -> list[np.ndarray]:
    s = ShardSet.open(path, split)
    starts = np.flatnonzero(np.diff(s.doc_index(0, s.n_tokens), prepend=-1))
    bounds = [*starts.tolist(), s.n_tokens]
    return [s.read(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok_dir, corpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("packed") / "set"
    m = pack(corpus[0], tok_dir, out, source_name="mix", license="CC-BY", val_fraction=0.1,
             workers=1, batch_docs=16, shard_tokens=20_000)  # fmt: skip
    return out, m


def test_workers_give_byte_identical_shards(tmp_path, tok_dir, corpus, packed) -> None:
    out1, m1 = packed
    out2 = tmp_path / "w2"
    m2 = pack(corpus[0], tok_dir, out2, source_name="mix", license="CC-BY", val_fraction=0.1,
              workers=2, batch_docs=16, shard_tokens=20_000)  # fmt: skip
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    assert len([n for n in names if n.startswith("train-")]) > 2  # several files were rolled
    for name in names:
        if name != "manifest.json":
            assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    assert {k: v for k, v in m1.items() if k != "created_at"} == {
        k: v for k, v in m2.items() if k != "created_at"
    }


def test_manifest_counts_and_identity(tok_dir, corpus, packed) -> None:
    out, m = packed
    texts = corpus[1]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    expected_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts)  # bos..., + eos
    assert m["skipped_empty"] == 2
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["n_docs"] + val["n_docs"] == len(texts)
    assert train["n_tokens"] + val["n_tokens"] == expected_tokens
    source = {k: v for k, v in m["sources"][0].items() if k != "document_licenses"}
    assert [source] == [{"name": "mix", "license": "CC-BY", "inputs": corpus[0],
                         "n_docs": len(texts), "n_tokens": expected_tokens}]  # fmt: skip
    raw = (tok_dir / "tokenizer.json").read_bytes()
    assert m["tokenizer_hash"] == hashlib.sha256(raw).hexdigest()
    assert (m["vocab_size"], m["dtype"]) == (len(tok), "uint16")
    assert (m["bos_id"], m["eos_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert json.loads((out / "manifest.json").read_text()) == m


def test_round_trip_and_split(tok_dir, corpus, packed) -> None:
    out, _ = packed
    texts = corpus[1]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    decoded = {}
    for split in ("train", "val"):
        docs = _docs(out, split)
        assert all(d[0] == tok.bos_token_id and d[-1] == tok.eos_token_id for d in docs)
        assert all(tok.eos_token_id not in d[:-1] for d in docs)
        decoded[split] = [tok.decode(d.tolist(), skip_special_tokens=True) for d in docs]
    train, val = decoded["train"], decoded["val"]
    assert val, "val split is empty"
    assert not set(train) & set(val)
    # Every input document comes back exactly, in input order within its split.
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]
    assert val == [t for t in texts if t in set(val)]
    assert any("\uac00" <= c <= "\ud7a3" for c in "".join(val + train))  # Korean round-tripped
    # About val_fraction of the documents, not all or none.
    assert 0.02 < len(val) / len(texts) < 0.25


def test_refuses_existing_out_dir(tmp_path, tok_dir, corpus, packed) -> None:
    out, _ = packed
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(OutputError, match="already holds a kfm shard set; pass --overwrite"):
        pack(corpus[0], tok_dir, out, source_name="mix")
    assert (out / "manifest.json").read_bytes() == before
    again = tmp_path / "again"
    pack(corpus[0][:1], tok_dir, again, source_name="ko")
    pack(corpus[0][1:], tok_dir, again, source_name="en", overwrite=True)
    assert json.loads((again / "manifest.json").read_text())["sources"][0]["name"] == "en"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp dirs left


def test_missing_input(tmp_path, tok_dir, corpus) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        pack([corpus[0][0], str(tmp_path / "nope.jsonl")], tok_dir, tmp_path / "o", source_name="x")
    assert list(tmp_path.iterdir()) == []


def test_missing_text_field_leaves_nothing(tmp_path, tok_dir, corpus) -> None:
    with pytest.raises(ReaderError, match="'body'.*--text-field"):
        pack(corpus[0], tok_dir, tmp_path / "o", source_name="x", text_field="body")
    assert list(tmp_path.iterdir()) == []


def test_bad_line_midway_leaves_nothing(tmp_path, tok_dir) -> None:
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(300)] + ["{oops"]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ReaderError, match=r"in\.jsonl:301"):
        pack([str(src)], tok_dir, tmp_path / "o", source_name="x", batch_docs=8, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_missing_tokenizer(tmp_path, corpus) -> None:
    with pytest.raises(FileNotFoundError, match="kfm tokenizer train"):
        pack(corpus[0], tmp_path / "no-tok", tmp_path / "o", source_name="x")


def test_license_defaults_to_the_documents_own_fields(tok_dir, tmp_path) -> None:
    src = tmp_path / "mixed.jsonl"
    docs = [{"text": f"document {i} about insulin", "license": "CC0" if i % 3 else "CC-BY-4.0"}
            for i in range(9)] + [{"text": "no license field here"}]  # fmt: skip
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    m = pack([str(src)], tok_dir, tmp_path / "out", source_name="mixed", val_fraction=0.0)
    entry = m["sources"][0]
    assert entry["document_licenses"] == {"CC0": 6, "CC-BY-4.0": 3}
    assert entry["license"] == "CC0; CC-BY-4.0"


def test_empty_val_split_warning_names_the_source(tmp_path, tok_dir, corpus, caplog) -> None:
    out = tmp_path / "one"
    with caplog.at_level("WARNING", logger="kfm.data.pack"):
        pack(corpus[0][:1], tok_dir, out, source_name="tiny_src", val_fraction=0.001)
    [record] = [r for r in caplog.records if "val split is empty" in r.getMessage()]
    assert f"{out} (source tiny_src)" in record.getMessage()
