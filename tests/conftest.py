"""Shared fixtures: a committed tiny tokenizer and small shard sets packed from data/sample."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
TOKENIZER = ASSETS / "tokenizer"
SAMPLE = REPO / "data" / "sample"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite tests/assets/golden_tiny.json from the current code (deliberate numerics change)",
    )


def slice_jsonl(src: Path, dst: Path, n_docs: int) -> Path:
    """The first ``n_docs`` documents of a sample file, as plain JSONL."""
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == n_docs:
                break
            out.write(json.dumps(json.loads(line), ensure_ascii=False) + "\n")
    return dst


def pack_tiny_sources(out_root: Path) -> list[dict]:
    """Pack slices of an English and a Korean sample file with the committed test tokenizer.

    Returns data.sources entries. Deterministic: the golden-loss file depends on it.
    """
    from kfm.data.pack import pack

    sources = []
    for name, n_docs, weight in (("medquad", 120, 2.0), ("ko_chatbot", 60, 1.0)):
        text = slice_jsonl(SAMPLE / f"{name}.jsonl.gz", out_root / f"{name}.jsonl", n_docs)
        out = out_root / "shards" / name
        pack([str(text)], str(TOKENIZER), str(out), source_name=name, val_fraction=0.1)
        sources.append({"name": name, "path": str(out), "weight": weight})
    return sources


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> list[dict]:
    return pack_tiny_sources(tmp_path_factory.mktemp("tiny_data"))


def tiny_overrides(sources: list[dict], run_root: Path, name: str) -> list[str]:
    """CLI overrides that point configs/tiny.yaml at packed test data and a temp run root."""
    flow = (
        "["
        + ", ".join(
            f"{{name: {s['name']}, path: '{s['path']}', weight: {s['weight']}}}" for s in sources
        )
        + "]"
    )
    return [
        f"--data.sources={flow}",
        f"--tokenizer.path={TOKENIZER}",
        f"--train.run_root={run_root}",
        f"--train.name={name}",
    ]
