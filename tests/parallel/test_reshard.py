"""Checkpoints across topologies: save at W ranks, resume at W' ranks (4 -> 2 and 2 -> 4).

Each resumed run starts from step 5 of an FSDP2 run of 10 steps (the parity runs of
test_fsdp.py, shared through the harness cache) and trains steps 6-10 in a new run directory.
DCP reshards model and optimizer; the loader state is global (samples consumed), so it needs no
resharding, only the new data-parallel rank/size.

Tolerances: losses 1e-5 relative against the uninterrupted single-process run, weights 1e-5
absolute: the same fp32 reduction-order argument as test_fsdp.py (measured <= 2e-7 / 4e-7);
weights 5e-5 when a leg uses tensor parallel (TP_WEIGHT_ATOL below). A
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

# Tensor parallel splits the matmuls, so partial sums are added in another order than in one
# process. Losses still agree to ~1e-7, but a few weight elements differ by up to 1.1e-5 after
# 10 steps (measured, layers.1.attention.wv; presumably elements with near-zero gradients, where
# AdamW's m / (sqrt(v) + eps) magnifies rounding). 5e-5 keeps headroom; a wrong shard or a
# missing reduction moves weights by ~lr = 4e-3.
TP_WEIGHT_ATOL = 5e-5


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


def samples_seen(records: list[dict], world: int, dp_size: int, stream: list[str]) -> list[int]:
    """Global indices of every row in ``records``, each checked against the world-1 stream.

    Each loader call consumes micro * dp_size samples; dp rank r reads slice r. Every rank writes
    one record per call, so the tp ranks of one data-parallel rank write identical copies.
    """
    groups: dict[tuple[int, int], list[list[str]]] = {}
    for rec in records:
        groups.setdefault((rec["start"], rec["dp_rank"]), []).append(rec["rows"])
    seen = []
    for (start, dp_rank), copies in sorted(groups.items()):
        assert len(copies) == world // dp_size, f"tp ranks of dp rank {dp_rank} disagree in count"
        assert all(rows == copies[0] for rows in copies), f"tp ranks of dp rank {dp_rank} differ"
        rows = copies[0]
        assert len(rows) == MICRO_BATCH
        first = start + dp_rank * MICRO_BATCH
        for k, row in enumerate(rows):
            assert first + k < len(stream), (start, dp_rank)
            assert row == stream[first + k], (
                f"dp rank {dp_rank} read a row that is not sample {first + k}"
            )
        seen += range(first, first + MICRO_BATCH)
    ranks_per_start = Counter(start for start, _ in groups)
    assert set(ranks_per_start.values()) == {dp_size}, ranks_per_start
    return seen


def check_resharded(
    sources,
    root,
    first: Run,
    first_mesh: tuple[int, int],
    second: Run,
    second_mesh: tuple[int, int],
):
    """``*_mesh``: (world size, data-parallel size) of each leg."""
    tp = first_mesh[0] // first_mesh[1] > 1 or second_mesh[0] // second_mesh[1] > 1
    ref = reference_run(sources, root)
    assert f"resumed from {first.checkpoint(CKPT_AT)} at step {CKPT_AT}" in second.stdout
    assert_matches_reference(
        second, ref, range(CKPT_AT + 1, STEPS + 1), weight_atol=TP_WEIGHT_ATOL if tp else 1e-5
    )

    total = STEPS * GLOBAL_BATCH
    state = torch.load(second.checkpoint(STEPS) / "trainer_state_rank0.pt", weights_only=False)
    assert state["loader"]["samples_consumed"] == total

    stream = global_stream(sources, root, total)
    boundary = CKPT_AT * GLOBAL_BATCH  # leg 1 also ran past its checkpoint: that part is discarded
    leg1 = [r for r in first.trace() if r["start"] < boundary]
    leg2 = second.trace()
    assert leg2 and min(r["start"] for r in leg2) == boundary
    seen = samples_seen(leg1, *first_mesh, stream) + samples_seen(leg2, *second_mesh, stream)
    counts = Counter(seen)
    assert sorted(counts) == list(range(total)), "gaps in the samples seen"
    assert set(counts.values()) == {1}, "samples seen twice"


@pytest.mark.distributed
def test_save_at_4_ranks_resume_at_2(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    first = fsdp_run(tiny_sources, root, 4)
    second = resumed_run(tiny_sources, root, first, 2, "resume4to2")
    check_resharded(tiny_sources, root, first, (4, 4), second, (2, 2))


@pytest.mark.distributed
def test_save_at_2_ranks_resume_at_4(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    first = fsdp_run(tiny_sources, root, 2)
    second = resumed_run(tiny_sources, root, first, 4, "resume2to4")
    check_resharded(tiny_sources, root, first, (2, 2), second, (4, 4))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_x_tp_reshards_both_ways(tiny_sources, tmp_path_factory):
    """FSDP2 x TP (dp_shard 2 x tp 2) at 4 ranks -> TP 2 at 2 ranks, and TP 2 at 2 ranks ->
    FSDP2 x TP at 4 ranks: DCP moves every tensor between 2-D (dp, tp) and 1-D tp shardings, and
    the loader state between 2 and 1 data-parallel ranks. ~2 min: four more torchrun runs."""
    root = shared_root(tmp_path_factory)
    tp = "--parallel.tp=2"
    fsdp_tp = run_train(tiny_sources, root, "fsdp_tp", nproc=4, args=(*COMMON, tp))
    tp_only = run_train(tiny_sources, root, "tp_only", nproc=2, args=(*COMMON, tp))
    assert "mesh dp_replicate=1 dp_shard=2 tp=2" in fsdp_tp.stdout
    assert "mesh dp_replicate=1 dp_shard=1 tp=2" in tp_only.stdout
    down = run_train(
        tiny_sources,
        root,
        "fsdp_tp_to_tp",
        nproc=2,
        args=(*COMMON, tp, f"--checkpoint.resume={fsdp_tp.checkpoint(CKPT_AT)}"),
    )
    check_resharded(tiny_sources, root, fsdp_tp, (4, 2), down, (2, 1))
    up = run_train(
        tiny_sources,
        root,
        "tp_to_fsdp_tp",
        nproc=4,
        args=(*COMMON, tp, f"--checkpoint.resume={tp_only.checkpoint(CKPT_AT)}"),
    )
    check_resharded(tiny_sources, root, tp_only, (2, 1), up, (4, 2))
