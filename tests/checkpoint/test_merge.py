"""`kfm merge` (kfm/checkpoint/merge.py) on real tiny checkpoints: the average equals the mean of
the checkpoints' tensors, `kfm eval` and `kfm export` take the output, torchrun gives the same
bytes as one process, and the refusals name what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import load_model_state, read_manifest
from kfm.fs import MERGE_MARKER
from kfm_cli.main import main
from tests.conftest import REPO
from tests.parallel.harness import Run, shared_root
from tests.train.test_ema import STEPS, ema_run


@pytest.fixture(scope="module")
def run(tiny_sources, tmp_path_factory) -> Run:
    """configs/tiny.yaml, 6 steps, a checkpoint every step, weight EMA on (tests/train/test_ema)."""
    return ema_run(tiny_sources, shared_root(tmp_path_factory))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model_state(path)[0]


def _step_dir(out: Path, step: int = STEPS) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def test_last_k_is_the_mean_of_their_weights(run, tmp_path, capsys):
    out = tmp_path / "last3"
    assert main(["merge", str(run.run_dir), "--last", "3", "--out", str(out)]) == 0
    assert "model weights of 3 checkpoint(s) (steps 4, 5, 6)" in capsys.readouterr().out
    got = _weights(_step_dir(out))
    a, b, c = (_weights(run.checkpoint(s)) for s in (4, 5, 6))
    assert got.keys() == a.keys()
    for k in got:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], ((a[k] + b[k]) + c[k]) / 3)  # same fp32 operations: bitwise
        torch.testing.assert_close(
            got[k], torch.stack([a[k], b[k], c[k]]).mean(0), rtol=0, atol=1e-7
        )
    manifest = read_manifest(_step_dir(out))
    source = read_manifest(run.checkpoint(STEPS))
    assert manifest["has_optimizer"] is False
    assert manifest["tokenizer_hash"] == source["tokenizer_hash"]
    assert manifest["config"] == source["config"]
    assert manifest["merged_from"]["steps"] == [4, 5, 6]
    assert json.loads((out / MERGE_MARKER).read_text())["weights"] == "model"


def test_steps_pick_the_checkpoints(run, tmp_path):
    out = tmp_path / "two"
    assert (
        main(["merge", str(run.run_dir / "checkpoints"), "--steps", "4,2", "--out", str(out)]) == 0
    )
    got = _weights(_step_dir(out, 4))  # named after the newest merged step
    a, b = _weights(run.checkpoint(2)), _weights(run.checkpoint(4))
    assert all(torch.equal(got[k], (a[k] + b[k]) / 2) for k in got)


def test_kfm_eval_and_export_take_the_merge(run, tmp_path, capsys):
    from eval.run import evaluate_checkpoint

    out = tmp_path / "merged"
    assert main(["merge", str(run.run_dir), "--last", "2", "--out", str(out)]) == 0
    result = evaluate_checkpoint(out)  # a run-like folder: its newest checkpoint
    assert result["checkpoint"] == str(_step_dir(out))
    assert Path(result["result_file"]).parent == out / "eval"
    # Averaging steps 5 and 6 gives a model of its own, as good as its neighbours on this data.
    trained = evaluate_checkpoint(run.checkpoint(STEPS))
    assert result["val_bpb"] != trained["val_bpb"]
    assert abs(result["val_bpb"] - trained["val_bpb"]) < 0.2
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    assert "export check: max |logits_kfm - logits_hf|" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.distributed
def test_torchrun_merge_equals_one_process(run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["merge", str(run.run_dir), "--last", "3", "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "kfm_cli", "merge", str(run.run_dir), "--last", "3", "--out", str(two)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(_step_dir(two))["world_size"] == 2  # each rank wrote its shard
    a, b = _weights(_step_dir(one)), _weights(_step_dir(two))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _copy_with(src: Path, root: Path, step: int, change) -> Path:
    """A copy of checkpoint ``src`` as ``root/checkpoints/step_<step>`` with its manifest edited
    by ``change(manifest)`` (the files it lists are untouched, so it still validates)."""
    dst = root / "checkpoints" / f"step_{step:06d}"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["step"] = step
    change(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _refusal(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    return capsys.readouterr().err


def test_refusals_name_the_problem(run, tmp_path, capsys):
    ckpt = run.checkpoint(STEPS)
    err = _refusal(capsys, ["merge", str(run.run_dir), "--last", "7", "--out", str(tmp_path / "x")])
    assert (
        "--last 7 but" in err and "holds 6 complete checkpoint(s) (steps 1, 2, 3, 4, 5, 6)" in err
    )
    err = _refusal(
        capsys, ["merge", str(run.run_dir), "--steps", "2,9", "--out", str(tmp_path / "x")]
    )
    assert "no complete checkpoint of step(s) 9" in err
    err = _refusal(capsys, ["merge", str(run.run_dir), "--out", str(tmp_path / "x")])
    assert "--last K" in err and "--steps" in err

    # Another tokenizer, another architecture, no EMA: each named with both paths.
    other = tmp_path / "other_tok"
    _copy_with(ckpt, other, 1, lambda m: None)
    bad = _copy_with(ckpt, other, 2, lambda m: m.update(tokenizer_hash="0" * 64))
    err = _refusal(capsys, ["merge", str(other), "--last", "2", "--out", str(tmp_path / "x")])
    assert "tokenizer_hash" in err and str(bad) in err and "step_000001" in err

    def wider(m):
        m["config"]["model"]["d_model"] = 128

    arch = tmp_path / "other_arch"
    _copy_with(ckpt, arch, 1, lambda m: None)
    bad = _copy_with(ckpt, arch, 2, wider)
    err = _refusal(capsys, ["merge", str(arch), "--last", "2", "--out", str(tmp_path / "x")])
    assert "model.d_model=64" in err and "model.d_model=128" in err and str(bad) in err

    no_ema = tmp_path / "no_ema"
    _copy_with(ckpt, no_ema, 1, lambda m: m.pop("has_ema"))
    err = _refusal(capsys, ["merge", str(no_ema), "--ema", "--out", str(tmp_path / "x")])
    assert "holds no weight EMA" in err
    assert not (tmp_path / "x").exists()  # nothing written by any refusal

    # OUT exists: refused without --overwrite, replaced with it; never a folder kfm did not make.
    out = tmp_path / "merged"
    assert main(["merge", str(run.run_dir), "--last", "1", "--out", str(out)]) == 0
    err = _refusal(capsys, ["merge", str(run.run_dir), "--last", "2", "--out", str(out)])
    assert "already holds a kfm merge; pass --overwrite" in err
    argv = ["merge", str(run.run_dir), "--last", "2", "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    assert read_manifest(_step_dir(out))["merged_from"]["steps"] == [5, 6]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    base = argv[:4]  # merge RUN --last 2
    err = _refusal(capsys, [*base, "--out", str(mine), "--overwrite"])
    assert "is not a merge made by kfm" in err and (mine / "notes.txt").exists()
    err = _refusal(capsys, [*base, "--out", str(run.run_dir / "checkpoints")])
    assert "never writes a merge" in err
