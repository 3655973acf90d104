"""`kfm plan` end to end: the report, --json with the same figures, --search, --sbatch-args,
--validate and a budget, on CPU in seconds."""

from __future__ import annotations

import json
import time

import pytest

from kfm_cli import main
from tests.conftest import REPO

PRESET = str(REPO / "configs" / "b200_8b.yaml")


def test_plan_prints_the_table_and_json_holds_the_same(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    start = time.monotonic()
    assert main(["plan", PRESET, "--nodes", "32", "--json", str(out_json)]) == 0
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["world_size"] == 256 and data["mesh"] == {
        "dp_replicate": 32,
        "dp_shard": 8,
        "tp": 1,
    }
    assert f"{data['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU" in out
    assert f"MFU {data['mfu']:.1%}" in out
    assert f"{data['days']:.2f} days" in out
    assert data["memory_bytes"]["fits"] and "FITS" in out
    assert "failure budget" in out and data["failure_budget"]["interruptions_per_week"] > 0
    assert "parameters: 8,030,269,440" in out  # with QK-norm's 2 x 128 weights per block
    assert elapsed < 60  # seconds, on a shared 2-core machine


def test_search_and_overrides(capsys, tmp_path):
    out_json = tmp_path / "s.json"
    args = ["plan", PRESET, "--nodes", "4", "--search", "--top", "3", "--json", str(out_json),
            "--train.global_batch_size=64", "--parallel.dp_replicate=-1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["search"]
    assert "best: " + rows[0]["overrides"] in out
    assert sum(r["fits"] for r in rows) < len(rows)


def test_sbatch_args_from_the_preset(capsys):
    assert main(["plan", PRESET, "--sbatch-args"]) == 0
    assert capsys.readouterr().out.strip() == "--nodes=32 --gpus-per-node=8"
    assert main(["plan", PRESET, "--sbatch-args", "--gpu", "gb200", "--gpus-per-node", "4"]) == 0
    assert capsys.readouterr().out.strip() == "--nodes=64 --gpus-per-node=4"


def test_validate_prints_every_run(capsys):
    assert main(["plan", "--validate"]) == 0
    out = capsys.readouterr().out
    for run in (
        "torchtitan-8b-bf16",
        "torchtitan-70b-fp8",
        "megatron-bridge-8b-b200-fp8",
        "mpt-7b",
    ):
        assert run in out


def test_budget_with_candidates(capsys, tiny_sources):
    args = ["plan", PRESET, "--gpu-hours", "100000", "--candidates",
            str(REPO / "configs" / "b200_1b.yaml"), "--data", *[s["path"] for s in tiny_sources]]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "b200_8b" in out and "b200_1b" in out and "over-trained" in out
    assert "medquad" in out and "ko_chatbot" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "v100"], "--gpu: unknown GPU 'v100'"),
        (["--nodes", "3", "--parallel.dp_replicate=32"], "parallel.dp_replicate"),
        (["--data", "x.yaml"], "add --gpu-hours"),
    ],
)
def test_user_errors_are_one_clear_message(capsys, args, message):
    assert main(["plan", PRESET, *args]) == 2
    assert message in capsys.readouterr().err
