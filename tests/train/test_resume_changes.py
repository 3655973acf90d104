"""Resume is explicit about changes: every config difference from the checkpoint is listed; the
schedule and optimizer follow the new config from the resume step; changes that cannot apply
(model, data order, changed shards) are refused unless ``--checkpoint.force_resume``; a run
already at ``train.steps`` says there is nothing to do.

Runs train in this process (`kfm.train.trainer.train`), 1 thread, on configs/tiny.yaml.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import CheckpointError, read_manifest
from kfm.config import ConfigError, load_config
from kfm.data.shards import load_manifest
from kfm.tokenizer import tokenizer_hash
from kfm.train.backends.fsdp import FSDPBackend
from kfm.train.dist import WorldInfo
from kfm.train.optim import lr_at
from kfm.train.resume import shard_set_fingerprint
from kfm.train.trainer import train
from tests.conftest import REPO, TOKENIZER, tiny_overrides

STEPS, CKPT_AT = 12, 6


def run(sources: list[dict], root: Path, name: str, *extra: str) -> dict:
    """Train configs/tiny.yaml as run ``name`` (checkpoint every CKPT_AT steps, no eval)."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *tiny_overrides(sources, root, name),
            f"--train.steps={STEPS}",
            f"--checkpoint.interval={CKPT_AT}",
            "--eval.interval=0",
            *extra,
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_sources, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps (checkpoints at CKPT_AT and STEPS)."""
    root = tmp_path_factory.mktemp("resume_changes")
    run(tiny_sources, root, "straight")
    return root / "straight"


def test_checkpoint_manifest_records_tokenizer_and_data(straight, tiny_sources) -> None:
    manifest = read_manifest(straight / "checkpoints" / f"step_{CKPT_AT:06d}")
    assert manifest["tokenizer_hash"] == tokenizer_hash(TOKENIZER)
    assert manifest["data_fingerprint"] == {
        s["name"]: shard_set_fingerprint(load_manifest(s["path"])) for s in tiny_sources
    }
    assert len(set(manifest["data_fingerprint"].values())) == len(tiny_sources)


def test_new_lr_follows_the_new_schedule_from_the_resume_step(
    straight, tiny_sources, tmp_path, capsys
) -> None:
    ckpt = straight / "checkpoints" / f"step_{CKPT_AT:06d}"
    run(
        tiny_sources,
        tmp_path,
        "cooldown",
        f"--checkpoint.resume={ckpt}",
        "--optim.lr=2e-3",
        "--checkpoint.keep_last=1",
    )
    out = capsys.readouterr().out
    assert "optim.lr: 0.004 -> 0.002 (applies from the resume step)" in out
    assert "checkpoint.keep_last: 3 -> 1 (applies)" in out
    assert "checkpoint.resume:" in out  # every difference is listed, one line per key

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"--train.steps={STEPS}"])
    new = {r["step"]: r["lr"] for r in records(tmp_path / "cooldown") if "lr" in r}
    old = {r["step"]: r["lr"] for r in records(straight) if "lr" in r}
    assert sorted(new) == list(range(CKPT_AT + 1, STEPS + 1))
    for step in new:  # the update of step s follows s - 1 optimizer steps
        want = lr_at(step - 1, total_steps=STEPS, peak_lr=2e-3, cfg=cfg.schedule)
        assert new[step] == pytest.approx(want, rel=1e-12)
        assert old[step] == pytest.approx(2 * want, rel=1e-12)  # the old peak was 4e-3


def test_cooldown_starts_from_a_stable_phase_checkpoint(tiny_sources, tmp_path, capsys) -> None:
    """WSD with no decay in sight (decay_fraction=0), then a resume of its step-CKPT_AT checkpoint
    with a 4-step 1-sqrt cooldown: the lr of every later step is the new schedule's."""
    stable = ("--schedule.name=wsd", "--schedule.decay_fraction=0", "--schedule.warmup_steps=2")
    run(tiny_sources, tmp_path, "stable", *stable)
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "stable") if "lr" in r}
    assert [lrs[s] for s in range(3, STEPS + 1)] == [4e-3] * (STEPS - 2)  # never decays
    ckpt = tmp_path / "stable" / "checkpoints" / f"step_{CKPT_AT:06d}"
    total, cooldown = CKPT_AT + 4, ("--schedule.decay_steps=4", "--schedule.decay_shape=1-sqrt")
    run(
        tiny_sources,
        tmp_path,
        "cooled",
        *stable,
        *cooldown,
        f"--checkpoint.resume={ckpt}",
        f"--train.steps={total}",
    )
    out = capsys.readouterr().out
    assert "schedule.decay_steps: 0 -> 4 (applies from the resume step)" in out
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*stable, *cooldown, f"--train.steps={total}"]
    )
    new = {r["step"]: r["lr"] for r in records(tmp_path / "cooled") if "lr" in r}
    assert sorted(new) == list(range(CKPT_AT + 1, total + 1))
    for step in new:  # the update of step s follows s - 1 optimizer steps
        want = lr_at(step - 1, total_steps=total, peak_lr=4e-3, cfg=cfg.schedule)
        assert new[step] == pytest.approx(want, rel=1e-12)
    assert new[CKPT_AT + 1] == pytest.approx(4e-3) and new[total] < 2e-3  # 1-sqrt: fast fall


def _backend(cfg_overrides: list[str], sources: list[dict], root: Path) -> FSDPBackend:
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*tiny_overrides(sources, root, "unit"), "--checkpoint.async_save=false", *cfg_overrides],
    )
    return FSDPBackend(cfg, WorldInfo(rank=0, world_size=1, local_rank=0), torch.device("cpu"))


def test_loaded_param_groups_take_the_new_optimizer_config(tiny_sources, tmp_path) -> None:
    from kfm.data import PackedLoader

    first = _backend([], tiny_sources, tmp_path)
    cfg = first.cfg
    loader = PackedLoader(
        cfg.data.sources, seq_len=cfg.data.seq_len, micro_batch_size=4, seed=cfg.data.seed
    )
    for _ in range(3):
        first.step(loader)
    first.save(3, {"step": 3, "loader": loader.state_dict()})
    first.wait()
    path = tmp_path / "unit" / "checkpoints" / "step_000003"
    saved = [dict(g, params=None) for g in first.optimizer.param_groups]
    first.close()

    same = _backend([], tiny_sources, tmp_path)
    same.load(path)
    assert [dict(g, params=None) for g in same.optimizer.param_groups] == saved  # bitwise
    same.close()

    new = _backend(
        ["--optim.lr=1e-3", "--optim.weight_decay=0.05", "--optim.betas=[0.8,0.9]"],
        tiny_sources,
        tmp_path,
    )
    new.load(path)
    want = lr_at(3, total_steps=cfg.train.steps, peak_lr=1e-3, cfg=cfg.schedule)
    groups = {g["name"]: g for g in new.optimizer.param_groups}
    for g in groups.values():
        assert g["lr"] == pytest.approx(want, rel=1e-12)
        assert g["initial_lr"] == 1e-3 and g["betas"] == (0.8, 0.9)
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert new.scheduler.last_epoch == 3 and new.scheduler.get_last_lr()[0] == groups["decay"]["lr"]
    # The moments are the checkpoint's.
    state = next(iter(new.optimizer.state.values()))
    assert int(state["step"]) == 3
    new.close()


def test_model_change_is_refused_naming_the_key(straight, tiny_sources, tmp_path) -> None:
    ckpt = straight / "checkpoints" / f"step_{CKPT_AT:06d}"
    with pytest.raises(ConfigError) as e:
        run(tiny_sources, tmp_path, "wider", f"--checkpoint.resume={ckpt}", "--model.d_model=128")
    message = str(e.value)
    assert f"cannot resume {ckpt}" in message
    assert "model.d_model: 64 -> 128 (cannot change mid-run" in message
    assert "--checkpoint.force_resume=true" in message
    assert "optim" not in message  # only the refused keys
    assert not (tmp_path / "wider" / "config.yaml").exists()  # nothing recorded for a refusal

    forced = (
        f"--checkpoint.resume={ckpt}",
        "--model.d_model=128",
        "--checkpoint.force_resume=true",
    )
    with pytest.raises(CheckpointError, match="does not fit this model"):
        run(tiny_sources, tmp_path, "wider", *forced)


def test_forced_change_of_the_data_order_restarts_the_loader(
    straight, tiny_sources, tmp_path, capsys
) -> None:
    ckpt = straight / "checkpoints" / f"step_{CKPT_AT:06d}"
    with pytest.raises(ConfigError, match=r"data.seed: 1234 -> 7 \(cannot change mid-run"):
        run(tiny_sources, tmp_path, "reseeded", f"--checkpoint.resume={ckpt}", "--data.seed=7")
    summary = run(
        tiny_sources,
        tmp_path,
        "reseeded",
        f"--checkpoint.resume={ckpt}",
        "--data.seed=7",
        "--checkpoint.force_resume=true",
    )
    assert (summary["start_step"], summary["steps_done"]) == (CKPT_AT, STEPS)
    assert "the data order restarts from its first sample" in capsys.readouterr().out


def test_repacked_shards_are_refused_then_accepted_when_forced(
    tiny_sources, tmp_path, capsys
) -> None:
    from kfm.data.pack import pack
    from tests.conftest import SAMPLE, slice_jsonl

    # A private copy of the sources, so that re-packing one does not touch the shared fixture.
    sources = []
    for s in tiny_sources:
        shutil.copytree(s["path"], tmp_path / "shards" / s["name"])
        sources.append({**s, "path": str(tmp_path / "shards" / s["name"])})
    run(sources, tmp_path, "data", "--train.steps=6")

    text = slice_jsonl(SAMPLE / "medquad.jsonl.gz", tmp_path / "fewer.jsonl", 100)
    pack([str(text)], str(TOKENIZER), str(tmp_path / "repacked"), source_name="medquad")
    shutil.rmtree(sources[0]["path"])
    (tmp_path / "repacked").rename(sources[0]["path"])  # other content, same path
    capsys.readouterr()

    with pytest.raises(ConfigError, match=r"data.sources.medquad \(shard content\): "):
        run(sources, tmp_path, "data")
    assert max(r["step"] for r in records(tmp_path / "data")) == 6

    summary = run(sources, tmp_path, "data", "--checkpoint.force_resume=true")
    out = capsys.readouterr().out
    assert summary["start_step"] == 6 and summary["steps_done"] == STEPS
    assert "checkpoint.force_resume=true: resuming despite 1 refused change(s)" in out
    assert "data.sources.medquad (shard content):" in out
    assert "data.sources.ko_chatbot (shard content)" not in out  # unchanged source: not listed


def test_steps_at_or_below_the_checkpoint_say_there_is_nothing_to_do(straight, capsys) -> None:
    from kfm_cli.main import cmd_train

    before = {p: p.read_bytes() for p in (straight / "metrics.jsonl", straight / "config.yaml")}
    root, name = straight.parent, straight.name
    sources = load_config(straight / "config.yaml", []).data.sources
    flow = [{"name": s.name, "path": s.path, "weight": s.weight} for s in sources]
    args = argparse.Namespace(config="configs/tiny.yaml", dry_run=False, world_size=None)
    code = cmd_train(args, [*tiny_overrides(flow, root, name), "--train.steps=6"])
    out = capsys.readouterr().out
    assert code == 0
    ckpt = straight / "checkpoints" / f"step_{STEPS:06d}"
    assert f"nothing to do: the checkpoint {ckpt} is at step {STEPS} >= train.steps=6" in out
    assert {p: p.read_bytes() for p in before} == before  # nothing written
