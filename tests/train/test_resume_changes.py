"""Resume is explicit about changes: every config difference from the checkpoint is listed; the
schedule and optimizer follow the new config from the resume step; changes that cannot apply
(model, data order, changed shards) are refused unless ``--checkpoint.force_resume``; a run
already at ``train.steps`` says there is nothing to do.

Runs train in this process (`kfm.train.trainer.train`), 1 thread, on configs/tiny.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import read_manifest
from kfm.config import load_config
from kfm.tokenizer import tokenizer_hash
from kfm.train.resume import shard_set_fingerprint
from kfm.train.trainer import train
from tests.conftest import REPO, TOKENIZER, tiny_overrides

STEPS, CKPT_AT = 12, 6


def run(sources: list[dict], root: Path, name: str, *extra: str) -> dict:
    """Train configs/tiny.yaml as run ``name`` (checkpoint every CKPT_AT steps, no eval)."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *tiny_overrides(sources, root, name),
            f"--train.steps={STEPS}",
            f"--checkpoint.interval={CKPT_AT}",
            "--eval.interval=0",
            *extra,
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_sources, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps (checkpoints at CKPT_AT and STEPS)."""
    root = tmp_path_factory.mktemp("resume_changes")
    run(tiny_sources, root, "straight")
    return root / "straight"


def test_checkpoint_manifest_records_tokenizer_and_data(straight, tiny_sources) -> None:
    manifest = read_manifest(straight / "checkpoints" / f"step_{CKPT_AT:06d}")
    assert manifest["tokenizer_hash"] == tokenizer_hash(TOKENIZER)
    assert manifest["data_fingerprint"] == {
        s["name"]: shard_set_fingerprint(s["path"]) for s in tiny_sources
    }
    assert len(set(manifest["data_fingerprint"].values())) == len(tiny_sources)
