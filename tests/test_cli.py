"""The public CLI surface is frozen here: adding or removing an option must be deliberate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

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
    "eval": [
        "--batch-size",
        "--batches",
        "--data",
        "--include-path",
        "--limit",
        "--num-fewshot",
        "--out",
        "--tasks",
        "--tokenizer",
        "checkpoint",
    ],
    "export": [
        "--dtype",
        "--format",
        "--no-verify",
        "--overwrite",
        "--tokenizer",
        "checkpoint",
        "out_dir",
    ],
    "report": ["--labels", "--out", "run_dirs"],
    "import-hf": ["--overwrite", "hf_dir", "out_dir"],
    "merge": ["--ema", "--last", "--out", "--overwrite", "--steps", "run_dir"],
    "release": [
        "--dtype",
        "--license",
        "--max-shard-size",
        "--name",
        "--overwrite",
        "--pii-max",
        "--pii-sample",
        "--step",
        "out",
        "run_dir",
    ],
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
        ["import-hf"],
        ["merge"],
        ["release"],
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


def test_a_bug_is_one_line_unless_debug(monkeypatch, capsys):
    """An exception kfm did not anticipate (here a TypeError from a command) is reported as a
    bug in one line; --debug adds the traceback."""

    def broken(args, overrides):
        return sorted([1, "a"])  # TypeError, as a real bug would raise

    monkeypatch.delenv("KFM_DEBUG", raising=False)
    monkeypatch.setattr(sys.modules["kfm_cli.main"], "cmd_data_card", broken)
    assert main(["data", "card", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kfm data card: error: TypeError: '<' not supported")
    assert err.rstrip().endswith(
        "(this is a bug in kfm; rerun with --debug for the traceback and report it)"
    )
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["--debug", "data", "card", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'sorted([1, "a"])' in err


def test_user_errors_and_bugs_are_told_apart():
    from kfm_cli.errors import classify

    def raised(e: BaseException) -> BaseException:
        try:
            raise e
        except BaseException as caught:
            return caught

    import errno

    from kfm.data.pack import pack

    with pytest.raises(ValueError) as ours:  # a ValueError raised by our code carries the fix
        pack([], "tokenizer", "out", source_name="x")
    assert classify(ours.value).message == (
        "pack: no inputs given; pass files or directories to tokenize"
    )
    assert classify(raised(ValueError("x"))).bug is True  # raised here, outside our packages
    assert classify(raised(OSError(errno.ENOSPC, "No space left", "/d/f"))).message == (
        "/d/f: no space left on the device: free space there or write to another disk"
    )
    assert classify(raised(FileExistsError("out exists; pass --overwrite"))).message == (
        "out exists; pass --overwrite"
    )
    assert classify(raised(KeyError("k"))).bug is True
    assert classify(KeyboardInterrupt()).code == 130
    # A ValueError raised inside a library, not by our code, is not a message for the user.
    with pytest.raises(ValueError) as theirs:
        int("not a number")
    assert classify(theirs.value).bug is True


def test_tokenizer_prints_its_summary_not_its_json(tiny_sources, tmp_path, capsys):
    source = tiny_sources[0]  # packed from <root>/<name>.jsonl into <root>/shards/<name>
    corpus = Path(source["path"]).parents[1] / f"{source['name']}.jsonl"
    args = [
        "tokenizer",
        "train",
        f"--tokenizer.inputs=[{corpus}]",
        f"--tokenizer.path={tmp_path / 'tok'}",
        "--tokenizer.vocab_size=400",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and not any(line.lstrip().startswith(("{", '"')) for line in out)
    assert out[0].startswith(f"tokenizer {tmp_path / 'tok'}: ") and "fertility" in out[0]
    assert out[1] == f"  report: {tmp_path / 'tok' / 'kfm_tokenizer.json'}"


def test_overrides_holding_spaces_are_not_taken_for_the_config(capsys, tmp_path):
    """argparse reads an argument with a space as a positional; overrides are split off first."""
    assert main(["tokenizer", "train", "--tokenizer.inputs=[a.jsonl, b.jsonl]", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == ["a.jsonl", "b.jsonl"]
    assert main(["tokenizer", "train", "--tokenizer.vocab_size", "512", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 512


def test_split_overrides_keeps_other_arguments_in_order():
    from kfm_cli.main import split_overrides

    argv = [
        "train",
        "c.yaml",
        "--train.steps",
        "5",
        "--dry-run",
        "--optim.lr=1e-3",
        "--world-size",
        "8",
    ]
    assert split_overrides(argv) == (
        ["train", "c.yaml", "--dry-run", "--world-size", "8"],
        ["--train.steps", "5", "--optim.lr=1e-3"],
    )


@pytest.mark.parametrize("level", [0, 1])
def test_library_warnings_hidden_ours_in_one_line(level):
    code = (
        "import logging, warnings\n"
        "from kfm_cli.output import quiet_libraries\n"
        f"quiet_libraries({level})\n"
        "warnings.warn_explicit('ours', UserWarning, 'kfm/x.py', 1, module='kfm.x')\n"
        "warnings.warn_explicit('theirs', UserWarning, 'y.py', 1, module='transformers.y')\n"
        "logging.getLogger('torchao').warning('library note')\n"
        "logging.getLogger('torchao').error('library error')\n"
        "logging.getLogger('kfm.data.pack').warning('our note')\n"
        "from deepspeed.utils import logger as ds\n"  # its own handler (stdout), propagate=False
        "ds.warning('deepspeed note')\n"
        "ds.error('deepspeed error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    if level == 0:  # the default console
        assert proc.stderr.splitlines() == [
            "warning: ours",
            "torchao: library error",
            "our note",
        ]
        assert "deepspeed note" not in proc.stdout and "deepspeed error" in proc.stdout
    else:  # -v: every warning, with Python's own format
        assert "theirs" in proc.stderr and "torchao: library note" in proc.stderr
        assert "deepspeed note" in proc.stdout


@pytest.mark.parametrize(
    ("module", "fix"),
    [
        ("datatrove", "pip install -e '.[data]'"),
        ("lm_eval", "pip install -e '.[eval]'"),
        ("gguf", "pip install -e '.[eval]'"),
        ("matplotlib", "pip install -e '.[eval]'"),
        ("torchao.float8", "pip install -e '.[gpu]'"),
        ("torch", "activate kfm's environment (.venv) or reinstall with `pip install -e .`"),
    ],
)
def test_a_missing_module_names_the_extra_that_installs_it(module, fix):
    from kfm_cli.errors import classify

    failure = classify(ModuleNotFoundError(f"No module named '{module}'", name=module))
    assert fix in failure.message and not failure.bug
