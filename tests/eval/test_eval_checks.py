"""`kfm eval` checks what `kfm train` checks, and never replaces an earlier result silently.

Refused: a tokenizer that is not the checkpoint's (same size, two ids swapped: only its hash
tells), shards packed with another tokenizer, both together; each names the files holding the
two hashes and the fix, exits 1 and writes nothing. Accepted: the run's own tokenizer, or a copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfm_cli import main
from tests.eval.checks import (
    STEP,
    copied_tokenizer,
    files_under,
    packed_with,
    swapped_tokenizer,
    tiny_run,
    unrecorded_copy,
)


@pytest.fixture(scope="module")
def run_dir(tiny_sources, tmp_path_factory) -> Path:
    return tiny_run(tiny_sources, tmp_path_factory).run_dir


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> dict[str, Path]:
    """Another tokenizer, shards packed with it, and shards packed with the run's own."""
    from tests.conftest import TOKENIZER

    root = tmp_path_factory.mktemp("other")
    tok = swapped_tokenizer(root / "swapped_tok")
    return {
        "tokenizer": tok,
        "shards": packed_with(tok, root / "swapped_shards"),
        "own_shards": packed_with(TOKENIZER, root / "own_shards"),
    }


def eval_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_another_tokenizer_is_refused(run_dir: Path, other: dict[str, Path], capsys) -> None:
    before = files_under(run_dir / "eval")
    code, out, err = eval_cli(capsys, str(run_dir), "--tokenizer", str(other["tokenizer"]))
    assert code == 1 and "validation loss" not in out
    manifest = run_dir / "checkpoints" / STEP / "manifest.json"
    assert f"--tokenizer {other['tokenizer']} is not the tokenizer this checkpoint" in err
    assert str(manifest) in err and str(other["tokenizer"] / "tokenizer.json") in err
    assert "tokenizer.path=" in err and "omit --tokenizer" in err
    assert "Traceback" not in err
    assert files_under(run_dir / "eval") == before


def test_shards_of_another_tokenizer_are_refused(
    run_dir: Path, other: dict[str, Path], capsys
) -> None:
    before = files_under(run_dir / "eval")
    code, out, err = eval_cli(capsys, str(run_dir), "--data", str(other["shards"]))
    assert code == 1 and "validation loss" not in out
    assert f"shard set {other['shards']} was packed with another tokenizer" in err
    assert str(other["shards"] / "manifest.json") in err and "kfm pack" in err
    assert files_under(run_dir / "eval") == before

    # Tokenizer and shards agree with each other, but not with the checkpoint.
    both = ["--data", str(other["shards"]), "--tokenizer", str(other["tokenizer"])]
    code, _, err = eval_cli(capsys, str(run_dir), *both)
    assert code == 1 and "is not the tokenizer this checkpoint was trained with" in err
    assert files_under(run_dir / "eval") == before


def test_copy_of_the_tokenizer_and_own_shards_are_accepted(
    run_dir: Path, other: dict[str, Path], tmp_path: Path, capsys
) -> None:
    copy = copied_tokenizer(tmp_path / "tok_copy")
    code, out, err = eval_cli(capsys, str(run_dir), "--tokenizer", str(copy))
    assert code == 0, err
    assert f"tokenizer {copy} (hash " in out and "manifest.json and 2 shard set" in out
    assert "bits/byte" in out

    code, out, err = eval_cli(capsys, str(run_dir), "--data", str(other["own_shards"]))
    assert code == 0, err
    result_line = [line for line in out.splitlines() if line.startswith("result: ")]
    assert result_line and result_line[0].startswith(f"result: {run_dir / 'eval' / STEP}-")
    result = json.loads(Path(result_line[0].split()[1]).read_text())
    assert result["settings"]["data"] == [str(other["own_shards"].resolve())]
    assert result["val_tokens"] > 0


def test_results_are_never_replaced_by_other_settings(run_dir: Path, capsys) -> None:
    eval_dir = run_dir / "eval"
    default = eval_dir / f"{STEP}.json"
    code, out, _ = eval_cli(capsys, str(run_dir))
    assert code == 0 and out.splitlines()[-1] in (f"result: {default}", f"result: {default} "
                                                  "(replaced the earlier result of the same settings)")  # fmt: skip
    first = json.loads(default.read_text())
    assert first["settings"]["batches"] == 2  # eval.batches of configs/tiny.yaml

    # Other settings: a file of their own, the run's result untouched.
    kept = default.read_bytes()
    code, out, _ = eval_cli(capsys, str(run_dir), "--batches", "1")
    assert code == 0
    other_file = Path(out.splitlines()[-1].removeprefix("result: "))
    assert other_file.parent == eval_dir and other_file.name.startswith(f"{STEP}-")
    assert json.loads(other_file.read_text())["settings"]["batches"] == 1
    assert default.read_bytes() == kept

    # The same settings again: replaced (same numbers), and said so.
    code, out, _ = eval_cli(capsys, str(run_dir))
    assert code == 0
    assert out.splitlines()[-1] == (
        f"result: {default} (replaced the earlier result of the same settings)"
    )
    again = json.loads(default.read_text())
    assert again["val_loss"] == first["val_loss"] and again["settings"] == first["settings"]

    # A result an earlier kfm wrote (no settings recorded) is kept, and the message says how.
    legacy = {"checkpoint": first["checkpoint"], "sources": first["sources"], "val_loss": 1.0}
    default.write_text(json.dumps(legacy))
    code, out, err = eval_cli(capsys, str(run_dir))
    assert code == 1 and "validation loss" not in out
    assert f"{default} records no settings" in err and "move or delete it" in err
    assert json.loads(default.read_text()) == legacy


def test_checkpoint_without_recorded_tokenizer(
    run_dir: Path, other: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """Older checkpoints: the run's shard sets stand in for the checkpoint's record; with those
    gone too, eval runs but says that the tokenizer was not checked."""
    step = unrecorded_copy(run_dir, tmp_path / "old", sources_gone=False)
    code, _, err = eval_cli(capsys, str(step), "--tokenizer", str(other["tokenizer"]))
    assert code == 1 and "is not the tokenizer this checkpoint was trained with" in err
    shard_manifest = Path(json.loads((step / "manifest.json").read_text())["config"]["data"]
                          ["sources"][0]["path"]) / "manifest.json"  # fmt: skip
    assert f"{shard_manifest} records" in err

    step = unrecorded_copy(run_dir, tmp_path / "older", sources_gone=True)
    code, out, err = eval_cli(capsys, str(step), "--data", str(other["own_shards"]))
    assert code == 0, err
    assert "warning: tokenizer" in err and "NOT checked" in err and "matches" not in out
    # the shards were still checked against the tokenizer used
    code, _, err = eval_cli(capsys, str(step), "--data", str(other["shards"]))
    assert code == 1 and "was packed with another tokenizer" in err
