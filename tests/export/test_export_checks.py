"""`kfm export` ships only the tokenizer the checkpoint was trained with, and says what it checked.

The logits check compares weights only: a tokenizer with two ids swapped (same size, same
specials) passes it and would decode the model's outputs to the wrong text. It is refused
before anything is written; a copy of the right tokenizer is accepted; a checkpoint that cannot
be checked exports with a warning, never with "ok" for the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfm_cli import main
from tests.eval.checks import (
    STEP,
    copied_tokenizer,
    larger_tokenizer,
    swapped_tokenizer,
    tiny_run,
    unrecorded_copy,
)


@pytest.fixture(scope="module")
def run_dir(tiny_sources, tmp_path_factory) -> Path:
    return tiny_run(tiny_sources, tmp_path_factory).run_dir


def export_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_another_tokenizer_is_refused_before_writing(run_dir: Path, tmp_path: Path, capsys) -> None:
    other = swapped_tokenizer(tmp_path / "swapped_tok")
    out_dir = tmp_path / "hf"
    code, out, err = export_cli(capsys, str(run_dir), str(out_dir), "--tokenizer", str(other))
    assert code == 1 and "exported" not in out
    manifest = run_dir / "checkpoints" / STEP / "manifest.json"
    assert f"--tokenizer {other} is not the tokenizer this checkpoint was trained with" in err
    assert str(manifest) in err and str(other / "tokenizer.json") in err
    assert "omit --tokenizer" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [other]  # no output folder, no leftover .tmp


def test_copy_of_the_tokenizer_exports_and_says_what_was_checked(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    copy = copied_tokenizer(tmp_path / "tok_copy")
    out_dir = tmp_path / "hf"
    code, out, err = export_cli(
        capsys, str(run_dir), str(out_dir), "--tokenizer", str(copy), "--no-verify"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert f"exported {run_dir / 'checkpoints' / STEP} -> {out_dir}" in lines
    manifest = run_dir / "checkpoints" / STEP / "manifest.json"
    assert any(
        line.startswith(f"export check: tokenizer {copy} (hash ")
        and line.endswith(f"matches {manifest}: ok")
        for line in lines
    ), out
    # --no-verify: the logits line says it was not compared, and no "ok" is claimed for it
    assert "export check: logits not compared with kfm's (--no-verify)" in lines
    assert not any("logits" in line and line.endswith("ok") for line in lines)
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    assert (
        tok["model"]["vocab"] == json.loads((copy / "tokenizer.json").read_text())["model"]["vocab"]
    )


def test_unrecorded_checkpoint_exports_with_a_warning(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    step = unrecorded_copy(run_dir, tmp_path / "old", sources_gone=True)
    out_dir = tmp_path / "hf"
    code, out, err = export_cli(capsys, str(step), str(out_dir), "--no-verify")
    assert code == 0, err
    assert "export check: warning: tokenizer" in err and "NOT checked" in err
    assert "tokenizer" not in out.replace(f"exported {step}", "")  # nothing claims it matched
    assert (out_dir / "model.safetensors").is_file()

    # With the run's shard sets still there, they stand in for the checkpoint's record.
    step = unrecorded_copy(run_dir, tmp_path / "older", sources_gone=False)
    other = swapped_tokenizer(tmp_path / "swapped_tok")
    code, _, err = export_cli(capsys, str(step), str(tmp_path / "hf2"), "--tokenizer", str(other))
    assert code == 1 and "is not the tokenizer this checkpoint was trained with" in err
    assert "shards" in err and not (tmp_path / "hf2").exists()


def test_tokenizer_larger_than_the_model_is_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    """With no hash to compare (old checkpoint, shard sets gone) the size still tells."""
    step = unrecorded_copy(run_dir, tmp_path / "old", sources_gone=True)
    big = larger_tokenizer(tmp_path / "big_tok")
    code, out, err = export_cli(capsys, str(step), str(tmp_path / "hf"), "--tokenizer", str(big))
    assert code == 1 and "exported" not in out
    assert f"--tokenizer {big} has 1025 tokens but this checkpoint's model.vocab_size=1024" in err
    assert not (tmp_path / "hf").exists()


def test_quiet_export_prints_only_its_result(
    run_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("KFM_VERBOSITY", "0")  # restored after the test: -q sets it for children
    out_dir = tmp_path / "hf"
    code = main(["-q", "export", str(run_dir), str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == [f"exported {run_dir / 'checkpoints' / STEP} -> {out_dir}"]
    assert err == ""
