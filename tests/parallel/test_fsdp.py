"""FSDP2 and HSDP on real gloo processes (torchrun) against one plain process, same global batch.

Tolerance, everywhere here: fp32, so the runs differ only in the order floating-point sums are
taken (gradients averaged by reduce-scatter / all-reduce across ranks instead of accumulated
over micro-batches in one process), about one ulp (6e-8 relative) per reduction. Over 10 AdamW
steps that shows up as <= 2e-7 relative in the losses and <= 4e-7 absolute in the weights
(measured). Bounds: losses 1e-5 relative (the issue's bar), weights 1e-5 absolute (weights are
~0.02; one step of a wrong gradient moves them by ~lr = 4e-3). A real bug -- a rank reading the
wrong batch, gradients summed instead of averaged, a missing sync -- moves losses by > 1e-3.
"""

from __future__ import annotations

import pytest

from kfm.checkpoint import load_model_state
from kfm.config import ConfigError, ParallelConfig
from kfm.parallel import mesh_shape
from tests.parallel.harness import (
    STEPS,
    Run,
    fsdp_run,
    reference_run,
    relative_error,
    shared_root,
)

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def assert_matches_reference(run: Run, ref: Run, steps: range) -> None:
    got, want = run.losses(), ref.losses()
    assert sorted(got) == list(steps), got
    errors = {s: relative_error(got[s], want[s]) for s in steps}
    assert max(errors.values()) < LOSS_RTOL, errors
    a, _ = load_model_state(run.checkpoint(STEPS))
    b, _ = load_model_state(ref.checkpoint(STEPS))
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < WEIGHT_ATOL, diffs


@pytest.mark.distributed
def test_fsdp2_two_ranks_matches_single_process(tiny_sources, tmp_path_factory):
    """2 ranks x 2 micro-batches of 2 == 1 process x 4 micro-batches of 2: losses, validation
    (which every rank runs: the FSDP forward is collective) and final weights."""
    root = shared_root(tmp_path_factory)
    ref, run = reference_run(tiny_sources, root), fsdp_run(tiny_sources, root, 2)
    assert_matches_reference(run, ref, range(1, STEPS + 1))
    assert "mesh dp_replicate=1 dp_shard=2 tp=1; 2 micro-batches" in run.stdout
    val, ref_val = run.val_losses(), ref.val_losses()
    assert sorted(val) == sorted(ref_val) == [0, STEPS]
    assert all(relative_error(val[s], ref_val[s]) < LOSS_RTOL for s in val)
    # Only rank 0 logs: one line per step in metrics.jsonl, not one per rank.
    assert [r["step"] for r in run.records() if "loss" in r] == list(range(1, STEPS + 1))


@pytest.mark.distributed
def test_fsdp2_four_ranks_matches_single_process(tiny_sources, tmp_path_factory):
    """4 ranks x 1 micro-batch of 2 (no accumulation). This run is also the 4 -> 2 resharding
    test's first leg, so it costs the suite nothing extra."""
    root = shared_root(tmp_path_factory)
    run = fsdp_run(tiny_sources, root, 4)
    assert "mesh dp_replicate=1 dp_shard=4 tp=1; 1 micro-batches" in run.stdout
    assert_matches_reference(run, reference_run(tiny_sources, root), range(1, STEPS + 1))


@pytest.mark.distributed
def test_hsdp_2x2_matches_single_process(tiny_sources, tmp_path_factory):
    """HSDP: shard over 2 ranks, replicate over 2 (2-D FSDP2 mesh: reduce-scatter within a shard
    group, all-reduce across replicas); the loader sees 4 data-parallel ranks."""
    root = shared_root(tmp_path_factory)
    run = fsdp_run(tiny_sources, root, 4, "--parallel.dp_replicate=2")
    assert "mesh dp_replicate=2 dp_shard=2 tp=1" in run.stdout
    assert_matches_reference(run, reference_run(tiny_sources, root), range(1, STEPS + 1))


@pytest.mark.parametrize(
    ("sizes", "world", "want"),
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((4, -1, 2), 256, (4, 32, 2)),
        ((-1, 8, 1), 256, (32, 8, 1)),
        ((2, 2, -1), 8, (2, 2, 2)),
        ((2, 2, 2), 8, (2, 2, 2)),
    ],
)
def test_mesh_shape_resolves_the_rest(sizes, world, want):
    cfg = ParallelConfig(dp_replicate=sizes[0], dp_shard=sizes[1], tp=sizes[2])
    assert mesh_shape(cfg, world) == want


@pytest.mark.parametrize(
    ("sizes", "world", "message"),
    [
        ((-1, -1, 1), 8, "at most one mesh size may be -1"),
        ((1, -1, 3), 8, "not divisible by parallel.dp_replicate=1 * parallel.tp=3"),
        ((2, 2, 1), 8, "= 4 but the world size is 8"),
        ((1, 0, 1), 8, "parallel.dp_shard=0 must be >= 1 or -1"),
    ],
)
def test_mesh_shape_errors_name_the_flags(sizes, world, message):
    cfg = ParallelConfig(dp_replicate=sizes[0], dp_shard=sizes[1], tp=sizes[2])
    with pytest.raises(ConfigError, match="--parallel|parallel\\.") as info:
        mesh_shape(cfg, world)
    assert message in str(info.value)
