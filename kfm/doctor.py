"""`kfm doctor`: the pre-flight check of a launch, before hundreds of GPUs start training.

It takes the same config and overrides as `kfm train` and runs the same way: one plain process,
or under torchrun with any number of processes (one per GPU like training, or one per node).
Every rank gathers what it sees (devices, memory, health, disk, versions) to rank 0 over the
default process group, the ranks time an all-reduce together, and rank 0 prints one line per
check with the measured value and the expectation:

- ``launch``: ranks per host and the process-group backend.
- ``devices``: CUDA devices per node against the expected count, their names, free memory and
  (nvidia-smi or pynvml, when present) uncorrected ECC errors and row remapping; on CPU the
  CPU count and memory.
- ``disk``: free space of the run directory's file system against what the checkpoints need.
- ``software``: Python, torch, CUDA, NCCL and kfm versions and the git commit, equal on every rank.
- ``all-reduce``: algorithm and bus bandwidth (nccl-tests convention) against the node type.

Any FAIL makes the exit code 1 on every rank (torchrun and Slurm then fail the step); WARN does
not. Thresholds and their sources are the constants below; see launch/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import torch.distributed as dist

import kfm
from kfm.config import Config
from kfm.train.dist import WorldInfo, world_from_env

Status = Literal["PASS", "WARN", "FAIL"]

BYTES_PER_PARAM = 16
"""Disk per parameter and checkpoint. kfm saves fp32 weights (4 bytes) and AdamW's exp_avg and
exp_avg_sq (4 + 4) with DCP: 12 bytes; a DeepSpeed ZeRO checkpoint holds the same plus bf16
weights (14). 16 leaves room for DCP metadata, the trainer state and the run's logs."""

MEM_FREE_WARN = 0.9
"""WARN when a GPU has less than this fraction of its memory free before training starts
(another process, e.g. a leftover of an earlier job, holds the rest)."""

# NVLink bandwidth per GPU and direction, GB/s: half the bidirectional figure of NVIDIA's
# datasheets (B200/DGX B200: NVLink 5, 1.8 TB/s per GPU; H100/H200 SXM: NVLink 4, 900 GB/s;
# A100 SXM: NVLink 3, 600 GB/s). Matched by substring of the device name, first match wins;
# None: no full NVLink mesh (PCIe cards), so no expectation.
NVLINK_GBPS: list[tuple[str, float | None]] = [
    ("B200", 900.0),
    ("H100 PCIe", None),
    ("H100", 450.0),
    ("H200", 450.0),
    ("A100 PCIe", None),
    ("A100", 300.0),
]
NVLINK_FLOOR = 0.25
"""Intra-node all-reduce busbw below this fraction of the NVLink figure FAILs (225 GB/s on
B200). A healthy NVLink node gets close to the figure with large messages (nccl-tests
all_reduce_perf); a node whose NCCL fell back to PCIe or shared memory (fabric manager down,
NVLink errors) cannot pass it: PCIe Gen5 x16 is ~64 GB/s per direction."""

NIC_GBPS = 50.0
"""Inter-node bandwidth per GPU and direction, GB/s: one 400 Gb/s NIC per GPU (DGX B200: eight
ConnectX-7 400 Gb/s ports for the compute fabric)."""
INTER_NODE_FLOOR = 0.5
"""Multi-node all-reduce busbw below this fraction of NIC_GBPS (25 GB/s) FAILs. NCCL's rings
cross each node boundary once per ring and use all NICs of a node, so a healthy fabric measures
well above one NIC's figure; NCCL on TCP sockets instead of InfiniBand/RoCE (a missing or
misconfigured HCA, NCCL_IB_DISABLE) typically reaches a few GB/s."""

GLOO_MIN_GBPS = 0.1
"""gloo (CPU) all-reduce busbw below this only WARNs: CPU runs are tests and smoke runs."""

# Probe buffer and iterations: large enough for NCCL to reach its bandwidth plateau on GPU,
# small enough to take well under a second on a shared CPU.
PROBE_MIB = {"cuda": 256, "cpu": 16}
PROBE_ITERS = {"cuda": (5, 20), "cpu": (2, 5)}  # (warm-up, timed)

NVIDIA_SMI_TIMEOUT_S = 30.0


def hostname() -> str:
    """The node this process runs on, as the per-node checks group ranks: under torchrun its
    agent's node rank and the host name ("node3 (gpu-07)"), so that two agents sharing a machine
    are two nodes, as torchrun counts them; without torchrun the host name alone."""
    node = os.environ.get("GROUP_RANK")
    host = socket.gethostname()
    return f"node{node} ({host})" if node is not None else host


class DoctorError(RuntimeError):
    """This rank cannot take part in the check at all (e.g. more processes than GPUs)."""


# ---------------------------------------------------------------------------------------------
# What each rank measures


@dataclass
class DeviceInfo:
    """One CUDA device as this rank sees it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass
class GpuHealth:
    """Driver-reported health of one GPU (None: not reported)."""

    index: int
    ecc_uncorrected: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None


@dataclass
class NodeReport:
    """What only one rank per node (local rank 0) measures: it is the same for the whole node."""

    cpu_count: int = 0
    cpu_affinity: int = 0
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    cuda_count: int = 0
    gpu_names: list[str] = field(default_factory=list)
    health: list[GpuHealth] | None = None
    health_source: str = "not reported"
    health_note: str | None = None
    driver: str | None = None
    disk_path: str = ""
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    disk_error: str | None = None


@dataclass
class RankReport:
    """Everything one rank sends to rank 0."""

    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    host: str = ""
    device_type: str = "cpu"
    devices: list[DeviceInfo] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    node: NodeReport | None = None


@dataclass
class Probe:
    """One timed all-reduce: ``seconds`` is the slowest rank's mean time per call."""

    scope: Literal["intra-node", "inter-node"]
    hosts: list[str]
    ranks: int
    nbytes: int
    seconds: float
    backend: str
    device_name: str

    @property
    def algbw_gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def busbw_gbps(self) -> float:
        """algbw * 2(n-1)/n: the bytes each rank moves for a ring all-reduce (nccl-tests'
        doc/PERFORMANCE.md), comparable with link bandwidth whatever the rank count."""
        return bus_bandwidth(self.algbw_gbps, self.ranks)


def bus_bandwidth(algbw: float, n: int) -> float:
    return algbw * 2 * (n - 1) / n if n > 1 else algbw


@dataclass
class Check:
    name: str
    status: Status
    measured: str
    expected: str
    details: list[str] = field(default_factory=list)


def _git(*args: str) -> str | None:
    repo = Path(kfm.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace")


def process_versions(device_type: str) -> dict[str, str | None]:
    """Versions that can differ between processes: interpreter, torch build, CUDA, NCCL, kfm."""
    nccl = None
    if device_type == "cuda":
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # a torch build without NCCL
            nccl = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "kfm": kfm.__version__,
    }


def code_versions() -> dict[str, str | None]:
    """The git commit of the kfm checkout and a hash of its uncommitted changes (per node)."""
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD")
    changes = None
    if diff is not None:
        changes = hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else "none"
    return {"git_commit": commit.strip()[:12] if commit else None, "git_changes": changes}


def parse_nvidia_smi_csv(text: str, fields: Sequence[str]) -> list[dict[str, str | None]]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``; N/A -> None."""
    rows = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            continue
        rows.append(
            {
                k: None if v in ("", "N/A", "[N/A]", "[Not Supported]", "Not Supported") else v
                for k, v in zip(fields, values, strict=True)
            }
        )
    return rows


def _int_or_none(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _yes(v: str | None) -> bool | None:
    return None if v is None else v.strip().lower() in ("yes", "1", "true")


def _nvidia_smi(exe: str, fields: Sequence[str]) -> list[dict[str, str | None]] | None:
    out = subprocess.run(
        [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=NVIDIA_SMI_TIMEOUT_S,
    )
    return parse_nvidia_smi_csv(out.stdout, fields) if out.returncode == 0 else None


def gpu_health() -> tuple[list[GpuHealth] | None, str, str | None, str | None]:
    """(per-GPU health, source, note, driver version) from nvidia-smi, else pynvml, else none.

    A field the driver does not know makes nvidia-smi reject the whole query, so ECC and row
    remapping are asked separately. Nothing here raises: a missing tool is "not reported".
    """
    exe = shutil.which("nvidia-smi")
    if exe:
        base = ("index", "driver_version", "ecc.errors.uncorrected.volatile.total")
        remap = ("index", "remapped_rows.pending", "remapped_rows.failure")
        try:
            rows = _nvidia_smi(exe, base)
            if rows is None:
                return None, "nvidia-smi", "nvidia-smi query failed", None
            remaps = {r["index"]: r for r in _nvidia_smi(exe, remap) or []}
        except subprocess.TimeoutExpired:
            note = f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f} s"
            return None, "nvidia-smi", note, None
        except OSError as e:
            return None, "nvidia-smi", f"nvidia-smi failed: {e}", None
        health = [
            GpuHealth(
                index=_int_or_none(r["index"]) or 0,
                ecc_uncorrected=_int_or_none(r["ecc.errors.uncorrected.volatile.total"]),
                remap_pending=_yes(remaps.get(r["index"], {}).get("remapped_rows.pending")),
                remap_failure=_yes(remaps.get(r["index"], {}).get("remapped_rows.failure")),
            )
            for r in rows
        ]
        return health, "nvidia-smi", None, rows[0]["driver_version"] if rows else None
    try:
        import pynvml
    except ImportError:
        return None, "not reported", None, None
    return _pynvml_health(pynvml)


def _pynvml_health(nv: Any) -> tuple[list[GpuHealth] | None, str, str | None, str | None]:
    try:
        nv.nvmlInit()
    except Exception as e:
        return None, "pynvml", f"nvmlInit failed: {e}", None
    try:
        driver = nv.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        health = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            g = GpuHealth(index=i)
            with contextlib.suppress(Exception):  # ECC disabled or not supported
                g.ecc_uncorrected = int(
                    nv.nvmlDeviceGetTotalEccErrors(
                        h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                    )
                )
            with contextlib.suppress(Exception):  # pre-Ampere GPUs have no row remapping
                _, _, pending, failure = nv.nvmlDeviceGetRemappedRows(h)
                g.remap_pending, g.remap_failure = bool(pending), bool(failure)
            health.append(g)
        return health, "pynvml", None, driver
    except Exception as e:
        return None, "pynvml", f"NVML query failed: {e}", None
    finally:
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()


def _meminfo() -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo (Linux), else sysconf / None."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        return fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (ValueError, OSError, AttributeError):
        return None, None


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the run directory may not exist yet)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def node_report(run_dir: Path, device_type: str) -> NodeReport:
    """The node-wide facts, measured by local rank 0 only."""
    mem_total, mem_avail = _meminfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    node = NodeReport(
        cpu_count=os.cpu_count() or 0,
        cpu_affinity=affinity,
        mem_total_bytes=mem_total,
        mem_available_bytes=mem_avail,
    )
    if torch.cuda.is_available():
        node.cuda_count = torch.cuda.device_count()
        node.gpu_names = [torch.cuda.get_device_name(i) for i in range(node.cuda_count)]
    if device_type == "cuda":
        node.health, node.health_source, node.health_note, node.driver = gpu_health()
    target = existing_parent(run_dir)
    node.disk_path = str(target)
    try:
        usage = shutil.disk_usage(target)
        node.disk_free_bytes, node.disk_total_bytes = usage.free, usage.total
    except OSError as e:
        node.disk_error = str(e)
    return node


def rank_report(
    world: WorldInfo, local_world_size: int, device: torch.device, run_dir: Path
) -> RankReport:
    """This rank's report. Ranks split a node's GPUs by local rank (all of them when one
    process runs per node), so every device's free memory is read by exactly one rank."""
    report = RankReport(
        rank=world.rank,
        local_rank=world.local_rank,
        local_world_size=local_world_size,
        host=hostname(),
        device_type=device.type,
        versions=process_versions(device.type),
    )
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            if i % local_world_size == world.local_rank:
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                report.devices.append(DeviceInfo(i, name, total, free))
    if world.local_rank == 0:
        report.versions.update(code_versions())
        report.node = node_report(run_dir, device.type)
    return report


# ---------------------------------------------------------------------------------------------
# The checks: pure functions of the gathered reports (rank 0 runs them)


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _ranks(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    xs = sorted(ranks)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def hosts_of(reports: Sequence[RankReport]) -> dict[str, list[int]]:
    """host -> its ranks, hosts in the order of their lowest rank."""
    out: dict[str, list[int]] = {}
    for r in sorted(reports, key=lambda r: r.rank):
        out.setdefault(r.host, []).append(r.rank)
    return out


def _nodes(reports: Sequence[RankReport]) -> list[tuple[str, NodeReport]]:
    return [(r.host, r.node) for r in sorted(reports, key=lambda r: r.rank) if r.node is not None]


def _worst(statuses: Iterable[Status]) -> Status:
    s = set(statuses)
    return "FAIL" if "FAIL" in s else "WARN" if "WARN" in s else "PASS"


def check_launch(reports: Sequence[RankReport], backend: str, backend_error: str | None) -> Check:
    """Ranks per host and the backend; uneven ranks per host WARN (a node lost processes)."""
    by_host = hosts_of(reports)
    counts = {len(r) for r in by_host.values()}
    n = len(reports)
    measured = (
        f"{n} rank{'s' if n > 1 else ''} on {len(by_host)} host{'s' if len(by_host) > 1 else ''}"
        + (f", backend {backend}" if n > 1 else " (no process group)")
    )
    details = [f"{h}: ranks {_ranks(rs)}" for h, rs in by_host.items()]
    status: Status = "PASS"
    expected = "the same number of ranks on every host"
    if len(counts) > 1:
        status = "WARN"
    if backend_error and n > 1:  # one process starts no process group
        status = "FAIL"
        details.insert(0, backend_error)
        expected = "a backend that fits the device (parallel.dist_backend)"
    return Check("launch", status, measured, expected, details)


def _check_cpu(
    nodes: Sequence[tuple[str, NodeReport]], want: str, gpus_per_node: int | None
) -> Check:
    """The devices check of a CPU run: CPUs and memory per host; FAIL if CUDA was asked for
    (train.device=cuda, or --gpus-per-node > 0: with train.device=auto a node whose driver lost
    its GPUs would otherwise pass as a CPU run)."""
    no_gpu = [h for h, n in nodes if n.cuda_count == 0]
    details = [
        f"{h}: {n.cpu_affinity} of {n.cpu_count} CPUs usable, memory "
        + (
            f"{_size(n.mem_total_bytes)} ({_size(n.mem_available_bytes or 0)} available)"
            if n.mem_total_bytes
            else "not reported"
        )
        + ("" if n.cuda_count == 0 else f", {n.cuda_count} CUDA devices unused")
        for h, n in nodes
    ]
    first = nodes[0][1] if nodes else NodeReport()
    measured = (
        ("no GPU" if len(no_gpu) == len(nodes) else "CPU run")
        + f"; {first.cpu_affinity} CPUs, {_size(first.mem_total_bytes or 0)} memory"
        + (f" (first of {len(nodes)} hosts)" if len(nodes) > 1 else "")
    )
    if want == "cuda" or (want == "auto" and (gpus_per_node or 0) > 0):
        asked = "train.device=cuda" if want == "cuda" else f"--gpus-per-node {gpus_per_node}"
        return Check(
            "devices",
            "FAIL",
            f"no CUDA device visible on {', '.join(no_gpu) or 'some hosts'}",
            f"{asked}: CUDA devices on every node (or --train.device=cpu for a CPU run)",
            details,
        )
    expected = f"a CPU run (train.device={want}" + (", no CUDA)" if want == "auto" else ")")
    return Check("devices", "PASS", measured, expected, details)


def check_devices(reports: Sequence[RankReport], want: str, gpus_per_node: int | None) -> Check:
    """CUDA devices per node, memory and health; or the CPU when the run is a CPU run.

    The expected GPU count per node is ``gpus_per_node`` when given (exact), else
    LOCAL_WORLD_SIZE under torchrun with several processes per node (at least that many; more
    GPUs than processes WARN: they would sit idle), else at least one GPU.
    """
    nodes = _nodes(reports)
    types = {r.device_type for r in reports}
    if types == {"cpu"}:
        return _check_cpu(nodes, want, gpus_per_node)
    if types != {"cuda"}:
        by_type: dict[str, set[str]] = {}
        for r in reports:
            by_type.setdefault(r.device_type, set()).add(r.host)
        return Check(
            "devices",
            "FAIL",
            "mixed: "
            + "; ".join(f"{t} on {', '.join(sorted(hs))}" for t, hs in sorted(by_type.items())),
            "every host on CUDA (train.device=auto picks cpu where no GPU is visible)",
        )

    statuses: list[Status] = []
    details: list[str] = []
    lws = max(r.local_world_size for r in reports)
    if gpus_per_node is not None:
        expected = f"{gpus_per_node} GPUs per node (--gpus-per-node)"
    elif lws > 1:
        expected = f">= {lws} GPUs per node (LOCAL_WORLD_SIZE)"
    else:
        expected = ">= 1 GPU per node (--gpus-per-node N checks the count)"
    expected += f"; >= {MEM_FREE_WARN:.0%} memory free; no uncorrected ECC errors"
    devices = {(r.host, d.index): d for r in reports for d in r.devices}
    for host, node in nodes:
        status: Status = "PASS"
        problems = []
        n = node.cuda_count
        if gpus_per_node is not None and n != gpus_per_node:
            status = "FAIL"
            problems.append(f"{n} GPUs, expected {gpus_per_node}")
        elif gpus_per_node is None and n < lws:
            status = "FAIL"
            problems.append(f"{n} GPUs for {lws} processes")
        elif gpus_per_node is None and 1 < lws < n:
            status = "WARN"
            problems.append(f"{n} GPUs for {lws} processes: {n - lws} idle")
        names = sorted(set(node.gpu_names))
        if len(names) > 1:
            status = _worst([status, "WARN"])
            problems.append("different GPU models")
        mine = [devices[(host, i)] for i in range(n) if (host, i) in devices]
        for d in mine:
            if d.free_bytes < MEM_FREE_WARN * d.total_bytes:
                status = _worst([status, "WARN"])
                problems.append(
                    f"cuda:{d.index} only {_size(d.free_bytes)} of {_size(d.total_bytes)} free "
                    "(another process holds memory: nvidia-smi)"
                )
        if node.health is None:
            health = f"ECC/health not reported ({node.health_note or node.health_source})"
            if node.health_note:
                status = _worst([status, "WARN"])
                problems.append(node.health_note)
        else:
            ecc = [g for g in node.health if g.ecc_uncorrected]
            failed = [g for g in node.health if g.remap_failure]
            pending = [g for g in node.health if g.remap_pending]
            for g in ecc:
                status = "FAIL"
                problems.append(f"GPU {g.index}: {g.ecc_uncorrected} uncorrected ECC errors")
            for g in failed:
                status = "FAIL"
                problems.append(f"GPU {g.index}: row remapping failed (replace the GPU)")
            for g in pending:
                status = _worst([status, "WARN"])
                problems.append(f"GPU {g.index}: row remap pending (reset the GPU)")
            reported = sum(g.ecc_uncorrected is not None for g in node.health)
            health = (
                f"uncorrected ECC {sum(g.ecc_uncorrected or 0 for g in node.health)} "
                f"({node.health_source}, {reported}/{len(node.health)} GPUs report ECC"
                + (f", driver {node.driver})" if node.driver else ")")
            )
        free = min((d.free_bytes for d in mine), default=0)
        total = max((d.total_bytes for d in mine), default=0)
        line = (
            f"{host}: {n} x {'/'.join(names) or 'GPU'}, min free {_size(free)} of "
            f"{_size(total)}, {health}"
        )
        if problems:
            line += f" -- {status}: " + "; ".join(problems)
        statuses.append(status)
        details.append(line)
    status = _worst(statuses)
    all_names = sorted({name for _, node in nodes for name in node.gpu_names})
    counts = sorted({node.cuda_count for _, node in nodes})
    measured = (
        f"{'/'.join(map(str, counts))} x {'/'.join(all_names)} per node on {len(nodes)} "
        f"host{'s' if len(nodes) > 1 else ''}"
    )
    bad = [d.split(":")[0] for d, s in zip(details, statuses, strict=True) if s != "PASS"]
    if bad:
        measured += f"; {status} on {', '.join(bad)}"
    return Check("devices", status, measured, expected, details)


def checkpoint_count(cfg: Config) -> int:
    """Checkpoints on disk at the worst moment: keep_last of them plus the one being written
    (the oldest is pruned after the new one is complete); keep_last=0 keeps every save."""
    c = cfg.checkpoint
    if c.keep_last > 0:
        return c.keep_last + 1
    steps = cfg.train.steps
    if c.interval <= 0:
        return 1
    return steps // c.interval + (1 if steps % c.interval else 0)


def count_params(cfg: Config) -> int:
    """Parameters of the config's model, built on the meta device (no memory)."""
    from kfm.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def check_disk(reports: Sequence[RankReport], run_dir: Path, n_params: int, n_ckpt: int) -> Check:
    """Free space of the run directory's file system (per node) against the checkpoints."""
    need = BYTES_PER_PARAM * n_params * n_ckpt
    expected = (
        f">= {_size(need)} = {n_ckpt} checkpoints x {BYTES_PER_PARAM} B x {n_params:,} params"
    )
    details: list[str] = []
    statuses: list[Status] = []
    frees = []
    for host, node in _nodes(reports):
        if node.disk_free_bytes is None:
            statuses.append("FAIL")
            details.append(f"{host}: {node.disk_path}: {node.disk_error} -- FAIL")
            continue
        frees.append(node.disk_free_bytes)
        ok = node.disk_free_bytes >= need
        statuses.append("PASS" if ok else "FAIL")
        details.append(
            f"{host}: {_size(node.disk_free_bytes)} free of {_size(node.disk_total_bytes or 0)} "
            f"at {node.disk_path}" + ("" if ok else " -- FAIL")
        )
    status = _worst(statuses)
    paths = sorted({n.disk_path for _, n in _nodes(reports)})
    measured = f"{_size(min(frees, default=0))} free for run directory {run_dir}"
    if paths and paths != [str(run_dir.absolute())]:
        measured += f" (file system of {', '.join(paths)})"
    if status == "FAIL":
        bad = [d.split(":")[0] for d, s in zip(details, statuses, strict=True) if s == "FAIL"]
        measured += f": not enough on {', '.join(bad)}"
    return Check("disk", status, measured, expected, details)


_VERSION_KEYS = ("python", "torch", "cuda", "nccl", "kfm", "git_commit", "git_changes")


def compare_versions(reports: Sequence[RankReport]) -> Check:
    """Every version must be equal on every rank that reports it (git: one rank per node).

    A disagreement FAILs and names, for each value, the hosts and ranks that have it.
    """
    details: list[str] = []
    summary: dict[str, str | None] = {}
    differ = []
    odd_hosts: set[str] = set()
    for key in _VERSION_KEYS:
        seen: dict[str | None, list[RankReport]] = {}
        for r in reports:
            if key in r.versions:
                seen.setdefault(r.versions[key], []).append(r)
        if not seen:
            continue
        if len(seen) == 1:
            summary[key] = next(iter(seen))
            continue
        differ.append(key)
        common = max(seen, key=lambda v: len(seen[v]))
        odd_hosts |= {r.host for v, rs in seen.items() if v != common for r in rs}
        parts = []
        for value, rs in seen.items():
            hosts = sorted({r.host for r in rs})
            parts.append(f"{value} on {', '.join(hosts)} (ranks {_ranks(r.rank for r in rs)})")
        details.append(f"{key}: " + "; ".join(parts))
    expected = "the same versions and git commit on every rank and node"
    if differ:
        measured = (
            f"ranks disagree on {', '.join(differ)}: {', '.join(sorted(odd_hosts))} "
            "differ from the most common value"
        )
        return Check("software", "FAIL", measured, expected, details)
    shown = [f"{k} {v}" for k, v in summary.items() if v is not None and k != "git_changes"]
    changes = summary.get("git_changes")
    if changes and changes != "none":
        shown.append(f"uncommitted changes {changes}")
    n = len(reports)
    measured = ", ".join(shown) + (f" on all {n} ranks" if n > 1 else "")
    return Check("software", "PASS", measured, expected, details)


def nvlink_gbps(device_name: str) -> float | None:
    for key, gbps in NVLINK_GBPS:
        if key in device_name:
            return gbps
    return None


def check_allreduce(probes: Sequence[Probe], skipped: str | None) -> Check:
    """Bus bandwidth of each probe against the node type's floor (see the constants)."""
    if skipped is not None or not probes:
        return Check("all-reduce", "PASS", f"skipped: {skipped}", "a probe with >= 2 ranks")
    statuses: list[Status] = []
    details: list[str] = []
    expectations: set[str] = set()
    bad: Status
    for p in probes:
        where = p.hosts[0] if len(p.hosts) == 1 else f"{len(p.hosts)} hosts"
        line = (
            f"{p.scope} {where}, {p.ranks} ranks: {p.backend} {_size(p.nbytes)} in "
            f"{p.seconds * 1e3:.2f} ms, algbw {p.algbw_gbps:.2f} GB/s, "
            f"busbw {p.busbw_gbps:.2f} GB/s"
        )
        if p.backend != "nccl":
            floor, bad = GLOO_MIN_GBPS, "WARN"
            expectations.add(f"busbw >= {floor} GB/s ({p.backend}, only WARN)")
        elif p.scope == "inter-node":
            floor, bad = INTER_NODE_FLOOR * NIC_GBPS, "FAIL"
            expectations.add(
                f"inter-node busbw >= {floor:.0f} GB/s ({INTER_NODE_FLOOR:.0%} of a "
                f"400 Gb/s NIC per GPU)"
            )
        else:
            link = nvlink_gbps(p.device_name)
            if link is None:
                statuses.append("PASS")
                details.append(line + f" (no reference figure for {p.device_name})")
                expectations.add(f"no reference for {p.device_name}")
                continue
            floor, bad = NVLINK_FLOOR * link, "FAIL"
            expectations.add(
                f"intra-node busbw >= {floor:.0f} GB/s ({NVLINK_FLOOR:.0%} of "
                f"{p.device_name} NVLink {link:.0f} GB/s)"
            )
        ok = p.busbw_gbps >= floor
        status: Status = "PASS" if ok else bad
        statuses.append(status)
        details.append(line + ("" if ok else f" -- {status}: below {floor:g} GB/s"))
    status = _worst(statuses)
    # The summary shows the slowest probe of each scope.
    measured_parts = []
    for scope in ("intra-node", "inter-node"):
        ps = [p for p in probes if p.scope == scope]
        if ps:
            p = min(ps, key=lambda p: p.busbw_gbps)
            who = p.hosts[0] if len(p.hosts) == 1 else f"{len(p.hosts)} hosts"
            measured_parts.append(
                f"{scope} {p.backend} busbw {p.busbw_gbps:.2f} GB/s (algbw {p.algbw_gbps:.2f}, "
                f"{p.ranks} ranks, {who}{', slowest host' if len(ps) > 1 else ''})"
            )
    return Check(
        "all-reduce", status, "; ".join(measured_parts), "; ".join(sorted(expectations)), details
    )


# ---------------------------------------------------------------------------------------------
# Collectives


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_allreduce(
    nbytes: int, device: torch.device, group: Any = None, *, warmup: int, iters: int
) -> float:
    """Mean seconds per all_reduce of ``nbytes`` of fp32 over ``group``, max over its ranks."""
    buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(buf, group=group)
    flag = torch.zeros(1, device=device)
    dist.all_reduce(flag, group=group)  # line up the ranks before the clock starts
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    _sync(device)
    dt = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
    return float(dt.item())


def run_probes(
    reports: Sequence[RankReport], rank: int, device: torch.device, backend: str, nbytes: int
) -> list[Probe]:
    """All ranks: one all-reduce per host at once (when there are several hosts with several
    ranks each, to name a slow node), then one over the whole world."""
    warmup, iters = PROBE_ITERS[device.type]
    by_host = hosts_of(reports)
    names = {r.host: (r.devices[0].name if r.devices else "cpu") for r in reports}
    probes: list[Probe] = []
    if len(by_host) > 1 and max(len(rs) for rs in by_host.values()) > 1:
        group, _ = dist.new_subgroups_by_enumeration(list(by_host.values()))
        secs = time_allreduce(nbytes, device, group, warmup=warmup, iters=iters)
        me = next(r.host for r in reports if r.rank == rank)
        per_host: list[Any] = [None] * len(reports)
        dist.all_gather_object(per_host, (me, secs))
        seen = dict(per_host)
        for host, ranks in by_host.items():
            if len(ranks) > 1:
                probes.append(
                    Probe(
                        "intra-node", [host], len(ranks), nbytes, seen[host], backend, names[host]
                    )
                )
    secs = time_allreduce(nbytes, device, None, warmup=warmup, iters=iters)
    scope: Literal["intra-node", "inter-node"] = "inter-node" if len(by_host) > 1 else "intra-node"
    first = next(iter(by_host))
    probes.append(Probe(scope, list(by_host), len(reports), nbytes, secs, backend, names[first]))
    return probes


# ---------------------------------------------------------------------------------------------
# The command


def _probe_device(cfg: Config, world: WorldInfo) -> torch.device:
    """cuda:LOCAL_RANK when the run would use CUDA, else cpu (also when train.device=cuda but
    none is visible: the devices check FAILs, the other checks still run)."""
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise DoctorError(
            f"LOCAL_RANK={world.local_rank} on {hostname()} but only {count} CUDA "
            f"device(s) are visible: start at most {count} processes per node "
            "(torchrun --nproc-per-node) or check the node's GPUs (nvidia-smi)"
        )
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


def _backend(cfg: Config, device: torch.device) -> tuple[str, str | None]:
    """(backend to use, error to report): nccl asked for without CUDA falls back to gloo so the
    report can still be gathered, and the launch check FAILs."""
    want = cfg.parallel.dist_backend
    if want == "auto":
        return ("nccl" if device.type == "cuda" else "gloo"), None
    if want == "nccl" and device.type != "cuda":
        return "gloo", "parallel.dist_backend=nccl but this is a CPU run (no CUDA device)"
    return want, None


def format_report(checks: Sequence[Check], header: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [header]
    for c in checks:
        lines.append(f"{c.status}  {c.name:<{width}}  {c.measured}  [expected: {c.expected}]")
        lines += [f"{'':{6 + width}}  {d}" for d in c.details]
    failed = [c.name for c in checks if c.status == "FAIL"]
    warned = [c.name for c in checks if c.status == "WARN"]
    if failed:
        lines.append(
            f"doctor: FAIL ({', '.join(failed)})"
            + (f"; WARN ({', '.join(warned)})" if warned else "")
        )
    else:
        lines.append(
            "doctor: all checks passed" + (f" (WARN: {', '.join(warned)})" if warned else "")
        )
    return "\n".join(lines)


def run_doctor(
    cfg: Config,
    *,
    gpus_per_node: int | None = None,
    probe_mib: float | None = None,
    json_path: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run every check; rank 0 prints the report (and writes ``json_path``). Returns the exit
    code on every rank: 1 if any check FAILed, else 0.

    Under torchrun it starts the default process group itself (timeout
    parallel.collective_timeout_s) and destroys it before returning.
    """
    out = out or sys.stdout
    world = world_from_env()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    device = _probe_device(cfg, world)
    backend, backend_error = _backend(cfg, device)
    local = rank_report(world, local_world_size, device, run_dir)
    mib = PROBE_MIB[device.type] if probe_mib is None else probe_mib
    nbytes = int(mib * 2**20)
    finish = functools.partial(
        _finish,
        cfg,
        backend=backend,
        backend_error=backend_error,
        run_dir=run_dir,
        gpus_per_node=gpus_per_node,
        json_path=json_path,
        out=out,
    )
    if not world.distributed:
        return finish([local], [], "single process")
    dist.init_process_group(
        backend=backend,
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(seconds=cfg.parallel.collective_timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    try:
        gathered: list[Any] = [None] * world.world_size
        dist.all_gather_object(gathered, local)
        reports: list[RankReport] = gathered
        skipped = None if nbytes > 0 else "--probe-mib 0"
        probes = run_probes(reports, world.rank, device, backend, nbytes) if nbytes > 0 else []
        code, error = 0, None
        if world.rank == 0:
            try:
                code = finish(reports, probes, skipped)
            except Exception as e:  # the other ranks wait for the code: give them one
                code, error = 1, e
        box = [code]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        # Every rank has the verdict before any tears the group down: a rank destroying gloo
        # while a peer is still receiving the broadcast aborts the peer (SIGABRT at exit).
        dist.barrier()
        return int(box[0])
    finally:
        dist.destroy_process_group()


def _finish(
    cfg: Config,
    reports: Sequence[RankReport],
    probes: Sequence[Probe],
    skipped: str | None,
    *,
    backend: str,
    backend_error: str | None,
    run_dir: Path,
    gpus_per_node: int | None,
    json_path: str | None,
    out: TextIO,
) -> int:
    """Rank 0: evaluate, print, write JSON; the exit code."""
    checks = [
        check_launch(reports, backend, backend_error),
        check_devices(reports, cfg.train.device, gpus_per_node),
        check_disk(reports, run_dir, count_params(cfg), checkpoint_count(cfg)),
        compare_versions(reports),
        check_allreduce(probes, skipped),
    ]
    header = f"kfm doctor: run directory {run_dir}, train.device={cfg.train.device}"
    print(format_report(checks, header), file=out, flush=True)
    ok = all(c.status != "FAIL" for c in checks)
    if json_path:
        doc = {
            "ok": ok,
            "run_dir": str(run_dir),
            "world_size": len(reports),
            "hosts": hosts_of(reports),
            "checks": [asdict(c) for c in checks],
            "probes": [
                {**asdict(p), "algbw_gbps": p.algbw_gbps, "busbw_gbps": p.busbw_gbps}
                for p in probes
            ],
            "ranks": [asdict(r) for r in reports],
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1
