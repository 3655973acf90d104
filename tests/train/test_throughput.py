"""Throughput figures as the loop logs them, checked against a hand computation at 2 and 4 ranks.

configs/tiny.yaml: vocab 1024, d_model 64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU width
8/3 * 64 rounded up to 64 = 192, seq_len 64, global batch 8 sequences = 512 tokens per step.
Training FLOPs per token = 6 * matmul weights + 12 * layers * heads * head_dim * seq_len:
  per layer: wq, wo 64*64 each; wk, wv 64*32 each; w1, w2, w3 64*192 each = 49,152
  2 layers + output 1024*64 = 98,304 + 65,536 = 163,840 weights -> 6 * 163,840 = 983,040
  attention scores: 12 * 2 * 4 * 16 * 64 = 98,304
  total 1,081,344 FLOPs per token.
On CPU the peak is the nominal 1 TFLOP/s per process (kfm.model.flops.CPU_NOMINAL_TFLOPS).
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import fsdp_run, run_train, shared_root

TOKENS_PER_STEP = 8 * 64
FLOPS_PER_TOKEN = 1_081_344
CPU_PEAK = 1e12


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_throughput_per_device_and_mfu(tiny_sources, tmp_path_factory, world) -> None:
    run = fsdp_run(tiny_sources, shared_root(tmp_path_factory), world)
    steps = [r for r in run.records() if "tokens_per_s_global" in r]
    assert len(steps) == 10  # logging.interval 1 in configs/tiny.yaml
    for r in steps:
        tokens_global = TOKENS_PER_STEP / r["step_time_s"]
        assert r["tokens_per_s_global"] == pytest.approx(tokens_global, rel=1e-9)
        # Per device: every device's share of the global work (not one rank's tokens x world).
        assert r["tokens_per_s_per_device"] == pytest.approx(tokens_global / world, rel=1e-9)
        tflops = tokens_global / world * FLOPS_PER_TOKEN / 1e12
        assert r["tflops_per_device"] == pytest.approx(tflops, rel=1e-9)
        assert r["mfu"] == pytest.approx(tflops * 1e12 / CPU_PEAK, rel=1e-9)


@pytest.mark.distributed
def test_peak_override_scales_mfu(tiny_sources, tmp_path_factory) -> None:
    run = fsdp_run(tiny_sources, shared_root(tmp_path_factory), 2, "--train.peak_tflops=0.25")
    for r in (r for r in run.records() if "mfu" in r):
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.25, rel=1e-9)


def test_train_seconds_leave_out_evaluation_and_checkpoints(tiny_sources, tmp_path_factory) -> None:
    # An evaluation and a checkpoint after every step: step_time_s (wall time between log
    # lines) includes them, train_s (what benchmarks/time_to_target.py counts) must not.
    run = run_train(
        tiny_sources,
        shared_root(tmp_path_factory),
        "train-seconds",
        nproc=0,
        args=(
            "--train.steps=6",
            "--eval.interval=1",
            "--eval.batches=4",
            "--checkpoint.interval=1",
        ),
    )
    records = run.records()
    steps = [r for r in records if "train_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    train_s = [r["train_s"] for r in steps]
    assert all(b > a > 0 for a, b in zip(train_s, train_s[1:], strict=False))
    wall = sum(r["step_time_s"] for r in steps)
    val = sum(r["val_time_s"] for r in records if "val_time_s" in r and r["step"] < 6)
    assert val > 0
    assert wall - train_s[-1] >= val
