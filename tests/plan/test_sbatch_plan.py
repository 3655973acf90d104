"""launch/slurm/train.sbatch's plan link and network environment, without Slurm: the script runs
under bash with stand-in `scontrol` and `srun` on PATH (srun records the environment the ranks
would get and exits 0). The real-Slurm behaviour (requeue, stop relay) is tests/launch's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kfm_cli import main
from tests.conftest import REPO

SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"


def _run(tmp_path: Path, config: str, *, nodes: int, gpus: int, env: dict[str, str]):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node001\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nenv > {tmp_path}/srun_env_$$\nexit 0\n")
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)
    venv = Path(sys.executable).parent.parent  # the venv running the tests
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "SLURM_"))},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KFM_VENV": str(venv),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_GPUS_ON_NODE": str(gpus),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), config, f"--train.run_root={tmp_path}/runs"],
        capture_output=True, text=True, cwd=REPO, env=full_env, timeout=120,
    )  # fmt: skip


def test_allocation_that_does_not_match_the_plan_is_refused(tmp_path, capsys):
    preset = "configs/pretrain/phase1_8b.yaml"
    assert main(["plan", preset, "--sbatch-args"]) == 0
    assert capsys.readouterr().out.strip() == "--nodes=32 --gpus-per-node=8"
    out = _run(tmp_path, preset, nodes=4, gpus=8, env={})
    assert out.returncode == 2
    assert "mesh needs 256 GPUs but the job has 4 node(s) x 8" in out.stderr
    assert "kfm plan configs/pretrain/phase1_8b.yaml --sbatch-args" in out.stderr
    assert not list(tmp_path.glob("srun_env_*"))  # refused before any srun


def test_network_defaults_reach_the_ranks_and_the_cluster_wins(tmp_path):
    preset = "configs/pretrain/phase1_8b.yaml"
    out = _run(tmp_path, preset, nodes=32, gpus=8, env={"NCCL_DEBUG": "INFO", "KFM_DOCTOR": "0"})
    # the stand-in srun wrote no status.json: the script ends without a requeue, after srun ran
    assert out.returncode == 1 and "no status.json" in out.stdout
    (env_file,) = tmp_path.glob("srun_env_*")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert env["NCCL_DEBUG"] == "INFO"  # set by the user: kept
    assert env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "NCCL_IB_HCA" not in env  # cluster-specific: left to the cluster
