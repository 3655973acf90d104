"""benchmarks/time_to_target.py: the same stream for both sides, one scorer, time to target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.time_to_target import Curve, Scorer, Windows, export, main, table
from kfm.config import load_config
from kfm.data import PackedLoader
from tests.conftest import REPO, TOKENIZER


def write_train_yaml(sources: list[dict], path: Path, **sections: dict) -> Path:
    """configs/tiny.yaml on the packed test data, as `kfm data run` writes train.yaml."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["data"]["sources"] = [dict(s) for s in sources]
    data["tokenizer"] = {"path": str(TOKENIZER)}
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def test_trainer_reads_the_windows_a_kfm_run_reads(tiny_sources, tmp_path) -> None:
    cfg = load_config(write_train_yaml(tiny_sources, tmp_path / "train.yaml"))
    rows = [r["input_ids"] for r in Windows(cfg, steps=3)]
    assert len(rows) == 3 * cfg.train.global_batch_size
    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
    )
    # kfm's loader at micro-batch B (accumulation 2 here) reads the same global sequence.
    batches = [loader.next_batch() for _ in range(6)]
    tokens = torch.cat([b.tokens for b in batches])
    labels = torch.cat([b.labels for b in batches])
    stacked = torch.stack(rows)
    assert torch.equal(stacked[:, :-1], tokens)
    assert torch.equal(stacked[:, 1:], labels)


def test_time_to_target_is_the_first_point_at_or_below() -> None:
    curve = Curve("x", 30, points=[(10, 5.0, 3.1), (20, 9.0, 2.9), (30, 14.0, 2.8)])
    assert curve.time_to(2.95) == (20, 9.0)
    assert curve.time_to(2.9) == (20, 9.0)
    assert curve.time_to(2.7) is None
    rows = [
        {"name": "a", "steps": 30, "final_val_bpb": 2.8, "reached_at_step": 20,
         "seconds_to_target": 9.0, "speedup": 2.0, "train_s": 14.0},
        {"name": "b", "steps": 30, "final_val_bpb": 3.0, "reached_at_step": None,
         "seconds_to_target": None, "speedup": None, "train_s": 12.0},
    ]  # fmt: skip
    text = table(rows, 2.9, 18.0)
    assert "| a | 30 | 2.8000 | 20 | 9.0 | 2.00x |" in text
    assert "| b | 30 | 3.0000 | not reached | - | < 1.50x |" in text


@pytest.mark.slow
def test_benchmark_end_to_end_on_tiny_runs(tiny_sources, tmp_path) -> None:
    # The recipe comes from the preset, the data from the curated train.yaml.
    preset = tmp_path / "recipe.yaml"
    preset_data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    preset_data["optim"]["name"] = "muon"
    preset.write_text(yaml.safe_dump(preset_data))
    data_yaml = write_train_yaml(tiny_sources, tmp_path / "data.yaml")
    out, work = tmp_path / "result.json", tmp_path / "work"
    args = ["--baseline-steps=6", "--kfm-steps=6", "--every=2", "--score-from=0"]
    assert main([*args, "--ablations=muon", "--additions=", f"--data={data_yaml}", f"--preset={preset}",
                 f"--work={work}", f"--out={out}", "--threads=1", "--keep-checkpoints"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    train_yaml = work / "train.yaml"
    score = Scorer(train_yaml)
    # One scorer for both sides, on the folders each side wrote.
    target = result["baseline"]["val_bpb"]
    assert score(work / "baseline" / "hf") == pytest.approx(target, abs=1e-12)
    recipe, no_muon, control = result["runs"]
    metrics = [json.loads(x) for x in (work / "recipe" / "metrics.jsonl").read_text().splitlines()]
    train_s = {r["step"]: r["train_s"] for r in metrics if "train_s" in r}
    steps = [p["step"] for p in recipe["points"]]
    assert steps[-1] == 6 and set(steps) <= {2, 4, 6}
    for p in recipe["points"]:
        assert p["train_s"] == train_s[p["step"]]
        folder = work / "exports" / "recipe" / f"step_{p['step']:06d}"
        assert score(folder) == pytest.approx(p["val_bpb"], abs=1e-12)
    # Every checkpoint's score, to check what the bisection found.
    every = {}
    for s in (2, 4, 6):
        folder = work / "exports" / "recipe" / f"step_{s:06d}"
        if not folder.exists():
            export(work / "recipe" / "checkpoints" / folder.name, folder)
        every[s] = score(folder)
    below = [s for s in sorted(every) if every[s] <= target]
    if recipe["points"][-1]["val_bpb"] > target:
        assert recipe["reached_at_step"] is None and recipe["speedup"] is None
    else:
        found = recipe["reached_at_step"]
        assert found == below[0]
        assert found == 2 or every[found - 2] > target  # the one before was scored, above
        seconds = train_s[found]
        assert recipe["speedup"] == pytest.approx(result["baseline"]["train_s"] / seconds)
    # The ablation is the recipe with that one technique switched back.
    assert load_config(work / "recipe" / "config.yaml").optim.name == "muon"
    assert load_config(work / "no_muon" / "config.yaml").optim.name == "adamw"
    assert no_muon["overrides"] == ["--optim.name=adamw", "--optim.lr=3e-3"]
    # The control is kfm on the baseline's settings, as long as the baseline.
    ctl = load_config(work / "control" / "config.yaml")
    assert (ctl.optim.name, ctl.optim.lr, ctl.optim.betas) == ("adamw", 5e-4, [0.9, 0.999])
    assert (ctl.schedule.name, ctl.model.tie_embeddings, ctl.model.document_masking) == (
        "cosine",
        True,
        False,
    )
    assert control["steps"] == 6 and control["points"][-1]["step"] == 6
    assert no_muon["steps"] == 12  # Muon's ablation gets twice the steps
    assert "target: the baseline's final validation bits/byte" in result["table"]
