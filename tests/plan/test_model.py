"""The step-time model's bookkeeping: components add up, the MFU is the loop's, and each
mechanism (AC recompute, fp8, TP placement, FSDP overlap) moves the prediction the stated way."""

from __future__ import annotations

import dataclasses

import pytest

from kfm.config import load_config
from kfm.plan.hardware import GPUS
from kfm.plan.model import Allocation, group_bandwidth, predict
from kfm.train.callbacks import Throughput
from tests.conftest import REPO

B200 = GPUS["b200"]
POD = Allocation(gpu=B200, nodes=32, gpus_per_node=8)


def _cfg(name: str = "b200_8b", *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


def test_step_adds_up_and_mfu_is_the_loops():
    cfg = _cfg()
    p = predict(cfg, POD)
    assert p.mesh == (32, 8, 1) and p.grad_accum == 2
    assert p.step_s == pytest.approx(sum(p.compute.values()) + sum(p.exposed_comm.values()))
    assert p.tokens_per_s == pytest.approx(512 * 8192 / p.step_s)
    # the loop computes MFU with kfm.train.callbacks.Throughput: same FLOPs, same peak
    loop = Throughput(
        tokens_per_step=p.tokens_per_step,
        flops_per_token=p.flops_per_token,
        world_size=256,
        peak_flops_per_device=B200.peak_flops["bf16"],
    ).figures(steps=10, seconds=10 * p.step_s)
    assert loop["mfu"] == pytest.approx(p.mfu)
    assert loop["tokens_per_s_per_device"] == pytest.approx(p.tokens_per_s_per_gpu)
    assert p.days_for(p.tokens_per_day * 3) == pytest.approx(3.0)
    assert 0.2 < p.mfu < 0.8  # a plausible dense figure, not a constant


def test_full_ac_recomputes_one_forward():
    base = predict(_cfg(), POD)
    full = predict(_cfg("b200_8b", "--parallel.ac=full"), POD)
    op = predict(_cfg("b200_8b", "--parallel.ac=full", "--parallel.ac_policy=op"), POD)
    assert base.compute["recompute (AC)"] == 0
    # block forward GEMMs are a third of the block GEMMs (forward + 2 backward)
    assert full.compute["recompute (AC)"] > full.compute["gemm"] / 3 * 0.9
    assert 0 < op.compute["recompute (AC)"] < full.compute["recompute (AC)"] / 5
    assert full.step_s > op.step_s > base.step_s


def test_fp8_halves_gemm_time_and_adds_casts():
    bf16 = predict(_cfg(), POD)
    fp8 = predict(_cfg("b200_8b", "--parallel.fp8=tensorwise"), POD)
    assert fp8.compute["gemm"] < 0.6 * bf16.compute["gemm"]  # the output projection stays bf16
    assert fp8.compute["fp8 casts"] > 0 == bf16.compute["fp8 casts"]
    assert fp8.peak_flops == B200.peak_flops["fp8"]  # the loop's MFU uses the fp8 peak
    with pytest.raises(ValueError, match="fp8"):
        predict(
            _cfg("b200_8b", "--parallel.fp8=tensorwise"), dataclasses.replace(POD, gpu=GPUS["a100"])
        )


def test_group_bandwidth_by_placement():
    # inside a node: NVLink; a group with one rank per node: one NIC; 8 ranks per node: 8 NICs
    assert group_bandwidth(B200, size=8, stride=1) == B200.nvlink_bandwidth
    assert group_bandwidth(B200, size=32, stride=8) == B200.network_bandwidth
    assert group_bandwidth(B200, size=256, stride=1) == min(
        B200.nvlink_bandwidth, 8 * B200.network_bandwidth
    )
    gb200 = GPUS["gb200"]  # an NVL72 rack is one NVLink domain
    assert group_bandwidth(gb200, size=64, stride=1) == gb200.nvlink_bandwidth


def test_tp_across_nodes_is_slower_and_says_so():
    inside = predict(_cfg("b200_8b", "--parallel.dp_replicate=32", "--parallel.dp_shard=4",
                          "--parallel.tp=2"), POD)  # fmt: skip
    across = predict(_cfg("b200_8b", "--parallel.dp_replicate=16", "--parallel.dp_shard=1",
                          "--parallel.tp=16", "--train.global_batch_size=512",
                          "--train.micro_batch_size=16"), POD)  # fmt: skip
    assert inside.exposed_comm["TP"] > 0 and not inside.notes
    assert any("NVLink domain" in n for n in across.notes)
    assert across.comm["TP collectives"] / across.tokens_per_step > (
        inside.comm["TP collectives"] / inside.tokens_per_step
    )


def test_fsdp_hides_behind_compute_until_it_cannot():
    # FSDP over all 256 GPUs hides its collectives behind a full micro-batch of compute...
    cfg = _cfg("b200_8b", "--parallel.dp_replicate=1", "--parallel.dp_shard=256")
    p = predict(cfg, POD)
    assert p.comm["FSDP all-gather"] > p.exposed_comm["FSDP/HSDP"]
    # ...but with 32 tokens per micro-batch the same bytes no longer fit behind the compute
    tiny = predict(
        _cfg("b200_8b", "--parallel.dp_replicate=1", "--parallel.dp_shard=256",
             "--data.seq_len=32", "--model.max_seq_len=32"), POD)  # fmt: skip
    assert tiny.exposed_comm["FSDP/HSDP"] > 0.5 * tiny.comm["FSDP all-gather"]
    assert tiny.exposed_comm["FSDP/HSDP"] > tiny.compute_s
