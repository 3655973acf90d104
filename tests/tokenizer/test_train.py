"""Tokenizer training: determinism, atomic output, errors, and train_from_files' report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kfm.fs import OutputError
from kfm.tokenizer import lang_of, load_tokenizer, train_from_files, train_tokenizer

from .conftest import sample_docs


def _small_texts() -> list[str]:
    return sample_docs("ko_chatbot", 20) + sample_docs("medquad", 30)


def test_training_is_deterministic(tmp_path: Path) -> None:
    texts = _small_texts()
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=600, n_reserved=4)
    b = train_tokenizer(iter(texts), tmp_path / "b", vocab_size=600, n_reserved=4)
    for name in ("tokenizer.json", "tokenizer_config.json", "kfm_tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = train_tokenizer(texts, tmp_path / "c", vocab_size=650, n_reserved=4)
    assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()


def test_metadata_and_heldout_fertility(tmp_path: Path) -> None:
    texts = _small_texts()
    held = sample_docs("klue", 3, skip=100) + sample_docs("medquad", 3, skip=300)
    out = train_tokenizer(texts, tmp_path / "t", vocab_size=600, n_reserved=4, heldout_texts=held)
    meta = json.loads((out / "kfm_tokenizer.json").read_text())
    assert meta["vocab_size"] == 600 and meta["n_reserved"] == 4
    assert meta["train_chars"] == sum(len(t) for t in texts)
    assert meta["train_docs"] == len(texts)
    assert meta["special_tokens"][:2] == ["<|bos|>", "<|eos|>"]
    assert meta["heldout_docs"] == {"ko": 3, "en": 3}
    assert meta["fertility"]["ko"] > 0.5 and meta["fertility"]["en"] > 1.5
    assert meta["tokenizer_hash"] and len(meta["tokenizer_hash"]) == 64


def test_existing_dir_needs_overwrite(tmp_path: Path) -> None:
    texts = _small_texts()
    out = train_tokenizer(texts, tmp_path / "t", vocab_size=500, n_reserved=0)
    before = (out / "tokenizer.json").read_bytes()
    with pytest.raises(OutputError, match="already holds a kfm tokenizer; pass --overwrite"):
        train_tokenizer(texts, out, vocab_size=600, n_reserved=0)
    assert (out / "tokenizer.json").read_bytes() == before
    train_tokenizer(texts, out, vocab_size=600, n_reserved=0, overwrite=True)
    assert len(load_tokenizer(out)) == 600
    # No temp or old directories left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=300, n_reserved=64)
    assert not (tmp_path / "t").exists()


def _write_jsonl_gz(path: Path, texts: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "body": t}, ensure_ascii=False) + "\n")


def test_train_from_files_report(tmp_path: Path) -> None:
    ko = sample_docs("ko_chatbot", 60) + sample_docs("kornlu", 60)
    en = sample_docs("medquad", 120)
    _write_jsonl_gz(tmp_path / "ko.jsonl.gz", ko)
    _write_jsonl_gz(tmp_path / "en.jsonl.gz", en)
    inputs = [str(tmp_path / "ko.jsonl.gz"), str(tmp_path / "en.jsonl.gz")]
    report = train_from_files(
        inputs, tmp_path / "tok", vocab_size=800, n_reserved=8, text_field="body"
    )
    docs = ko + en
    held = [t for i, t in enumerate(docs, start=1) if i % 50 == 0]
    trained = [t for i, t in enumerate(docs, start=1) if i % 50 != 0]
    assert report["train_chars"] == sum(len(t) for t in trained)
    assert report["train_docs"] == len(trained)
    assert report["heldout_docs"] == {
        "ko": sum(lang_of(t) == "ko" for t in held),
        "en": sum(lang_of(t) == "en" for t in held),
    }
    assert report["heldout_docs"]["ko"] > 0 and report["heldout_docs"]["en"] > 0
    assert set(report["fertility"]) == {"ko", "en"}
    assert all(isinstance(v, float) and v > 0.5 for v in report["fertility"].values())
    assert report["vocab_size"] == 800
    meta = json.loads((tmp_path / "tok" / "kfm_tokenizer.json").read_text())
    assert meta == {k: v for k, v in report.items() if k != "path"}


def test_train_from_files_max_chars(tmp_path: Path) -> None:
    en = sample_docs("medquad", 60)
    _write_jsonl_gz(tmp_path / "en.jsonl.gz", en)
    report = train_from_files(
        [str(tmp_path / "en.jsonl.gz")], tmp_path / "tok", vocab_size=500, n_reserved=0,
        text_field="body", max_chars=20_000,
    )  # fmt: skip
    assert 20_000 <= report["train_chars"] < 20_000 + max(len(t) for t in en)


def test_train_from_files_errors(tmp_path: Path) -> None:
    from kfm.data.readers import ReaderError

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train_from_files([str(tmp_path / "nope.jsonl")], tmp_path / "tok", vocab_size=500)
    _write_jsonl_gz(tmp_path / "x.jsonl.gz", ["some text"])
    with pytest.raises(ReaderError, match="--text-field"):
        train_from_files([str(tmp_path / "x.jsonl.gz")], tmp_path / "tok", vocab_size=500)
    assert not (tmp_path / "tok").exists()
