"""Save/load round trips, retention, the latest symlink, validation and config checks."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kfm.checkpoint import (
    CheckpointError,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    resolve_checkpoint_arg,
    save_checkpoint,
    validate_checkpoint,
)
from kfm.config import Config, OptimConfig, ScheduleConfig, to_dict
from kfm.train.optim import build_optimizer, build_scheduler

CONFIG = to_dict(Config())


def _setup(make_model, seed: int = 0):
    model = make_model(seed)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), total_steps=20)
    return model, opt, sched


def _save(root: Path, step: int, model, opt, sched=None, **kw) -> Path:
    state = {"scheduler": sched.state_dict()} if sched is not None else {}
    return save_checkpoint(
        root, step, model=model, optimizer=opt, trainer_state=state, config=CONFIG, **kw
    )


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def _assert_bitwise(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def test_round_trip_is_bitwise_and_training_continues_identically(
    tmp_path, make_model, train_steps
) -> None:
    root = tmp_path / "checkpoints"
    model, opt, sched = _setup(make_model)
    train_steps(model, opt, sched, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    saved_opt = {
        "state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved_opt["state"].items()}
    }
    path = _save(root, 3, model, opt, sched)
    assert path == root / "step_000003"
    random_after_save = (random.random(), float(np.random.rand()))

    train_steps(model, opt, sched, 4)  # the uninterrupted run
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    resumed, opt2, sched2 = _setup(make_model, seed=99)  # different init and RNG position
    random.random(), np.random.rand()
    trainer_state = load_checkpoint(path, model=resumed, optimizer=opt2, config=CONFIG)
    assert (random.random(), float(np.random.rand())) == random_after_save  # RNGs restored
    assert trainer_state["step"] == 3
    sched2.load_state_dict(trainer_state["scheduler"])
    _assert_bitwise(resumed.state_dict(), saved_model)
    _assert_bitwise({"state": opt2.state_dict()["state"]}, saved_opt)
    assert sched2.last_epoch == 3

    train_steps(resumed, opt2, sched2, 4)
    _assert_bitwise(resumed.state_dict(), reference)


def test_learning_rates_and_group_names_restored(tmp_path, make_model, train_steps) -> None:
    model, opt, sched = _setup(make_model)
    train_steps(model, opt, sched, 2)
    path = _save(tmp_path, 2, model, opt, sched)
    model2, opt2, _ = _setup(make_model, seed=5)
    load_checkpoint(path, model=model2, optimizer=opt2)
    fields = ("name", "lr", "weight_decay", "betas", "initial_lr")
    assert [{f: g[f] for f in fields} for g in opt2.param_groups] == [
        {f: g[f] for f in fields} for g in opt.param_groups
    ]


def test_manifest_contents(tmp_path, make_model) -> None:
    model, opt, sched = _setup(make_model)
    path = _save(tmp_path, 7, model, opt, sched)
    manifest = validate_checkpoint(path)
    assert manifest == json.loads((path / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["step"]) == ("kfm-checkpoint", 1, 7)
    assert manifest["world_size"] == 1
    assert manifest["config"] == CONFIG
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {".metadata", "trainer_state_rank0.pt"} <= on_disk
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (path / rel).stat().st_size


def test_keep_last_and_latest_symlink(tmp_path, make_model, train_steps) -> None:
    model, opt, sched = _setup(make_model)
    for step in (1, 2, 3, 4):
        train_steps(model, opt, sched, 1)
        _save(tmp_path, step, model, opt, sched, keep_last=2)
        latest = tmp_path / "latest"
        assert latest.is_symlink() and os.readlink(latest) == f"step_{step:06d}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert resolve_checkpoint_arg(tmp_path / "latest").name == "step_000004"

    _save(tmp_path, 5, model, opt, sched)  # keep_last=0 keeps everything
    assert len(list_checkpoints(tmp_path)) == 3


def test_resave_same_step_replaces_it(tmp_path, make_model, train_steps) -> None:
    model, opt, sched = _setup(make_model)
    first = _save(tmp_path, 2, model, opt, sched)
    train_steps(model, opt, sched, 1)
    second = _save(tmp_path, 2, model, opt, sched)
    assert first == second
    weights, _ = load_model_state(second)
    _assert_bitwise(weights, model.state_dict())
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _corrupt(kind: str, path: Path) -> Path:
    """Damage checkpoint ``path``; return the file that is now bad."""
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    if kind == "no_manifest":
        (path / "manifest.json").unlink()
        return path / "manifest.json"
    if kind == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 3)
        return shard
    if kind == "altered":  # same size, one byte flipped: only the hash sees it
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return shard
    if kind == "missing_file":
        (path / "trainer_state_rank0.pt").unlink()
        return path / "trainer_state_rank0.pt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_manifest", "truncated", "altered", "missing_file"])
def test_bad_checkpoints_are_skipped_and_named(
    tmp_path, make_model, train_steps, kind: str
) -> None:
    model, opt, sched = _setup(make_model)
    good = _save(tmp_path, 1, model, opt, sched)
    train_steps(model, opt, sched, 1)
    bad = _save(tmp_path, 2, model, opt, sched)
    assert find_latest_valid(tmp_path) == bad
    bad_file = _corrupt(kind, bad)

    with pytest.raises(CheckpointError, match=str(bad_file)):
        validate_checkpoint(bad)
    assert find_latest_valid(tmp_path) == good
    assert resolve_checkpoint_arg(tmp_path) == good
    with pytest.raises(CheckpointError):
        load_checkpoint(bad, model=model, optimizer=opt)
    if kind == "altered":  # proves the hash, not the size, caught it
        validate_checkpoint(bad, verify_hashes=False)


def test_tmp_dir_is_never_a_candidate_and_is_cleaned_up(tmp_path, make_model) -> None:
    model, opt, sched = _setup(make_model)
    good = _save(tmp_path, 1, model, opt, sched)
    # A complete-looking copy under a tmp name, as if killed right before the rename.
    dead_pid = 2**22 + 12345  # above Linux's default pid_max (4194304): no such process
    stale = tmp_path / f"step_000002.tmp-{dead_pid}"
    shutil.copytree(good, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["step"] = 2
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert find_latest_valid(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    with pytest.raises(CheckpointError, match="interrupted"):
        validate_checkpoint(stale)

    _save(tmp_path, 3, model, opt, sched)
    assert not stale.exists()


def test_config_mismatch_lists_each_model_key(tmp_path, make_model) -> None:
    model, opt, sched = _setup(make_model)
    path = _save(tmp_path, 10, model, opt, sched)
    other = to_dict(Config())
    other["model"]["d_model"] = 128
    other["model"]["n_layers"] = 2
    other["optim"]["lr"] = 1.0  # not an architecture key: allowed to differ
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=model, optimizer=opt, config=other)
    message = str(info.value)
    assert (
        f"checkpoint {path} was saved with model.d_model=256 but the config has model.d_model=128"
        in message
    )
    assert "model.n_layers=4 but the config has model.n_layers=2" in message
    assert "--checkpoint.resume=never" in message
    assert "optim" not in message
    # The same difference is accepted when only optim would be checked... and caught if it is.
    load_checkpoint(path, model=model, optimizer=opt, config=other, strict_config_keys=())
    with pytest.raises(CheckpointError, match=r"optim.lr=0.0003 but the config has optim.lr=1.0"):
        load_checkpoint(
            path, model=model, optimizer=opt, config=other, strict_config_keys=("optim",)
        )


def test_shape_mismatch_is_a_checkpoint_error(tmp_path, make_model) -> None:
    model, opt, sched = _setup(make_model)
    path = _save(tmp_path, 1, model, opt, sched)
    wider = make_model(0, width=12)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=wider, optimizer=None)


def test_load_model_state_without_model_or_optimizer(tmp_path, make_model, train_steps) -> None:
    model, opt, sched = _setup(make_model)
    train_steps(model, opt, sched, 2)
    path = _save(tmp_path, 2, model, opt, sched)
    weights, config = load_model_state(path)
    expected = model.state_dict()
    assert set(weights) == set(expected)  # tied output.weight included under its own name
    for name, tensor in expected.items():
        assert weights[name].device.type == "cpu"
        assert torch.equal(weights[name], tensor), name
    assert config == CONFIG


def test_model_only_checkpoint(tmp_path, make_model) -> None:
    model = make_model(3)
    path = save_checkpoint(
        tmp_path, 0, model=model, optimizer=None, trainer_state={}, config=CONFIG
    )
    fresh = make_model(4)
    load_checkpoint(path, model=fresh, optimizer=None)
    _assert_bitwise(fresh.state_dict(), model.state_dict())
    _, opt, _ = _setup(make_model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model=fresh, optimizer=opt)


def test_resolve_checkpoint_arg(tmp_path, make_model) -> None:
    model, opt, sched = _setup(make_model)
    run = tmp_path / "runs" / "x"
    root = run / "checkpoints"
    _save(root, 1, model, opt, sched)
    newest = _save(root, 2, model, opt, sched)
    assert resolve_checkpoint_arg(run) == newest
    assert resolve_checkpoint_arg(root) == newest
    assert resolve_checkpoint_arg(root / "step_000001") == root / "step_000001"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_arg(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint under"):
        resolve_checkpoint_arg(tmp_path / "empty")
    (root / "step_000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="did not finish"):
        resolve_checkpoint_arg(root / "step_000001")


def test_unserialisable_config_is_rejected_before_writing(tmp_path, make_model) -> None:
    model, opt, _ = _setup(make_model)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(
            tmp_path, 1, model=model, optimizer=opt, trainer_state={}, config={"x": object()}
        )
    assert list(tmp_path.iterdir()) == []
