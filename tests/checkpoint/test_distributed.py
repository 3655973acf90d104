"""Two real gloo ranks save and load one checkpoint; a single process then reads the model back."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import load_model_state, validate_checkpoint
from tests.checkpoint.conftest import run_gloo_ranks

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from kfm.checkpoint import load_checkpoint, load_model_state, save_checkpoint

    root, reference = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    # Replicated plain module, same data on both ranks, so both hold identical tensors.
    model, opt = build(0)
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(model.state_dict(), reference)
    path = save_checkpoint(
        root, 2, model=model, optimizer=opt, trainer_state={"rank": rank}, config={"model": {}}
    )

    fresh, fresh_opt = build(rank + 10)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_opt, config={"model": {}})
    assert state["rank"] == rank, state
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for k in s1:
        for n in s1[k]:
            assert torch.equal(s1[k][n], s2[k][n]), (k, n)
    weights, _ = load_model_state(path)  # local read while a process group is up
    for name, t in model.state_dict().items():
        assert torch.equal(weights[name], t), name
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_gloo_ranks_save_and_load(tmp_path: Path) -> None:
    root, reference = tmp_path / "checkpoints", tmp_path / "reference.pt"
    run_gloo_ranks(WORKER, str(root), str(reference))

    path = root / "step_000002"
    manifest = validate_checkpoint(path)
    assert manifest["world_size"] == 2
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt"} <= set(manifest["files"])
    assert json.loads((path / "manifest.json").read_text())["step"] == 2
    assert os.readlink(root / "latest") == "step_000002"
    assert [p.name for p in root.iterdir() if ".tmp-" in p.name] == []

    weights, _ = load_model_state(path)
    expected = torch.load(reference, weights_only=True)
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
