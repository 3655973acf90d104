"""One table of GPUs: peak dense FLOP/s by dtype, HBM, NVLink and network bandwidth, with sources.

Both the planner (`kfm.plan.model`) and the training loop's MFU (`kfm.model.flops.peak_flops`)
read their peaks from `GPUS`, so a planned MFU and a measured one use the same denominator.

Units: FLOP/s, bytes, bytes/s. Bandwidths are per GPU and per direction (NVIDIA quotes NVLink as
the bidirectional total: 900 GB/s on H100 is 450 GB/s each way). This module imports nothing from
kfm (kfm.model.flops imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Generation:
    """Efficiency constants shared by every GPU of one architecture generation."""

    name: str
    gemm_efficiency: float
    """Fraction of the dense peak a large, compute-bound GEMM sustains inside a training step.
    The ONE fitted constant of the generation: calibrated on the published runs of
    `kfm.plan.validation` (named in `calibrated_on`), not measured here."""
    attention_efficiency: float
    """Fraction of the bf16 peak that fused causal attention (forward + backward) sustains,
    counted on the causal FLOPs it actually does (half the full-matrix count). Not fitted."""
    attention_source: str
    calibrated_on: tuple[str, ...]
    """`kfm.plan.validation.RUNS` names the gemm_efficiency was fitted on; empty: not calibrated."""


@dataclass(frozen=True, slots=True)
class GPU:
    """Datasheet figures of one GPU model as kfm plans with it."""

    name: str
    """`kfm plan --gpu` value."""
    device_names: tuple[str, ...]
    """Substrings of torch.cuda.get_device_name that identify it (matched in `GPUS` order)."""
    generation: Generation
    peak_flops: dict[str, float]
    """Dense (no 2:4 sparsity) peak FLOP/s per dtype: bf16 and fp8 tensor cores, plain fp32."""
    hbm_bytes: float
    """Device memory as torch.cuda.mem_get_info reports it (what a run can allocate from)."""
    hbm_bandwidth: float
    """HBM bytes/s."""
    nvlink_bandwidth: float
    """NVLink bytes/s per direction per GPU (half the quoted bidirectional figure)."""
    nvlink_domain: int
    """GPUs reachable over NVLink: the node for HGX/DGX boards, the rack for NVL72."""
    network_bandwidth: float
    """Inter-node (InfiniBand / RoCE) bytes/s per GPU per direction: one NIC per GPU."""
    gpus_per_node: int
    """GPUs in one host (one Slurm node)."""
    source: str


HOPPER = Generation(
    name="hopper",
    gemm_efficiency=0.483,
    attention_efficiency=0.26,
    attention_source=(
        "FlashAttention-2 on H100 SXM5 at head dim 128, causal, 8k-16k tokens: ~300-350 TFLOP/s "
        "forward, less backward, ~0.30 of the bf16 peak forward + backward (Shah et al. 2024, "
        "FlashAttention-3, Fig. 5-6); kfm's FlexAttention reaches ~85-90% of FlashAttention-2 "
        "(Dong et al. 2024, FlexAttention): 0.30 x 0.87"
    ),
    calibrated_on=("torchtitan-8b-bf16", "torchtitan-8b-fp8", "torchtitan-70b-fp8", "mpt-7b"),
)
BLACKWELL = Generation(
    name="blackwell",
    gemm_efficiency=0.734,
    attention_efficiency=0.26,
    attention_source=(
        "assumed equal to Hopper's fraction: no published FlexAttention forward+backward figure "
        "on B200; vendor kernels (cuDNN, FlashAttention-4) report more"
    ),
    calibrated_on=("megatron-bridge-8b-b200-fp8",),
)
AMPERE = Generation(
    name="ampere",
    gemm_efficiency=HOPPER.gemm_efficiency,
    attention_efficiency=0.45,
    attention_source="FlashAttention-2 on A100: 50-73% of peak forward, less backward (Dao 2023)",
    calibrated_on=(),
)

GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU(
            name="gb200",
            device_names=("GB200",),
            generation=BLACKWELL,
            peak_flops={"bf16": 2500e12, "fp8": 5000e12, "fp32": 80e12},
            hbm_bytes=184 * GIB,
            hbm_bandwidth=8.0e12,
            nvlink_bandwidth=900e9,
            nvlink_domain=72,
            network_bandwidth=50e9,
            gpus_per_node=4,
            source=(
                "GB200 NVL72 datasheet, per GPU (rack figures / 72): 5 PFLOP/s bf16 and 10 fp8 "
                "sparse, i.e. 2.5 and 5 dense; 5,760 TFLOP/s fp32 / 72 = 80; HBM3e 186 GB at 8 "
                "TB/s; NVLink 5 1.8 TB/s bidirectional across all 72 GPUs; one 400 Gb/s "
                "ConnectX-7 per GPU; 4 GPUs per compute tray"
            ),
        ),
        GPU(
            name="b200",
            device_names=("B200",),
            generation=BLACKWELL,
            peak_flops={"bf16": 2250e12, "fp8": 4500e12, "fp32": 75e12},
            hbm_bytes=179 * GIB,
            hbm_bandwidth=8.0e12,
            nvlink_bandwidth=900e9,
            nvlink_domain=8,
            network_bandwidth=50e9,
            gpus_per_node=8,
            source=(
                "HGX B200 datasheet, per GPU (8-GPU board figures / 8): 4.5 PFLOP/s bf16 and 9 "
                "fp8 sparse, i.e. 2.25 and 4.5 dense; 600 TFLOP/s fp32 / 8 = 75; 1,440 GB HBM3e "
                "(~179 GiB per GPU as torch reports it) at 64 TB/s / 8 = 8 TB/s; NVLink 5 1.8 "
                "TB/s bidirectional; DGX B200: 8 x 400 Gb/s ConnectX-7, one per GPU"
            ),
        ),
        GPU(
            name="h200",
            device_names=("H200",),
            generation=HOPPER,
            peak_flops={"bf16": 989.4e12, "fp8": 1978.9e12, "fp32": 66.9e12},
            hbm_bytes=140 * GIB,
            hbm_bandwidth=4.8e12,
            nvlink_bandwidth=450e9,
            nvlink_domain=8,
            network_bandwidth=50e9,
            gpus_per_node=8,
            source=(
                "H200 SXM datasheet: compute as H100 SXM (989 TFLOP/s bf16, 1,979 fp8 dense, "
                "67 fp32); 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s bidirectional; "
                "HGX H200 nodes: one 400 Gb/s NIC per GPU"
            ),
        ),
        GPU(
            name="h100-pcie",
            device_names=("H100 PCIe",),
            generation=HOPPER,
            peak_flops={"bf16": 756e12, "fp8": 1513e12, "fp32": 51.2e12},
            hbm_bytes=79 * GIB,
            hbm_bandwidth=2.0e12,
            nvlink_bandwidth=300e9,
            nvlink_domain=2,
            network_bandwidth=50e9,
            gpus_per_node=8,
            source=(
                "H100 datasheet, PCIe column: 756 TFLOP/s bf16, 1,513 fp8 dense, 51 fp32; 80 GB "
                "HBM2e at 2 TB/s; NVLink bridge 600 GB/s between pairs"
            ),
        ),
        GPU(
            name="h100",
            device_names=("H100",),
            generation=HOPPER,
            peak_flops={"bf16": 989.4e12, "fp8": 1978.9e12, "fp32": 66.9e12},
            hbm_bytes=79 * GIB,
            hbm_bandwidth=3.35e12,
            nvlink_bandwidth=450e9,
            nvlink_domain=8,
            network_bandwidth=50e9,
            gpus_per_node=8,
            source=(
                "H100 datasheet, SXM5 column: 1,979 TFLOP/s bf16 and 3,958 fp8 sparse, i.e. 989 "
                "and 1,979 dense; 67 fp32; 80 GB HBM3 (~79 GiB as torch reports it) at 3.35 "
                "TB/s; NVLink 4 900 GB/s bidirectional; DGX H100: 8 x 400 Gb/s ConnectX-7"
            ),
        ),
        GPU(
            name="a100",
            device_names=("A100",),
            generation=AMPERE,
            peak_flops={"bf16": 312e12, "fp32": 19.5e12},
            hbm_bytes=79 * GIB,
            hbm_bandwidth=2.039e12,
            nvlink_bandwidth=300e9,
            nvlink_domain=8,
            network_bandwidth=25e9,
            gpus_per_node=8,
            source=(
                "A100 datasheet, SXM4 80 GB: 312 TFLOP/s bf16 dense, 19.5 fp32, no fp8; HBM2e "
                "2,039 GB/s; NVLink 3 600 GB/s bidirectional; DGX A100: 8 x 200 Gb/s HDR"
            ),
        ),
    )
}
"""Keyed by `kfm plan --gpu` name. Order matters for `gpu_for_device_name`: GB200 before B200,
H100 PCIe before H100 (the first matching substring wins)."""

COMM_EFFICIENCY = 0.8
"""Fraction of a link's bandwidth an NCCL ring collective reaches on large messages (nccl-tests
bus bandwidth: ~360 GB/s all-gather on H100 NVLink's 450, ~40-45 GB/s per 50 GB/s NIC). Stated,
not fitted."""
COLLECTIVE_LATENCY_S = 20e-6
"""Fixed cost of one collective launch (NCCL's small-message time on one node). Stated, not fitted."""
RING_STEP_LATENCY_S = 5e-6
"""Added per ring step (group size - 1) when a collective crosses nodes: the network hop's
latency, which a pipelined ring pays once per step. Stated, not fitted."""
USABLE_FRACTION = 0.9
"""Share of `GPU.hbm_bytes` the memory estimate may fill: the rest covers the CUDA context, NCCL
and cuBLAS workspaces and caching-allocator fragmentation, none of which the formulas count."""


def gpu_for_device_name(device_name: str) -> GPU | None:
    """The table entry whose `device_names` substring occurs in a CUDA device name, or None."""
    for gpu in GPUS.values():
        if any(key in device_name for key in gpu.device_names):
            return gpu
    return None


def get_gpu(name: str) -> GPU:
    """The `GPUS` entry for a `--gpu` name.

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: use one of {', '.join(GPUS)}") from None
