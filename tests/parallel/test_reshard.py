"""Checkpoints across topologies: save at W ranks, resume at W' ranks (4 -> 2 and 2 -> 4).

Each resumed run starts from step 5 of an FSDP2 run of 10 steps (the parity runs of
test_fsdp.py, shared through the harness cache) and trains steps 6-10 in a new run directory.
DCP reshards model and optimizer; the loader state is global (samples consumed), so it needs no
resharding, only the new data-parallel rank/size.

Tolerances: losses 1e-5 relative against the uninterrupted single-process run, weights 1e-5
absolute: the same fp32 reduction-order argument as test_fsdp.py (measured <= 2e-7 / 4e-7). A
resume that lost optimizer moments or the scheduler position, or replayed or skipped a batch,
moves the step-6 loss by > 1e-3.

Samples: no tolerance. Every rank writes each micro-batch it consumed (its first global sample
index and a hash of each row; KFM_TRACE_BATCHES) and the test rebuilds the global stream in one
process with PackedLoader at world size 1 to check row for row which sample each rank trained on,
and that over the run (leg 1 up to its checkpoint + leg 2) every sample 0 .. 10 * 8 - 1 was seen
exactly once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from kfm.config import load_config
from kfm.data import PackedLoader
from tests.conftest import REPO, tiny_overrides
from tests.parallel.harness import (
    CKPT_AT,
    COMMON,
    GLOBAL_BATCH,
    MICRO_BATCH,
    STEPS,
    Run,
    fsdp_run,
    reference_run,
    run_train,
    shared_root,
)
from tests.parallel.test_fsdp import assert_matches_reference


def resumed_run(sources: list[dict], root: Path, first: Run, nproc: int, name: str) -> Run:
    ckpt = first.checkpoint(CKPT_AT)
    return run_train(
        sources, root, name, nproc=nproc, args=(*COMMON, f"--checkpoint.resume={ckpt}")
    )


def global_stream(sources: list[dict], root: Path, n: int) -> list[str]:
    """Row hashes of global samples 0 .. n-1, from one loader at world size 1 built from the
    runs' resolved config (same sources, seq_len and data.seed)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(sources, root, "stream"))
    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=1,
        seed=cfg.data.seed,
        verify="size",
    )
    return [
        hashlib.sha1(loader.next_batch().tokens[0].numpy().tobytes()).hexdigest()[:16]
        for _ in range(n)
    ]


def samples_seen(records: list[dict], dp_size: int, stream: list[str]) -> list[int]:
    """Global indices of every row in ``records``, each checked against the world-1 stream."""
    seen = []
    for rec in records:
        assert len(rec["rows"]) == MICRO_BATCH, rec
        first = rec["start"] + rec["dp_rank"] * MICRO_BATCH  # rank r reads slice r of the call
        for k, row in enumerate(rec["rows"]):
            index = first + k
            assert index < len(stream), rec
            assert row == stream[index], (
                f"dp rank {rec['dp_rank']} read a row that is not sample {index}"
            )
        seen += range(first, first + MICRO_BATCH)
    # Every call consumes micro * dp_size samples; each must be claimed by exactly one rank.
    starts = Counter(rec["start"] for rec in records)
    assert set(starts.values()) == {dp_size}, starts
    return seen


def check_resharded(sources, root, first: Run, first_dp: int, second: Run, second_dp: int):
    ref = reference_run(sources, root)
    assert f"resumed from {first.checkpoint(CKPT_AT)} at step {CKPT_AT}" in second.stdout
    assert_matches_reference(second, ref, range(CKPT_AT + 1, STEPS + 1))

    total = STEPS * GLOBAL_BATCH
    state = torch.load(second.checkpoint(STEPS) / "trainer_state_rank0.pt", weights_only=False)
    assert state["loader"]["samples_consumed"] == total

    stream = global_stream(sources, root, total)
    boundary = CKPT_AT * GLOBAL_BATCH  # leg 1 also ran past its checkpoint: that part is discarded
    leg1 = [r for r in first.trace() if r["start"] < boundary]
    leg2 = second.trace()
    assert leg2 and min(r["start"] for r in leg2) == boundary
    seen = samples_seen(leg1, first_dp, stream) + samples_seen(leg2, second_dp, stream)
    counts = Counter(seen)
    assert sorted(counts) == list(range(total)), "gaps in the samples seen"
    assert set(counts.values()) == {1}, "samples seen twice"


@pytest.mark.distributed
def test_save_at_4_ranks_resume_at_2(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    first = fsdp_run(tiny_sources, root, 4)
    second = resumed_run(tiny_sources, root, first, 2, "resume4to2")
    check_resharded(tiny_sources, root, first, 4, second, 2)


@pytest.mark.distributed
def test_save_at_2_ranks_resume_at_4(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    first = fsdp_run(tiny_sources, root, 2)
    second = resumed_run(tiny_sources, root, first, 4, "resume2to4")
    check_resharded(tiny_sources, root, first, 2, second, 4)
