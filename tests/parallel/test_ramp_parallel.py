"""Batch-size ramp-up on 2 gloo ranks against one process (tests/train/test_ramp.py's RAMP run):
the same losses and weights (tolerances of test_fsdp.py: fp32 reduction order only), the same
global samples at every step, and a 1-process checkpoint in the middle of the ramp resumed on 2
ranks continuing the same sample stream.

With a ramp from 4 to 16 (micro-batch 2) one process accumulates 2, 2, 4, 4, 6, 6, 8... micro-
batches and each of 2 ranks 1, 1, 2, 2, 3, 3, 4...: a rank that ran the full accumulation, or
divided by it, would read other samples (the trace) and move the losses by far more than 1e-5.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import pytest
import torch

from kfm.config import load_config
from kfm.train.ramp import samples_through
from tests.conftest import REPO
from tests.parallel.harness import Run, run_train, shared_root, train_command
from tests.parallel.test_fsdp import assert_matches_reference
from tests.parallel.test_reshard import global_stream, samples_seen
from tests.train.test_ramp import CKPT_AT, RAMP, STEPS, ramp_run

TRAIN = load_config(REPO / "configs" / "tiny.yaml", list(RAMP)).train


def loader_samples(run: Run, step: int) -> int:
    state = torch.load(run.checkpoint(step) / "trainer_state_rank0.pt", weights_only=False)
    return state["loader"]["samples_consumed"]


@pytest.mark.distributed
def test_two_ranks_with_a_ramp_match_one_process(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    ref = ramp_run(tiny_sources, root)
    run = run_train(tiny_sources, root, "ramp_fsdp2", nproc=2, args=RAMP)
    assert "batch ramp: 4 -> 16 sequences" in run.stdout
    assert_matches_reference(run, ref, range(1, STEPS + 1))
    assert [r["batch_size"] for r in run.records() if "loss" in r] == [
        r["batch_size"] for r in ref.records() if "loss" in r
    ]
    for step in (CKPT_AT, STEPS):
        assert (
            loader_samples(run, step) == loader_samples(ref, step) == samples_through(step, TRAIN)
        )
    total = samples_through(STEPS, TRAIN)
    stream = global_stream(tiny_sources, root, total)
    seen = samples_seen(run.trace(), 2, 2, stream)  # each row checked against the 1-rank stream
    assert sorted(seen) == list(range(total)) and len(set(seen)) == total


@pytest.mark.distributed
def test_one_process_checkpoint_mid_ramp_resumes_on_two_ranks(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    ref = ramp_run(tiny_sources, root)
    ckpt = ref.checkpoint(CKPT_AT)
    run = run_train(
        tiny_sources, root, "ramp_1to2", nproc=2, args=(*RAMP, f"--checkpoint.resume={ckpt}")
    )
    assert f"resumed from {ckpt} at step {CKPT_AT}" in run.stdout
    assert_matches_reference(run, ref, range(CKPT_AT + 1, STEPS + 1))
    total, boundary = samples_through(STEPS, TRAIN), samples_through(CKPT_AT, TRAIN)
    assert loader_samples(run, STEPS) == total
    stream = global_stream(tiny_sources, root, total)
    before = [r for r in ref.trace() if r["start"] < boundary]  # the first leg, up to its save
    seen = samples_seen(before, 1, 1, stream) + samples_seen(run.trace(), 2, 2, stream)
    counts = Counter(seen)
    assert sorted(counts) == list(range(total)), "gaps in the samples seen"
    assert set(counts.values()) == {1}, "samples seen twice"
    assert min(r["start"] for r in run.trace()) == boundary


@pytest.mark.distributed
def test_a_start_that_two_ranks_cannot_split_is_a_config_error(tiny_sources, tmp_path):
    """batch_ramp_start=2 with micro-batch 2 passes the config check (one process could run
    it) but not on 2 data-parallel ranks: the backend refuses before training."""
    args = (*RAMP, "--train.batch_ramp_start=2")
    cmd = train_command(tiny_sources, tmp_path, "split", nproc=2, args=args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "train.batch_ramp_start=2 must be a multiple of train.micro_batch_size * data-parallel "
        "size = 2 * 2 = 4" in proc.stderr
    )
    assert not (tmp_path / "split" / "metrics.jsonl").exists()
