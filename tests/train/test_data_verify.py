"""Start-up data checks (data.verify): spread over the ranks, and any rank's finding stops all."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tests.parallel.harness import train_command


def _corrupt_copy(tiny_sources, tmp_path) -> list[dict]:
    """The tiny sources, copied, with one byte of the first source's train .bin flipped."""
    sources = []
    for s in tiny_sources:
        dst = tmp_path / "shards" / s["name"]
        shutil.copytree(s["path"], dst)
        sources.append({**s, "path": str(dst)})
    bin_file = sorted((tmp_path / "shards" / sources[0]["name"]).glob("train-*.bin"))[0]
    data = bytearray(bin_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a hash can tell
    bin_file.write_bytes(bytes(data))
    return sources


def _train(sources, tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess:
    args = ("--train.steps=1", "--train.micro_batch_size=2", "--eval.interval=0", *extra)
    cmd = train_command(sources, tmp_path / "runs", name, nproc=2, args=args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_spread_verification_stops_every_rank_on_a_corrupt_shard(tiny_sources, tmp_path) -> None:
    sources = _corrupt_copy(tiny_sources, tmp_path)
    spread = _train(sources, tmp_path, "spread")
    assert spread.returncode != 0
    assert "sha256 mismatch" in spread.stderr and "train-00000.bin" in spread.stderr
    # Both ranks raised the same error (the finding was gathered), not one rank and a timeout.
    assert spread.stderr.count("shard verification found 1 problem") >= 2
    # `size` checks only the manifest and file sizes: the flipped byte goes unnoticed.
    assert _train(sources, tmp_path, "size", "--data.verify=size").returncode == 0


@pytest.mark.distributed
def test_spread_verification_reports_each_ranks_share(tiny_sources, tmp_path) -> None:
    ok = _train(tiny_sources, tmp_path, "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    # 2 sources x (train, val) x 1 file = 4 files over 2 ranks; rank 0 logs its share.
    assert "data.verify=spread: verified 2 shard files" in ok.stdout
    assert "4 files" in ok.stdout and "over 2 ranks" in ok.stdout
