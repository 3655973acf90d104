"""Budget and data: tokens an allocation buys, Chinchilla verdicts, epochs per source read from
the files kfm pack / kfm data run write, and the failure budget's arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from kfm.plan.budget import (
    DataInventoryError,
    DataSource,
    budget_choices,
    failure_budget,
    format_budget,
    read_inventory,
)


def test_reads_shard_set_manifests(tiny_sources):
    sources = read_inventory([s["path"] for s in tiny_sources])
    for src, spec in zip(sources, tiny_sources, strict=True):
        manifest = json.loads(
            (__import__("pathlib").Path(spec["path"]) / "manifest.json").read_text()
        )
        assert src.name == spec["name"]
        assert src.tokens == manifest["splits"]["train"]["n_tokens"] > 0


def test_reads_stats_json_and_inventory_yaml(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # the per-source fields kfm data run writes into stats.json (data_pipeline/report.py)
    (run / "stats.json").write_text(json.dumps({"sources": {
        "medquad": {"language": "en", "weight": 2.0, "pack_tokens": 1000},
        "klue": {"language": "ko", "weight": 1.0, "pack_tokens": 500}}}))  # fmt: skip
    inv = tmp_path / "inventory.yaml"
    inv.write_text("sources:\n  - {name: web_ko, tokens: 2.0e9, language: ko, domain: web}\n")
    got = read_inventory([run, inv])
    assert [(s.name, s.tokens, s.language, s.weight) for s in got] == [
        ("medquad", 1000, "en", 2.0), ("klue", 500, "ko", 1.0), ("web_ko", 2e9, "ko", 1.0)]  # fmt: skip
    assert got[2].domain == "web"
    with pytest.raises(DataInventoryError, match="stats.json.*manifest.json"):
        read_inventory([tmp_path])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {name: x}\n")
    with pytest.raises(DataInventoryError, match=r"sources\[0\] needs 'name' and 'tokens'"):
        read_inventory([bad])


def test_epochs_and_verdicts():
    sources = [DataSource("en", 1e12, "en", weight=3.0), DataSource("ko", 1e10, "ko", weight=1.0)]
    n = 1e9
    # 20 B tokens at 6N FLOPs/token: exactly Chinchilla-optimal for 1B
    tps = 20e9 / (1000 * 3600)  # tokens/s/GPU so that 1,000 GPU-hours give 20 B tokens
    (c,) = budget_choices([("1b", n, 6 * n, tps)], gpus=8, gpu_hours=1000, sources=sources)
    assert c.tokens == pytest.approx(20e9)
    assert c.optimal_params == pytest.approx(n)
    assert c.verdict.startswith("compute-optimal")
    assert c.epochs["en"] == pytest.approx(20e9 * 0.75 / 1e12)
    assert c.epochs["ko"] == pytest.approx(20e9 * 0.25 / 1e10)  # 0.5 epochs
    (big,) = budget_choices([("1b", n, 6 * n, 100 * tps)], gpus=8, gpu_hours=1000, sources=sources)
    assert big.verdict.startswith("over-trained") and big.epochs["ko"] == pytest.approx(50)
    text = format_budget([c, big], gpus=8, gpu_hours=1000, sources=sources)
    assert "50.0!!" in text  # > 16 epochs: marked as wasted
    assert "by language: en 1,000.00 B, ko 10.00 B" in text


def test_failure_budget_at_256_gpus():
    fb = failure_budget(gpus=256, save_blocking_s=10.0, restart_s=600.0)
    rate = 466 / (54 * 24 * 16384)
    assert fb.interruptions_per_week == pytest.approx(rate * 256 * 168)  # ~0.94
    assert fb.mtbf_hours == pytest.approx(1 / (rate * 256))
    assert fb.interval_s == pytest.approx(math.sqrt(2 * 10.0 * fb.mtbf_hours * 3600))

    def lost(interval):
        return 10.0 / interval + (interval / 2 + 600) / (fb.mtbf_hours * 3600)

    # Young/Daly: the interval minimises the lost fraction (first order)
    assert fb.lost_fraction == pytest.approx(lost(fb.interval_s))
    assert lost(fb.interval_s) < lost(fb.interval_s / 2) and lost(fb.interval_s) < lost(
        2 * fb.interval_s
    )
