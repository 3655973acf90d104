"""A process SIGKILLed in the middle of save_checkpoint leaves nothing that is loaded later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import find_latest_valid, list_checkpoints, save_checkpoint

# Saves step 1 normally, then arms a kill at `where` and saves step 2. The kill is injected by
# replacing a function the save calls with one that SIGKILLs this process (no cleanup can run).
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import torch.distributed.checkpoint as dcp
    from torch import nn
    import kfm.checkpoint.manager as manager
    import kfm.checkpoint.stepdir as stepdir

    root, where = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    manager.save_checkpoint(root, 1, model=model, optimizer=opt, trainer_state={}, config={})

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "after_dcp_write":
        real_save = dcp.save
        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            die()
        dcp.save = save_then_die
    elif where == "while_hashing":
        stepdir.sha256_file = die
    elif where == "before_rename":
        real_rename = os.rename
        def rename(src, dst):
            die() if ".tmp-" in str(src) else real_rename(src, dst)
        os.rename = rename
    elif where == "before_latest":
        os.replace = die
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    manager.save_checkpoint(root, 2, model=model, optimizer=opt, trainer_state={}, config={})
    sys.exit("the kill did not happen")
    """
)


@pytest.mark.parametrize(
    ("where", "newest_valid"),
    [
        ("after_dcp_write", 1),
        ("while_hashing", 1),
        ("before_rename", 1),  # manifest complete inside the tmp dir: still never a candidate
        ("before_latest", 2),  # step dir final; only the symlink lags, which loading ignores
    ],
)
def test_sigkill_during_save(tmp_path: Path, make_model, where: str, newest_valid: int) -> None:
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name]
    if newest_valid == 1:
        assert leftovers == [f"step_000002.tmp-{_pid_of(leftovers[0])}"]
        assert [p.name for p in list_checkpoints(root)] == ["step_000001"]
    else:
        assert os.readlink(root / "latest") == "step_000001"
    assert find_latest_valid(root) == root / f"step_{newest_valid:06d}"

    # The next save (another process: the dead one's pid is gone) removes the leftovers.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(root, 3, model=model, optimizer=opt, trainer_state={}, config={})
    assert [p.name for p in root.iterdir() if ".tmp-" in p.name] == []
    assert find_latest_valid(root) == root / "step_000003"


def _pid_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])
