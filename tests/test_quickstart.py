"""The README's first command, end to end (slow: ~4 minutes on 2 cores).

Runs scripts/quickstart.sh with fewer training steps in this checkout; it writes
runs/quickstart/ (git-ignored), replacing a previous quickstart run there.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_script_end_to_end():
    out = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--train.steps=120", "--eval.interval=60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    before, after = map(
        float, re.search(r"validation bits/byte: ([\d.]+) .*-> ([\d.]+)", log).groups()
    )
    assert after < before - 0.5, (before, after)  # bits per byte falls clearly
    assert re.search(r"fertility \(characters per token\) (ko|en) [\d.]+, (ko|en) [\d.]+", log)
    assert re.search(r"export check: max \|logits_kfm - logits_hf\| = \S+ .*: ok", log)
    samples = re.findall(r"^\[greedy\] .+ -> .+$", log, flags=re.M)
    assert len(samples) == 2
