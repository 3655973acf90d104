"""`kfm train --dry-run` checks data, tokenizer and run directory before a run would hit them."""

from __future__ import annotations

import json
import shutil

from kfm_cli.main import main
from tests.conftest import REPO, tiny_overrides


def _dry_run(capsys, overrides):
    code = main(["train", str(REPO / "configs/tiny.yaml"), "--dry-run", *overrides])
    out, err = capsys.readouterr()
    checks = out.split("--- pre-flight", 1)[1].splitlines()[1:]
    return code, {line[5:].split(":", 1)[0]: line for line in checks}, err


def test_good_inputs_pass(capsys, tiny_sources, tmp_path):
    code, checks, err = _dry_run(capsys, tiny_overrides(tiny_sources, tmp_path / "runs", "ok"))
    assert code == 0, err
    assert set(checks) == {
        "data medquad",
        "data ko_chatbot",
        "validation",
        "tokenizer",
        "run directory",
    }
    assert all(line.startswith("ok") for line in checks.values()), checks
    assert "will be created" in checks["run directory"]
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing


def test_missing_shards_and_tokenizer_fail(capsys, tiny_sources, tmp_path):
    sources = [dict(tiny_sources[0]), {**tiny_sources[1], "path": str(tmp_path / "nowhere")}]
    overrides = tiny_overrides(sources, tmp_path / "runs", "bad")
    overrides.append(f"--tokenizer.path={tmp_path / 'no_tokenizer'}")
    code, checks, err = _dry_run(capsys, overrides)
    assert code == 1
    assert checks["data medquad"].startswith("ok")
    assert checks["data ko_chatbot"].startswith("FAIL") and "nowhere" in checks["data ko_chatbot"]
    assert checks["tokenizer"].startswith("FAIL") and "no_tokenizer" in checks["tokenizer"]
    assert "data ko_chatbot, tokenizer" in err


def test_tokenizer_that_did_not_pack_the_shards_fails(capsys, tiny_sources, tmp_path):
    tok = tmp_path / "other_tokenizer"
    shutil.copytree(REPO / "tests/assets/tokenizer", tok)
    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one merge less: another tokenizer
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    overrides = [*tiny_overrides(tiny_sources, tmp_path / "runs", "t"), f"--tokenizer.path={tok}"]
    code, checks, _ = _dry_run(capsys, overrides)
    assert code == 1
    assert (
        "not the tokenizer the shards of ko_chatbot, medquad were packed with"
        in (checks["tokenizer"])
    )


def test_vocab_too_small_for_the_tokenizer_fails(capsys, tiny_sources, tmp_path):
    overrides = [
        *tiny_overrides(tiny_sources, tmp_path / "runs", "v"),
        "--model.vocab_size=64",
        "--tokenizer.vocab_size=64",
    ]
    code, checks, _ = _dry_run(capsys, overrides)
    assert code == 1 and "--model.vocab_size to at least" in checks["tokenizer"]


def test_sequence_longer_than_a_source_fails(capsys, tiny_sources, tmp_path):
    overrides = [
        *tiny_overrides(tiny_sources, tmp_path / "runs", "s"),
        "--data.seq_len=16384",
        "--model.max_seq_len=16384",
    ]
    code, checks, _ = _dry_run(capsys, overrides)
    assert code == 1
    assert "no source has a full validation window of 16385" in checks["validation"]


def test_unwritable_run_root_fails(capsys, tiny_sources):
    # /proc refuses new files even to root, so the check cannot rely on permission bits.
    code, checks, _ = _dry_run(capsys, tiny_overrides(tiny_sources, "/proc/kfm_runs", "r"))
    assert code == 1 and "cannot write in /proc" in checks["run directory"]


def test_run_root_that_is_a_file_fails(capsys, tiny_sources, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, checks, _ = _dry_run(capsys, tiny_overrides(tiny_sources, tmp_path / "afile", "r"))
    assert code == 1 and "is not a directory" in checks["run directory"]
