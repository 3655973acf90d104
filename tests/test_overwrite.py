"""`--overwrite` replaces only kfm's own output of the same kind (kfm.fs.check_output_dir).

Every refusal goes through the real CLI and checks two things: the message names the path, and
the tree the command pointed at (inputs, run, checkpoints, unrelated folders) is byte-identical
afterwards. The accepted cases replace a genuine earlier output, and keep it when the new write
fails partway (an input that breaks after its first records).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfm import fs
from kfm_cli.main import main
from tests.conftest import REPO, SAMPLE, TOKENIZER, slice_jsonl, tiny_overrides

TINY = str(REPO / "configs" / "tiny.yaml")


def tree(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (itself included): sha256 of files, targets of symlinks, and
    directories, so a deleted, added or changed entry anywhere shows."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert found or root.is_dir(), f"{root} is missing"
    return found


def refused(capsys, argv: list[str], path: Path | str, why: str) -> str:
    """Run ``kfm argv``; assert it fails with one message naming ``path`` and ``why``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"kfm {' '.join(argv)} did not refuse"
    assert str(path) in err and why in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A corpus folder: two JSONL files and a note that is nobody's output."""
    folder = tmp_path / "raw"
    folder.mkdir()
    slice_jsonl(SAMPLE / "medquad.jsonl.gz", folder / "medquad.jsonl", 40)
    slice_jsonl(SAMPLE / "ko_chatbot.jsonl.gz", folder / "ko_chatbot.jsonl", 40)
    (folder / "README.txt").write_text("where this corpus came from\n")
    return folder


def broken_jsonl(path: Path, good_lines: int = 30) -> Path:
    """A JSONL file whose first ``good_lines`` records are fine and whose next line is not JSON:
    a reader gets partway through before it raises."""
    with gzip.open(SAMPLE / "medquad.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(good_lines)]
    path.write_text("".join(lines) + '{"text": "cut off\n', encoding="utf-8")
    return path


def pack_args(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["pack", *map(str, inputs), "--tokenizer", str(TOKENIZER), "--out", str(out), *extra]


def no_leftovers(folder: Path) -> None:
    """No temp or moved-aside directories left beside outputs."""
    left = [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


# ---- kfm pack -------------------------------------------------------------------------------


def test_pack_refuses_the_input_itself_inside_and_around_it(raw: Path, tmp_path: Path, capsys):
    before = tree(raw)
    files = sorted(raw.glob("*.jsonl"))
    refused(capsys, pack_args([raw], raw, "--overwrite"), raw, "is the input")
    refused(capsys, pack_args([raw], raw / "shards"), raw / "shards", "lies inside the input")
    refused(capsys, pack_args(files, raw, "--overwrite"), raw, "contains the input")
    # through a symlink: the link resolves to the corpus folder
    link = tmp_path / "link"
    link.symlink_to(raw)
    refused(capsys, pack_args(files, link, "--overwrite"), link, "contains the input")
    assert tree(raw) == before
    assert not (raw / "shards").exists()
    no_leftovers(tmp_path)


def test_pack_refuses_folders_that_are_not_its_output(raw: Path, tmp_path: Path, capsys):
    files = sorted(raw.glob("*.jsonl"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("three years of work\n")
    before = tree(notes)
    refused(capsys, pack_args(files, notes, "--overwrite"), notes, "is not a shard set made by kfm")
    assert tree(notes) == before

    tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok)
    before = tree(tok)
    refused(capsys, pack_args(files, tok, "--overwrite"), tok, "holds a kfm tokenizer, not a")
    assert tree(tok) == before
    # the tokenizer it reads is an input too
    refused(capsys, pack_args(files, TOKENIZER.parent, "--overwrite"), TOKENIZER.parent, "input")


def test_pack_overwrite_replaces_its_own_shard_set_only_once_the_new_one_is_complete(
    raw: Path, tmp_path: Path, capsys
):
    files = sorted(raw.glob("*.jsonl"))
    out = tmp_path / "shards"
    out.mkdir()  # an empty folder is a fine output without --overwrite
    assert main(pack_args(files[:1], out)) == 0
    first = tree(out)
    refused(capsys, pack_args(files, out), out, "already holds a kfm shard set; pass --overwrite")
    assert tree(out) == first

    # the new pack breaks partway through its second input: the old set stays, whole
    bad = broken_jsonl(tmp_path / "bad.jsonl")
    assert main(pack_args([files[0], bad], out, "--overwrite")) == 1
    assert f"{bad}:31" in capsys.readouterr().err
    assert tree(out) == first
    no_leftovers(tmp_path)

    assert main(pack_args(files, out, "--overwrite")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["inputs"] == [str(f) for f in files]
    assert tree(out) != first
    no_leftovers(tmp_path)


# ---- kfm tokenizer train --------------------------------------------------------------------


def tokenizer_args(inputs: list[Path], path: Path, *extra: str) -> list[str]:
    flow = "[" + ",".join(f"'{p}'" for p in inputs) + "]"  # argparse reads "--x=a b" as positional
    return [
        "tokenizer",
        "train",
        f"--tokenizer.inputs={flow}",
        f"--tokenizer.path={path}",
        "--tokenizer.vocab_size=400",
        "--tokenizer.n_reserved=0",
        *extra,
    ]


def test_tokenizer_refuses_an_input_folder_and_unrelated_folders(raw: Path, tmp_path, capsys):
    files = sorted(raw.glob("*.jsonl"))
    before = tree(raw)
    refused(capsys, tokenizer_args([raw], raw, "--overwrite"), raw, "is the input")
    refused(capsys, tokenizer_args(files, raw, "--overwrite"), raw, "contains the input")
    assert tree(raw) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "tokenizer.json").write_text("{}")  # looks like a tokenizer, but kfm did not make it
    (notes / "plan.md").write_text("keep me\n")
    before = tree(notes)
    refused(capsys, tokenizer_args(files, notes, "--overwrite"), notes, "is not a tokenizer made")
    assert tree(notes) == before


def test_tokenizer_overwrite_replaces_a_kfm_tokenizer_and_keeps_it_on_failure(
    raw: Path, tmp_path: Path, capsys
):
    files = sorted(raw.glob("*.jsonl"))
    out = tmp_path / "tok"
    assert main(tokenizer_args(files[:1], out)) == 0
    first = tree(out)
    capsys.readouterr()
    refused(capsys, tokenizer_args(files, out), out, "already holds a kfm tokenizer")

    bad = broken_jsonl(tmp_path / "bad.jsonl")
    assert main(tokenizer_args([files[0], bad], out, "--overwrite")) == 1
    assert f"{bad}:31" in capsys.readouterr().err
    assert tree(out) == first
    no_leftovers(tmp_path)

    assert main(tokenizer_args(files, out, "--overwrite")) == 0
    meta = json.loads((out / "kfm_tokenizer.json").read_text())
    assert meta["inputs"] == [str(f) for f in files]
    no_leftovers(tmp_path)


# ---- kfm export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_sources, tmp_path_factory) -> Path:
    """A finished two-step tiny run (one checkpoint) with its own copy of the tokenizer."""
    root = tmp_path_factory.mktemp("runs")
    tok = root.parent / "tokenizer"
    shutil.copytree(TOKENIZER, tok)
    args = [*tiny_overrides(tiny_sources, root, "r"), f"--tokenizer.path={tok}"]
    args += ["--train.steps=2", "--checkpoint.interval=2", "--eval.interval=2"]
    assert main(["train", TINY, *args]) == 0
    assert (root / "r" / "checkpoints" / "step_000002" / "manifest.json").is_file()
    return root / "r"


def export_args(run: Path, out: Path | str, *extra: str) -> list[str]:
    return ["export", str(run), str(out), "--no-verify", *extra]


def test_export_never_writes_over_the_run_or_its_checkpoints(run: Path, tiny_sources, capsys):
    before = tree(run.parent)
    ckpts = run / "checkpoints"
    step = ckpts / "step_000002"
    refused(capsys, export_args(run, run, "--overwrite"), run, "is a training run directory")
    refused(capsys, export_args(run, ckpts, "--overwrite"), ckpts, "checkpoints folder")
    refused(capsys, export_args(run, step, "--overwrite"), step, "is a checkpoint directory")
    refused(capsys, export_args(run, step / "hf"), step / "hf", "lies inside a checkpoint")
    refused(capsys, export_args(run, run.parent, "--overwrite"), run.parent, "contains the input")
    assert tree(run.parent) == before

    # the run's tokenizer and a shard set it trained on
    tok = run.parent.parent / "tokenizer"
    before_tok = tree(tok)
    refused(capsys, export_args(run, tok, "--overwrite"), tok, "is the input")
    assert tree(tok) == before_tok
    shards = Path(tiny_sources[0]["path"])
    before_shards = tree(shards)
    refused(capsys, export_args(run, shards, "--overwrite"), shards, "holds a kfm shard set")
    assert tree(shards) == before_shards


def test_export_overwrite_replaces_an_earlier_export_inside_the_run(run: Path, capsys):
    """What the quickstart does: RUN/export/hf, replaced on every run."""
    out = run / "export" / "hf"
    assert main(export_args(run, out)) == 0
    marker = json.loads((out / "kfm_export.json").read_text())
    assert marker["format"] == fs.EXPORT_FORMAT and marker["created_by"].startswith("kfm ")
    first = tree(out)
    refused(capsys, export_args(run, out), out, "already holds a kfm export; pass --overwrite")
    assert tree(out) == first

    (out / "marker-of-the-old-export").write_text("old")
    assert main(export_args(run, out, "--overwrite")) == 0
    assert not (out / "marker-of-the-old-export").exists()
    assert tree(out) == first  # same checkpoint, same bytes
    no_leftovers(out.parent)


def test_export_failing_midway_keeps_the_old_export(tmp_path: Path) -> None:
    """export_hf checks the state dict after the output check: a checkpoint of another shape
    fails there, and the earlier export is untouched."""
    import torch

    from kfm.config import ModelConfig
    from kfm.export import ExportError, export_hf
    from kfm.model import Transformer

    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    out = tmp_path / "hf"
    export_hf(Transformer(cfg).state_dict(), cfg, out, tokenizer_dir=None)
    first = tree(out)
    state = Transformer(cfg).state_dict()
    state["layers.0.attention.wq.weight"] = torch.zeros(8, 32)
    with pytest.raises(ExportError, match="shapes do not match"):
        export_hf(state, cfg, out, tokenizer_dir=None, overwrite=True)
    assert tree(out) == first
    no_leftovers(tmp_path)

    # an export made before kfm_export.json existed is still recognised by its model card
    (out / fs.EXPORT_MARKER).unlink()
    assert fs.output_kind(out) == "export"
    export_hf(Transformer(cfg).state_dict(), cfg, out, tokenizer_dir=None, overwrite=True)
    assert (out / fs.EXPORT_MARKER).is_file()


# ---- kfm data run ---------------------------------------------------------------------------


def pipeline_config(path: Path, out: Path, inputs: list[Path]) -> Path:
    """A small pipeline config: every input one source, the cheap steps only."""
    import yaml

    config = {
        "name": "t",
        "output_dir": str(out),
        "tasks": 2,
        "inputs": [{"name": "med", "format": "jsonl", "paths": [str(p) for p in inputs]}],
        "skip": ["langid", "quality", "korean_rules", "pii", "decontaminate", "minhash"],
        "pack": {"tokenizer": str(TOKENIZER), "train_tokenizer": False, "workers": 1},
        "executor": {"workers": 2},
        "card": {"train_preset": None},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def data_run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # a subprocess: datatrove's local executor starts a process pool per stage
    cmd = [sys.executable, "-m", "kfm_cli", "data", "run", str(config), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_data_run_refuses_an_output_dir_holding_its_inputs_or_other_files(raw: Path, tmp_path):
    pytest.importorskip("datatrove")
    before = tree(raw)
    inputs = [raw / "medquad.jsonl"]
    for out in (raw, tmp_path):  # the corpus folder itself; a folder that contains it
        proc = data_run(pipeline_config(tmp_path / "p.yaml", out, inputs), "--overwrite")
        assert proc.returncode == 1 and f"{out} contains the input" in proc.stderr, proc.stderr
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("not a pipeline output\n")
    # without --overwrite too: a rerun would mix its outputs into a folder it did not make
    proc = data_run(pipeline_config(tmp_path / "p.yaml", notes, inputs))
    assert proc.returncode == 1 and f"{notes} exists and is not a data run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(raw) == before and (notes / "a.txt").read_text() == "not a pipeline output\n"
    assert sorted(p.name for p in notes.iterdir()) == ["a.txt"]


def test_data_run_overwrite_keeps_the_old_output_until_the_new_run_completes(raw: Path, tmp_path):
    pytest.importorskip("datatrove")
    out = tmp_path / "curated"
    good = raw / "medquad.jsonl"
    proc = data_run(pipeline_config(tmp_path / "a.yaml", out, [good]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tree(out)
    kept = tmp_path / ".curated.replaced"

    # a new config whose second input is a gzip file cut short: task 1 fails partway
    data = gzip.compress((raw / "ko_chatbot.jsonl").read_bytes())
    bad = tmp_path / "ko.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    config = pipeline_config(tmp_path / "b.yaml", out, [good, bad])
    proc = data_run(config, "--overwrite")
    assert proc.returncode == 1 and "truncated gzip" in proc.stderr, proc.stderr[-3000:]
    assert f"previous output of {out} is kept at {kept}" in proc.stderr
    assert tree(kept) == first  # moved aside whole, not deleted

    # fixed input, same command without --overwrite: resumes, completes, drops the old output
    bad.write_bytes(data)
    proc = data_run(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not kept.exists()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["med"]["input_docs"] == 80
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["a.yaml", "b.yaml", "curated", "ko.jsonl.gz", "raw"]


# ---- the rule itself ------------------------------------------------------------------------


def test_markers_are_the_writers_own_names() -> None:
    """kfm.fs keeps copies of the writers' names (they import it); they must not drift."""
    from data_pipeline.card import CONFIG_NAME
    from kfm.checkpoint import stepdir
    from kfm.data import shards
    from kfm.tokenizer.core import METADATA_FILE
    from kfm.train.status import STATUS_FILE

    assert fs.SHARDS_FORMAT == shards.FORMAT and fs.MANIFEST == shards.MANIFEST_NAME
    assert fs.CHECKPOINT_FORMAT == stepdir.FORMAT and fs.MANIFEST == stepdir.MANIFEST
    assert fs.TOKENIZER_MARKER == METADATA_FILE
    assert fs.DATA_RUN_MARKER == CONFIG_NAME
    assert fs.RUN_STATUS == STATUS_FILE


def test_a_run_root_and_a_status_only_run_are_protected(tmp_path: Path) -> None:
    """A run that never saved a checkpoint still has status.json; a folder holding runs is
    refused whatever it otherwise looks like."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "status.json").write_text("{}")
    with pytest.raises(fs.OutputError, match="is a training run directory"):
        fs.check_output_dir(run, "export", overwrite=True)
    # a shard-set manifest in the run root does not make its runs deletable
    (tmp_path / "runs" / "manifest.json").write_text(json.dumps({"format": fs.SHARDS_FORMAT}))
    with pytest.raises(fs.OutputError, match=r"contains a training run directory .*runs/r"):
        fs.check_output_dir(tmp_path / "runs", "shard set", overwrite=True)
    assert (run / "status.json").read_text() == "{}"
