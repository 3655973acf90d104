"""Golden losses: the first 20 steps of configs/tiny.yaml against tests/assets/golden_tiny.json.

Tolerance: relative 1e-5 per step. The run is fp32 and deterministic on one machine (bitwise, see
test_resume), but CPUs of different makes pick different SIMD kernels (AVX2 vs AVX-512, oneDNN vs
OpenBLAS paths) whose last-bit differences grow over 20 optimizer steps to ~1e-6 relative; any real
change in numerics (init, masking, loss, optimizer, schedule, data order) moves losses by >1e-3.
Regenerate deliberately, after a change that is meant to alter numerics:
    python -m pytest tests/train/test_golden.py --regen-golden
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

from kfm.config import load_config
from kfm.train.trainer import train
from tests.conftest import ASSETS, REPO, tiny_overrides

GOLDEN = ASSETS / "golden_tiny.json"
RTOL = 1e-5


def test_golden_losses(tiny_sources, tmp_path, request):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        tiny_overrides(tiny_sources, tmp_path, "golden") + ["--eval.interval=0"],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order must not depend on the machine's core count
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "golden" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == cfg.train.steps == 20
    if request.config.getoption("--regen-golden"):
        GOLDEN.write_text(
            json.dumps(
                {
                    "config": "configs/tiny.yaml",
                    "steps": len(losses),
                    "losses": losses,
                    "machine": platform.machine(),
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        pytest.skip(f"rewrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["losses"]
    for step, (got, want) in enumerate(zip(losses, golden, strict=True), start=1):
        assert got == pytest.approx(want, rel=RTOL), f"step {step}: loss {got} != golden {want}"
    assert losses[-1] < losses[0] - 0.5  # and it is learning
