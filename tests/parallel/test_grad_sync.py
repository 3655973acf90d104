"""Gradient accumulation without per-micro-batch communication (parallel.grad_sync=last).

At 2 ranks with micro-batch 2, each step accumulates 2 micro-batches per rank. With sync on the
last micro-batch only, FSDP2 reduce-scatters once per FSDP unit per step instead of once per unit
per micro-batch: the model has 3 units (2 blocks + the root), so 3 reduce-scatters are saved per
step. Counted from the torch.profiler trace of step 3 (health.profile_steps); the losses agree
with syncing every micro-batch up to the order of floating-point sums.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.parallel.harness import fsdp_run, relative_error, shared_root

PROFILE = "--health.profile_steps=[3, 3]"


def _collectives(run) -> Counter:
    trace = json.loads((run.run_dir / "profile" / "trace_rank0.json").read_text())
    return Counter(
        e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("c10d::")
    )


@pytest.mark.distributed
def test_sync_on_last_micro_batch_matches_every_and_saves_reduce_scatters(
    tiny_sources, tmp_path_factory
) -> None:
    root = shared_root(tmp_path_factory)
    last = fsdp_run(tiny_sources, root, 2, PROFILE)
    every = fsdp_run(tiny_sources, root, 2, PROFILE, "--parallel.grad_sync=every")
    a, b = last.losses(), every.losses()
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert max(relative_error(a[s], b[s]) for s in a) < 1e-6
    n_last = _collectives(last)["c10d::_reduce_scatter_base_"]
    n_every = _collectives(every)["c10d::_reduce_scatter_base_"]
    assert (n_last, n_every) == (3, 6)  # per step: one per unit, vs one per unit per micro-batch
    assert "3 reduce-scatters per step saved" in last.stdout
