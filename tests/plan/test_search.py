"""`kfm plan --search`: layouts ranked by predicted tokens/s, rejections with their reason."""

from __future__ import annotations

import pytest

from kfm.config import load_config
from kfm.parallel.plan import build_plan
from kfm.plan.hardware import GPUS
from kfm.plan.model import Allocation, predict
from kfm.plan.search import format_search, fp8_recipes, search, search_dict
from tests.conftest import REPO

ALLOC = Allocation(gpu=GPUS["b200"], nodes=4, gpus_per_node=8)
PRESET = REPO / "configs" / "b200_8b.yaml"


@pytest.fixture(scope="module")
def result():
    cfg = load_config(PRESET, ["--train.global_batch_size=64"])
    return cfg, search(cfg, ALLOC)


def test_fitting_layouts_are_ranked_by_predicted_throughput(result):
    _, cands = result
    fits = [c for c in cands if c.rejected is None]
    assert len(fits) > 10
    rates = [c.prediction.tokens_per_s for c in fits]
    assert rates == sorted(rates, reverse=True)
    assert cands[: len(fits)] == fits  # fitting first, then the rejected


def test_best_layout_reproduces_through_the_config_overrides(result):
    cfg, cands = result
    best = cands[0]
    again = load_config(PRESET, ["--train.global_batch_size=64", *best.overrides().split()])
    assert predict(again, ALLOC).tokens_per_s == pytest.approx(best.prediction.tokens_per_s)


def test_rejections_name_their_reason_and_memory_agrees_with_the_dry_run(result):
    cfg, cands = result
    rejected = [c for c in cands if c.rejected]
    kinds = {c.rejected.split(":")[0] for c in rejected}
    assert kinds == {"memory", "divisibility", "placement"}
    # tp=16 would span two 8-GPU nodes; micro-batch 4 does not split 64 sequences over 32 ranks
    assert all(c.rejected.startswith("placement") for c in rejected if c.mesh[2] == 16)
    assert any(
        "global_batch_size=64 is not a multiple of micro-batch 4 x data-parallel 32" in c.rejected
        for c in rejected
    )
    # a memory rejection is what the fake-process-group plan says too
    mem = next(c for c in rejected if c.rejected.startswith("memory"))
    assert not build_plan(mem.cfg, ALLOC.world_size, gpu=ALLOC.gpu).memory.fits
    ok = next(c for c in cands if c.rejected is None)
    assert build_plan(ok.cfg, ALLOC.world_size, gpu=ALLOC.gpu).memory.fits


def test_report_and_json(result):
    _, cands = result
    text = format_search(cands, top=5)
    assert "best: --parallel.dp_replicate=" in text
    assert "rejected for memory" in text and "rejected for divisibility" in text
    rows = search_dict(cands)
    assert len(rows) == len(cands) and rows[0]["fits"] and not rows[-1]["fits"]
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(
        cands[0].prediction.tokens_per_s_per_gpu
    )


def test_fp8_recipes_follow_the_hardware():
    assert fp8_recipes(ALLOC) == ["none", "tensorwise", "rowwise", "mxfp8"]
    assert "mxfp8" not in fp8_recipes(Allocation(gpu=GPUS["h100"], nodes=1, gpus_per_node=8))
    assert fp8_recipes(Allocation(gpu=GPUS["a100"], nodes=1, gpus_per_node=8)) == ["none"]
