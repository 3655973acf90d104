"""configs/pretrain presets carry their plan in a `# plan:` comment block; re-running the planner
must give the same block, so a preset and its plan cannot drift apart. To update a block after a
deliberate change, paste the block this test prints on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfm.config import load_config
from kfm.plan.hardware import GPUS
from kfm.plan.model import Allocation
from kfm.plan.report import PRESET_PREFIX, preset_block
from tests.conftest import REPO

PRESETS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def _allocation(cfg) -> Allocation:
    p = cfg.parallel
    world = p.dp_replicate * p.dp_shard * p.tp
    assert -1 not in (p.dp_replicate, p.dp_shard, p.tp), "presets state their whole mesh"
    return Allocation(gpu=GPUS["b200"], nodes=world // 8, gpus_per_node=8)


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"proxy_150m", "proxy_1b", "phase1_8b", "phase2_8b_long"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_comment_block_matches_the_planner(path: Path):
    cfg = load_config(path, [])
    expected = preset_block(cfg, _allocation(cfg))
    found = [line for line in path.read_text().splitlines() if line.startswith(PRESET_PREFIX)]
    assert found == expected, f"{path}: replace its '{PRESET_PREFIX}' lines with\n" + "\n".join(
        expected
    )
    assert "fits" in expected[-1] and "NOT" not in expected[-1]  # every preset fits its GPUs
