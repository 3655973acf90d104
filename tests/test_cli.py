"""The public CLI surface is frozen here: adding or removing an option must be deliberate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from kfm_cli import build_parser, main
from tests.conftest import REPO, tiny_overrides

SURFACE = {
    "train": ["--dry-run", "--world-size", "config"],
    "doctor": ["--gpus-per-node", "--json", "--probe-mib", "config"],
    "tokenizer train": ["--dry-run", "--overwrite", "config"],
    "pack": [
        "--license",
        "--out",
        "--overwrite",
        "--shard-tokens",
        "--source-name",
        "--text-field",
        "--tokenizer",
        "--val-fraction",
        "--workers",
        "inputs",
    ],
    "eval": ["--batches", "--data", "--tokenizer", "checkpoint"],
    "export": ["--dtype", "--no-verify", "--overwrite", "--tokenizer", "checkpoint", "out_dir"],
    "data pii-report": ["--output", "input"],
    "data run": ["--dry-run", "--executor", "--overwrite", "config"],
    "data card": ["--output", "run_dir"],
    "data verify": ["--splits", "--workers", "shard_sets"],
    "plan": [
        "--candidates",
        "--data",
        "--gemm-efficiency",
        "--gpu",
        "--gpu-hours",
        "--gpus-per-node",
        "--json",
        "--nodes",
        "--save-s",
        "--sbatch-args",
        "--search",
        "--tokens",
        "--top",
        "--validate",
        "config",
    ],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    names = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        names.append(max(a.option_strings, key=len) if a.option_strings else a.dest)
    return sorted(names)


def test_cli_surface_is_frozen():
    top = _subparsers(build_parser())
    found = {}
    for name, p in top.items():
        sub = _subparsers(p)
        if sub:
            found.update({f"{name} {s}": _options(sp) for s, sp in sub.items()})
        else:
            found[name] = _options(p)
    assert found == SURFACE


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["train"],
        ["doctor"],
        ["tokenizer"],
        ["tokenizer", "train"],
        ["pack"],
        ["eval"],
        ["export"],
        ["data"],
        ["data", "pii-report"],
        ["data", "run"],
        ["data", "card"],
        ["data", "verify"],
        ["plan"],
    ],
)
def test_help_on_every_command(command):
    out = subprocess.run(
        [sys.executable, "-m", "kfm_cli", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0 and "usage: kfm" in out.stdout


def test_dry_run_prints_config_and_param_count(capsys, tiny_sources, tmp_path):
    overrides = tiny_overrides(tiny_sources, tmp_path, "dry")
    assert (
        main(["train", str(REPO / "configs/tiny.yaml"), "--dry-run", "--optim.lr=1e-3", *overrides])
        == 0
    )
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "parameters:" in out and "--- pre-flight" in out


def test_config_errors_exit_2_with_message(capsys):
    assert main(["train", str(REPO / "configs/tiny.yaml"), "--dry-run", "--optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_dry_run_plans_the_256_gpu_preset(capsys):
    assert (
        main(["train", str(REPO / "configs/b200_8b.yaml"), "--dry-run", "--world-size", "256"]) == 1
    )
    out, err = capsys.readouterr()
    assert "plan for world size 256" in out and "dp_replicate=32" in out and "FITS" in out
    # The preset names no data yet: the plan is printed, and the dry run says training would stop.
    assert "FAIL data.sources: empty" in out and "data.sources, tokenizer" in err


def test_dry_run_shows_the_generated_deepspeed_config(capsys, tiny_sources, tmp_path):
    args = ["train", str(REPO / "configs/tiny.yaml"), "--dry-run", "--parallel.backend=deepspeed",
            "--parallel.zero_stage=2", *tiny_overrides(tiny_sources, tmp_path, "ds")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed config for 1 rank(s)" in out
    assert "stage: 2" in out and "train_batch_size: 8" in out


def test_data_pii_report_writes_spans_per_document(tmp_path, capsys):
    src = tmp_path / "notes.jsonl"
    src.write_text(
        '{"id": "a", "text": "Call 010-1234-5678 or mail kim@example.com."}\n'
        '{"id": "b", "text": "HbA1c 6.5% on 2024-01-15."}\n',
        encoding="utf-8",
    )
    out = tmp_path / "report.jsonl"
    assert main(["data", "pii-report", str(src), "-o", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert sorted(s["type"] for s in rows[0]["spans"]) == ["email", "phone"]
    assert rows[1]["spans"] == []
    assert "PII spans found: 2" in capsys.readouterr().out


def test_data_verify_finds_a_corrupt_file(tiny_sources, tmp_path, capsys):
    import shutil

    good = [s["path"] for s in tiny_sources]
    assert main(["data", "verify", *good]) == 0
    assert "ok: 4 shard files" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(good[0], bad)
    idx = sorted(bad.glob("val-*.idx"))[0]
    data = bytearray(idx.read_bytes())
    data[-1] ^= 0x01  # same size: the sha256 (and the offsets) no longer match
    idx.write_bytes(bytes(data))
    assert main(["data", "verify", str(bad), good[1]]) == 1
    err = capsys.readouterr().err
    assert "val-00000.idx" in err and "sha256" in err
