"""`kfm doctor`: the pre-flight check, as one process, under torchrun (2 gloo ranks) and as two
torchrun "nodes" on this machine; the GPU-only verdicts through the pure check functions."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from kfm.config import load_config
from kfm.doctor import (
    DeviceInfo,
    GpuHealth,
    NodeReport,
    Probe,
    RankReport,
    bus_bandwidth,
    check_allreduce,
    check_devices,
    checkpoint_count,
    compare_versions,
    parse_nvidia_smi_csv,
)
from kfm_cli import main
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
CHECKS = ("launch", "devices", "disk", "software", "all-reduce")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _status(out: str, check: str) -> str:
    m = re.search(rf"^(PASS|WARN|FAIL)  {re.escape(check)} ", out, re.MULTILINE)
    assert m, f"no line for check {check!r} in:\n{out}"
    return m.group(1)


def test_single_process_on_cpu_passes_and_prints_every_check(tmp_path, capsys):
    report = tmp_path / "doctor.json"
    assert main(["doctor", TINY, f"--train.run_root={tmp_path}", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for check in CHECKS:
        assert _status(out, check) == "PASS"
    assert "skipped: single process" in out and "no GPU" in out
    assert str(tmp_path / "tiny") in out  # the disk check names the run directory
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and [c["name"] for c in doc["checks"]] == list(CHECKS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_asked_for_on_a_cpu_machine_fails(tmp_path, capsys):
    assert main(["doctor", TINY, f"--train.run_root={tmp_path}", "--train.device=cuda"]) == 1
    out = capsys.readouterr().out
    assert _status(out, "devices") == "FAIL"
    assert "no CUDA device visible" in out and "--train.device=cpu" in out
    assert "doctor: FAIL (devices)" in out


def test_disk_too_small_for_the_checkpoints_fails_naming_the_run_directory(tmp_path, capsys):
    # ~3e12 parameters: 4 checkpoints need ~190 TB, more than any test machine has free.
    big = ["--model.d_model=65536", "--model.n_layers=64"]
    assert main(["doctor", TINY, f"--train.run_root={tmp_path}", *big]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("FAIL  disk"))
    assert str(tmp_path / "tiny") in line and "not enough" in line
    assert "4 checkpoints x 16 B" in line


def test_two_gloo_ranks_measure_bandwidth_and_agree_on_versions(tmp_path):
    report = tmp_path / "doctor.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kfm_cli", "doctor", TINY, f"--train.run_root={tmp_path}",
           "--json", str(report)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("kfm doctor:") == 1  # rank 0 alone prints
    assert "2 ranks on 1 host, backend gloo" in out
    assert re.search(r"PASS  all-reduce +intra-node gloo busbw \d+\.\d+ GB/s", out), out
    assert _status(out, "software") == "PASS" and "on all 2 ranks" in out
    doc = json.loads(report.read_text())
    (probe,) = doc["probes"]
    assert probe["backend"] == "gloo" and probe["ranks"] == 2 and probe["busbw_gbps"] > 0
    ranks = doc["ranks"]
    keys = ("python", "torch", "kfm")
    assert [{k: r["versions"][k] for k in keys} for r in ranks] == [
        {k: ranks[0]["versions"][k] for k in keys}
    ] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_probe_each_host_then_across_hosts(tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous) with 2 ranks each: two nodes as torchrun
    counts them (node ranks 0 and 1), on one machine: the multi-node path of the Slurm script."""
    port = _free_port()
    procs = []
    for _node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=doctor",
               "-m", "kfm_cli", "doctor", TINY, f"--train.run_root={tmp_path}",
               "--probe-mib=4"]  # fmt: skip
        env = _env()
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )  # fmt: skip
        )
    results = [p.communicate(timeout=300) for p in procs]
    out = "".join(o for o, _ in results)
    fails = re.findall(r"^FAIL  .*$", out, re.MULTILINE)
    # Another process editing the checkout between the two nodes' `git diff` is a real
    # disagreement (the nodes could import different code), not a doctor bug: tolerate only that.
    assert all(f.startswith("FAIL  software") and "git_changes" in f for f in fails), out
    if not fails:
        assert [p.returncode for p in procs] == [0, 0], out + results[0][1][-3000:]
    assert "4 ranks on 2 hosts" in out
    host = socket.gethostname()
    assert f"node0 ({host}): ranks 0-1" in out and f"node1 ({host}): ranks 2-3" in out
    for node in ("node0", "node1"):
        assert f"intra-node {node} ({host}), 2 ranks: gloo 4.0 MiB" in out
    assert "inter-node 2 hosts, 4 ranks: gloo" in out


def _rank(rank: int, host: str, **versions: str | None) -> RankReport:
    base = {"python": "3.11.7", "torch": "2.13.0", "cuda": "12.8", "nccl": "2.27.3", "kfm": "0.1.0"}
    return RankReport(rank=rank, host=host, versions={**base, **versions})


def test_version_disagreement_fails_naming_the_hosts():
    same = compare_versions([_rank(0, "gpu-a"), _rank(1, "gpu-b")])
    assert same.status == "PASS" and "torch 2.13.0" in same.measured
    check = compare_versions(
        [_rank(0, "gpu-a"), _rank(1, "gpu-a"), _rank(2, "gpu-b", torch="2.12.1")]
    )
    assert check.status == "FAIL"
    assert "torch" in check.measured and "gpu-b" in check.measured
    assert check.details == ["torch: 2.13.0 on gpu-a (ranks 0-1); 2.12.1 on gpu-b (ranks 2)"]


def _gpu_rank(rank: int, host: str, *, n: int = 8, free: float = 1.0, ecc: int = 0) -> RankReport:
    total = 180 * 2**30
    node = NodeReport(
        cuda_count=n,
        gpu_names=["NVIDIA B200"] * n,
        health=[GpuHealth(index=i, ecc_uncorrected=ecc if i == 3 else 0) for i in range(n)],
        health_source="nvidia-smi",
    )
    devices = [DeviceInfo(i, "NVIDIA B200", total, int(free * total)) for i in range(n)]
    return RankReport(rank=rank, host=host, device_type="cuda", devices=devices, node=node)


def test_gpu_devices_check_counts_memory_and_ecc():
    healthy = [_gpu_rank(0, "gpu-a"), _gpu_rank(1, "gpu-b")]
    assert check_devices(healthy, "auto", 8).status == "PASS"
    missing = check_devices([_gpu_rank(0, "gpu-a"), _gpu_rank(1, "gpu-b", n=7)], "auto", 8)
    assert missing.status == "FAIL" and "gpu-b" in missing.measured
    assert check_devices([_gpu_rank(0, "gpu-a", free=0.5)], "auto", 8).status == "WARN"
    ecc = check_devices([_gpu_rank(0, "gpu-a", ecc=2)], "cuda", None)
    assert ecc.status == "FAIL" and "GPU 3: 2 uncorrected ECC errors" in ecc.details[0]


def test_nccl_bandwidth_floors():
    def probe(scope, busbw: float) -> Probe:
        n, nbytes = 8, 256 * 2**20
        algbw = busbw / (2 * (n - 1) / n)
        return Probe(scope, ["gpu-a"], n, nbytes, nbytes / (algbw * 1e9), "nccl", "NVIDIA B200")

    assert bus_bandwidth(10.0, 8) == pytest.approx(17.5)
    assert check_allreduce([probe("intra-node", 600.0)], None).status == "PASS"
    slow = check_allreduce([probe("intra-node", 50.0)], None)  # NVLink down: PCIe speeds
    assert slow.status == "FAIL" and "225 GB/s" in slow.expected
    assert check_allreduce([probe("inter-node", 10.0)], None).status == "FAIL"
    assert check_allreduce([probe("inter-node", 80.0)], None).status == "PASS"


def test_nvidia_smi_parsing_and_checkpoint_count():
    rows = parse_nvidia_smi_csv("0, 570.86, 0\n1, 570.86, [N/A]\n", ("index", "driver", "ecc"))
    assert rows == [
        {"index": "0", "driver": "570.86", "ecc": "0"},
        {"index": "1", "driver": "570.86", "ecc": None},
    ]
    assert checkpoint_count(load_config(TINY)) == 4  # keep_last 3 + the one being written
    keep_all = load_config(TINY, ["--checkpoint.keep_last=0"])  # steps 20, interval 10
    assert checkpoint_count(keep_all) == 2
