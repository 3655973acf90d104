"""Shared fixtures: a slice of the bundled sample and a small tokenizer trained on it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parents[2] / "data" / "sample"


def sample_docs(name: str, n: int, *, skip: int = 0) -> list[str]:
    """Texts of documents skip..skip+n of data/sample/NAME.jsonl.gz (read without kfm code)."""
    out = []
    with gzip.open(SAMPLE / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= skip + n:
                break
            if i >= skip:
                out.append(json.loads(line)["text"])
    return out


@pytest.fixture(scope="session")
def train_texts() -> list[str]:
    # ~350 K characters, half Korean: enough for 1000 merges in a couple of seconds.
    return (
        sample_docs("ko_chatbot", 80)
        + sample_docs("kornlu", 80)
        + sample_docs("klue", 40)
        + sample_docs("medquad", 120)
        + sample_docs("craft", 1)
    )


@pytest.fixture(scope="session")
def heldout_texts() -> list[str]:
    """Documents not in train_texts, Korean and English."""
    return sample_docs("kornlu", 5, skip=500) + sample_docs("medquad", 5, skip=500)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, train_texts: list[str]) -> Path:
    from kfm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(train_texts, out, vocab_size=1000, n_reserved=16)
