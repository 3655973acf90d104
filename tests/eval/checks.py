"""Helpers for the tokenizer-identity tests of `kfm eval` (tests/eval) and `kfm export`
(tests/export): one tiny trained run per session, and tokenizers and shards that are not its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import SAMPLE, TOKENIZER, slice_jsonl
from tests.parallel.harness import Run, run_train, shared_root

RUN_ARGS = ("--train.steps=2", "--checkpoint.interval=2", "--eval.interval=0")
STEP = "step_000002"


def tiny_run(tiny_sources: list[dict], tmp_path_factory) -> Run:
    """configs/tiny.yaml trained 2 steps (one checkpoint), started once per test session."""
    return run_train(
        tiny_sources, shared_root(tmp_path_factory), "tokcheck", nproc=0, args=RUN_ARGS
    )


def copied_tokenizer(dst: Path) -> Path:
    """A byte-identical copy of the test tokenizer elsewhere: the same tokenizer."""
    shutil.copytree(TOKENIZER, dst)
    return dst


def swapped_tokenizer(dst: Path) -> Path:
    """The test tokenizer with two ordinary tokens' ids swapped: same size, same specials, loads
    and encodes fine, but maps text to other ids than the model was trained on."""
    shutil.copytree(TOKENIZER, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


def packed_with(tokenizer: Path, out: Path) -> Path:
    """A small shard set (medquad slice, 10% val) packed with ``tokenizer``."""
    from kfm.data.pack import pack

    out.parent.mkdir(parents=True, exist_ok=True)
    text = slice_jsonl(SAMPLE / "medquad.jsonl.gz", out.parent / f"{out.name}.jsonl", 120)
    pack([str(text)], str(tokenizer), str(out), source_name="medquad", val_fraction=0.1)
    return out


def unrecorded_copy(run_dir: Path, dst: Path, *, sources_gone: bool) -> Path:
    """A copy of ``run_dir`` whose checkpoint manifest has no tokenizer_hash (as older kfm wrote
    them); with ``sources_gone`` its config's data.sources point at shard sets that do not exist.
    Returns the copy's step dir."""
    shutil.copytree(run_dir, dst, symlinks=True)
    manifest_path = dst / "checkpoints" / STEP / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest.pop("tokenizer_hash"), "this kfm records tokenizer_hash in checkpoints"
    if sources_gone:
        for i, source in enumerate(manifest["config"]["data"]["sources"]):
            source["path"] = str(dst / "gone" / f"source{i}")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest_path.parent


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (empty if ``root`` does not exist)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def larger_tokenizer(dst: Path, extra: int = 1) -> Path:
    """The test tokenizer with ``extra`` more special tokens: one id past model.vocab_size."""
    shutil.copytree(TOKENIZER, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    next_id = max(t["id"] for t in data["added_tokens"]) + 1
    next_id = max(next_id, max(data["model"]["vocab"].values()) + 1)
    for i in range(extra):
        token = dict(data["added_tokens"][-1], id=next_id + i, content=f"<|extra_{i}|>")
        data["added_tokens"].append(token)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst
