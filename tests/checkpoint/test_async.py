"""Asynchronous checkpoints and per-rank integrity: the state saved is the state at `save`, one save
in flight at a time, a crash mid-write leaves the previous checkpoint newest, every rank hashes
only the files it wrote, and resume checks are spread over the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kfm.checkpoint import Checkpointer, find_latest_valid, list_checkpoints, load_model_state
from tests.checkpoint.conftest import run_gloo_ranks

CONFIG = {"model": {}}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model, opt, n: int = 1) -> None:
    for _ in range(n):
        model(torch.randint(0, 16, (4, 5))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_async_save_holds_the_state_at_save_time(tmp_path, make_model) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    ckpt = Checkpointer(tmp_path, config=CONFIG, keep_last=0, async_save=True)
    at_save = _snapshot(model)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={})
    _train(model, opt, 3)  # training goes on while the files are written
    final = ckpt.wait()
    ckpt.close()
    assert final == tmp_path / "step_000001"
    weights, _ = load_model_state(final)
    assert all(torch.equal(weights[k], at_save[k]) for k in at_save)
    assert not all(torch.equal(model.state_dict()[k], at_save[k]) for k in at_save)


def test_poll_reports_a_finished_save_once(tmp_path, make_model) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    ckpt = Checkpointer(tmp_path, config=CONFIG, keep_last=0, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={})
    deadline = time.monotonic() + 60
    while (done := ckpt.poll()) is None:  # never blocks: the loop calls it every step
        assert time.monotonic() < deadline, "the save never finished"
        time.sleep(0.01)
    assert done == tmp_path / "step_000001"
    assert ckpt.poll() is None and ckpt.wait() is None  # reported once
    ckpt.close()


def test_at_most_one_save_in_flight(tmp_path, make_model) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    ckpt = Checkpointer(tmp_path, config=CONFIG, keep_last=0, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={})
    _train(model, opt)
    ckpt.save(2, model=model, optimizer=opt, trainer_state={})
    # The second save waited for the first: step 1 was final before step 2 started.
    assert [p.name for p in list_checkpoints(tmp_path)] in (
        ["step_000001"],
        ["step_000001", "step_000002"],
    )
    assert ckpt.wait() == tmp_path / "step_000002"
    ckpt.close()
    assert find_latest_valid(tmp_path) == tmp_path / "step_000002"


CRASH = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    import kfm.checkpoint.stepdir as stepdir
    from kfm.checkpoint import Checkpointer

    root, where = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    ckpt = Checkpointer(root, config={}, keep_last=0, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={})
    ckpt.wait()
    if where == "before_manifest":  # the background thread dies after writing, before finalizing
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        stepdir.PendingSave.finalize = die
    ckpt.save(2, model=model, optimizer=opt, trainer_state={})
    if where == "right_after_save":  # the main thread dies while the write is in flight
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.wait()
    sys.exit("the kill did not happen")
    """
)


@pytest.mark.parametrize("where", ["before_manifest", "right_after_save"])
def test_crash_during_async_write_leaves_the_previous_checkpoint(tmp_path, where) -> None:
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(root), where], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert find_latest_valid(root) == root / "step_000001"
    assert os.readlink(root / "latest") == "step_000001"
    assert [p.name for p in list_checkpoints(root)] == ["step_000001"]


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    import kfm.checkpoint.stepdir as stepdir
    from kfm.checkpoint import Checkpointer, agree_on_checkpoint

    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hashed = []
    real_sha256 = stepdir.sha256_file
    def recording_sha256(path):
        hashed.append(str(path).rsplit("/", 1)[-1])
        return real_sha256(path)
    stepdir.sha256_file = recording_sha256

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()
    ckpt = Checkpointer(root, config={"model": {}}, keep_last=0, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={"rank": rank})
    path = ckpt.wait()
    ckpt.close()
    saved = sorted(hashed)
    hashed.clear()
    ok = agree_on_checkpoint([path], verify_hashes=True)
    verified = sorted(hashed)
    dist.barrier()
    if rank == 0:  # flip one byte of rank 1's shard file: same size, wrong hash
        f = next(p for p in path.iterdir() if p.name.startswith("__1_"))
        data = bytearray(f.read_bytes()); data[-1] ^= 0xFF; f.write_bytes(bytes(data))
    dist.barrier()
    hashed.clear()
    bad = agree_on_checkpoint([path], verify_hashes=True)
    json.dump({"saved": saved, "verified": verified, "ok": str(ok), "bad": str(bad),
               "verified_after_corruption": sorted(hashed)}, open(f"{out}.{rank}", "w"))
    dist.barrier()  # tearing gloo down while a peer still receives aborts it (torch 2.13)
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_each_rank_hashes_its_own_files_and_resume_checks_are_spread(tmp_path: Path) -> None:
    root, out = tmp_path / "checkpoints", tmp_path / "out.json"
    run_gloo_ranks(WORKER, str(root), str(out))
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    # Saving: each rank hashed exactly the files it wrote (rank 0 also DCP's .metadata).
    assert r0["saved"] == [".metadata", "__0_0.distcp", "trainer_state_rank0.pt"]
    assert r1["saved"] == ["__1_0.distcp", "trainer_state_rank1.pt"]
    manifest = json.loads((root / "step_000001" / "manifest.json").read_text())
    assert {name: e["rank"] for name, e in manifest["files"].items()} == {
        ".metadata": 0,
        "__0_0.distcp": 0,
        "__1_0.distcp": 1,
        "trainer_state_rank0.pt": 0,
        "trainer_state_rank1.pt": 1,
    }
    # Resume checks: the same split, and a corrupt rank-1 file refuses the checkpoint everywhere.
    assert r0["verified"] == r0["saved"] and r1["verified"] == r1["saved"]
    assert r0["ok"] == r1["ok"] == str(root / "step_000001")
    assert r0["bad"] == r1["bad"] == "None"
    assert "__1_0.distcp" not in r0["verified_after_corruption"]


ABANDON = textwrap.dedent(
    """
    import sys, threading, torch
    from torch import nn
    import kfm.checkpoint.stepdir as stepdir
    from kfm.checkpoint import Checkpointer

    model = nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    # The background finalize never returns, as when it waits for a rank that is gone.
    stepdir.PendingSave.finalize = lambda *args, **kwargs: threading.Event().wait()
    ckpt = Checkpointer(sys.argv[1], config={}, keep_last=0, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, trainer_state={})
    ckpt.close(wait=False)  # what the trainer does after an error
    print("exiting")
    """
)


def test_abandoned_save_does_not_hold_up_the_exit(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ABANDON, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr
    assert list_checkpoints(tmp_path) == []  # the abandoned save never became a checkpoint
