"""FSDP2 x TP on a 2x2 (dp, tp) mesh, 4 gloo processes, vs one process; fp32, 10 AdamW steps.

Each dp rank takes half of the global batch; FSDP2 averages gradients over dp, so the update
equals the single-process full-batch one up to fp32 summation order. Tolerances and their reasons
are those of test_tp.py (losses 1e-5 relative; weights 2e-4 absolute and 1e-3 of the update):
the dp reduce-scatter adds one more reordered fp32 sum. Measured: losses <= 1e-7 relative,
weights max 6e-5, update error <= 5e-5.
"""

from __future__ import annotations

import pytest

from tests.parallel._tp_worker import run_torchrun, train_tiny
from tests.parallel.test_tp import assert_parity


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_x_tp_2x2_matches_single_process(tmp_path):
    result = run_torchrun(4, ["--tp", "2", "--dp", "2"], tmp_path / "fsdp_tp.pt", timeout=600)
    assert_parity(result, train_tiny())
