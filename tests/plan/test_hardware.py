"""One table of GPUs feeds both the planner and the training loop's MFU."""

from __future__ import annotations

import pytest

from kfm.plan.hardware import GPUS, get_gpu, gpu_for_device_name


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA B200", "b200"),
        ("NVIDIA GB200", "gb200"),  # contains "B200": GB200 must be matched first
        ("NVIDIA H100 PCIe", "h100-pcie"),  # contains "H100": the PCIe entry first
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("Tesla T4", None),
    ],
)
def test_device_names_match_the_right_entry(device_name, expected):
    gpu = gpu_for_device_name(device_name)
    assert (gpu.name if gpu else None) == expected


def test_every_entry_is_sourced_and_consistent():
    for gpu in GPUS.values():
        assert gpu.source and gpu.generation.attention_source
        assert gpu.peak_flops["bf16"] > gpu.peak_flops["fp32"]
        if "fp8" in gpu.peak_flops:
            assert gpu.peak_flops["fp8"] == pytest.approx(2 * gpu.peak_flops["bf16"], rel=0.01)
        assert gpu.nvlink_bandwidth > gpu.network_bandwidth
    # the B200 figures the 32 x 8 plan rests on (HGX B200 datasheet, dense)
    b200 = GPUS["b200"]
    assert b200.peak_flops["bf16"] == 2250e12 and b200.peak_flops["fp8"] == 4500e12
    assert b200.gpus_per_node == 8 and b200.nvlink_domain == 8


@pytest.mark.parametrize("name", ["NVIDIA B200", "NVIDIA H100 PCIe", "NVIDIA GB200"])
def test_loop_peak_comes_from_the_table(monkeypatch, name):
    # the training loop's MFU denominator (kfm.model.flops.peak_flops) is the planner's figure
    import torch

    from kfm.model.flops import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    gpu = gpu_for_device_name(name)
    assert gpu is not None
    for dtype in ("bf16", "fp8", "fp32"):
        assert peak_flops(torch.device("cuda"), dtype) == gpu.peak_flops[dtype]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(torch.device("cuda"), "bf16") is None


def test_unknown_gpu_names_the_known_ones():
    with pytest.raises(ValueError, match="b200.*h100"):
        get_gpu("v100")
