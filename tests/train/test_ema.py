"""Weight EMA (train.ema_decay, kfm/train/ema.py): the math against the per-step weights, bitwise
resume, FSDP2 on 2 gloo ranks against one process, a 2 -> 1 rank reshard of the EMA state, and
ema/val_bpb against `kfm eval` of `kfm merge --ema`.

Tolerances for the 2-rank runs are those of tests/parallel/test_fsdp.py (fp32, reduction order
only): weights 1e-5 absolute, losses 1e-5 relative. The EMA is a local lerp of each rank's shard,
so it adds no error of its own.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from kfm.checkpoint import load_model_state, read_manifest
from kfm.config import ConfigError, config_from_dict, load_config
from kfm.model.transformer import Transformer
from kfm.train.ema import EMA
from tests.parallel.harness import Run, relative_error, run_train, shared_root

STEPS = 6
DECAY = 0.3  # the warm-up (1+t)/(10+t) rules steps 1-3, the cap 0.3 steps 4-6
EMA_ARGS = (
    f"--train.steps={STEPS}",
    "--train.micro_batch_size=2",
    "--checkpoint.interval=1",
    "--checkpoint.keep_last=0",
    "--eval.interval=3",
    f"--train.ema_decay={DECAY}",
    "--logging.tensorboard=true",
)
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def ema_run(sources: list[dict], root, nproc: int = 0) -> Run:
    """configs/tiny.yaml for 6 steps with train.ema_decay=0.3 and a checkpoint every step (shared
    with tests/checkpoint/test_merge.py through the harness cache)."""
    return run_train(sources, root, f"ema{nproc}", nproc=nproc, args=EMA_ARGS)


def _ema(run_or_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_or_dir.checkpoint(step) if isinstance(run_or_dir, Run) else run_or_dir
    state, _ = load_model_state(path, entry="ema")
    return state


def test_saved_ema_equals_ema_of_the_per_step_weights(tiny_sources, tmp_path_factory):
    run = ema_run(tiny_sources, shared_root(tmp_path_factory))
    cfg = config_from_dict(read_manifest(run.checkpoint(1))["config"])
    torch.manual_seed(cfg.train.seed)  # the init build_model makes: the EMA's starting point
    ref = {k: v.detach().clone() for k, v in Transformer(cfg.model).state_dict().items()}
    for t in range(1, STEPS + 1):
        weights, _ = load_model_state(run.checkpoint(t))
        d = min(DECAY, (1 + t) / (10 + t))
        ref = {k: d * ref[k] + (1 - d) * weights[k] for k in ref}
        saved = _ema(run, t)
        assert saved.keys() == ref.keys()  # tied output.weight under its own name too
        diffs = {k: (saved[k] - ref[k]).abs().max().item() for k in ref}
        assert max(diffs.values()) < 1e-6, (t, diffs)
        # the average is not the weights themselves (it would be with the EMA off or decay 0)
        assert max((saved[k] - weights[k]).abs().max().item() for k in ref) > 1e-4
    assert read_manifest(run.checkpoint(STEPS))["has_ema"] is True
    # Logged with every evaluation, next to val_bpb, and different from it.
    evals = [r for r in run.records() if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert {"ema/val_bpb", "ema/val_loss", "ema/val_bpb/medquad", "ema/val_time_s"} <= r.keys()
    assert evals[0]["ema/val_bpb"] == evals[0]["val_bpb"]  # step 0: the EMA is the init
    assert evals[-1]["ema/val_bpb"] != evals[-1]["val_bpb"]
    assert f"ema val_bpb {evals[-1]['ema/val_bpb']:.4f}" in run.stdout  # the console line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run.run_dir / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("ema/val_bpb")] == [0, 3, 6]


def test_resume_restores_the_ema_bitwise(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    straight = ema_run(tiny_sources, root)
    first = run_train(
        tiny_sources, root, "ema_resumed", nproc=0, args=(*EMA_ARGS, "--train.steps=3")
    )
    resumed = run_train(tiny_sources, root, "ema_resumed", nproc=0, args=EMA_ARGS)
    assert "resumed from" in resumed.stdout
    assert first.run_dir == resumed.run_dir
    a, b = _ema(straight, STEPS), _ema(resumed, STEPS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_fsdp2_two_ranks_ema_matches_one_process_and_reshards_to_one(
    tiny_sources, tmp_path_factory
):
    root = shared_root(tmp_path_factory)
    single, two = ema_run(tiny_sources, root), ema_run(tiny_sources, root, nproc=2)
    assert "dp_shard=2" in two.stdout
    a, b = _ema(two, STEPS), _ema(single, STEPS)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    last = [r for r in two.records() if "ema/val_bpb" in r][-1]
    want = [r for r in single.records() if "ema/val_bpb" in r][-1]
    assert relative_error(last["ema/val_bpb"], want["ema/val_bpb"]) < LOSS_RTOL

    # The 2-rank checkpoint of step 3 resumed by one process: the EMA's shards are resharded.
    target = root / "ema_resharded" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(two.checkpoint(3), target / "step_000003")
    resharded = run_train(tiny_sources, root, "ema_resharded", nproc=0, args=EMA_ARGS)
    assert "resumed from" in resharded.stdout
    # Step 4 keeps 0.3 of step 3's EMA (0.3 * |ema - weights| = 2.6e-4 here, were it reset).
    for step in (4, STEPS):
        c, want_c = _ema(resharded, step), _ema(single, step)
        assert max((c[k] - want_c[k]).abs().max().item() for k in c) < WEIGHT_ATOL, step


def test_ema_val_bpb_equals_kfm_eval_of_kfm_merge_ema(tiny_sources, tmp_path_factory, tmp_path):
    from eval.run import evaluate_checkpoint
    from kfm_cli.main import main

    run = ema_run(tiny_sources, shared_root(tmp_path_factory))
    out = tmp_path / "ema_weights"
    assert main(["merge", str(run.run_dir), "--ema", "--out", str(out)]) == 0
    merged, _ = load_model_state(out / "checkpoints" / f"step_{STEPS:06d}")
    saved = _ema(run, STEPS)
    assert all(torch.equal(merged[k], saved[k]) for k in saved)
    result = evaluate_checkpoint(out)
    logged = [r for r in run.records() if "ema/val_bpb" in r][-1]
    assert logged["step"] == STEPS
    assert relative_error(result["val_bpb"], logged["ema/val_bpb"]) < 1e-6
    assert relative_error(result["val_loss"], logged["ema/val_loss"]) < 1e-6


# -- the EMA object itself -------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(8, 4)
        self.proj = nn.Linear(4, 4)
        self.output = nn.Linear(4, 8, bias=False)
        self.output.weight = self.tok_embeddings.weight


def test_applied_swaps_the_ema_in_and_back_bitwise():
    torch.manual_seed(0)
    model = _Tied()
    ema = EMA(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # d_1 = min(0.5, 2/11): ema = init + (1 - 2/11) * 1
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(ema.state_dict()) == set(trained)  # both names of the tied weight
    assert ema.state_dict()["output.weight"] is ema.state_dict()["tok_embeddings.weight"]
    with ema.applied():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    after = model.state_dict()
    for k in trained:
        assert torch.equal(after[k], trained[k])  # swapped back bit for bit
        torch.testing.assert_close(inside[k], before[k] + 9 / 11, rtol=0, atol=1e-6)


def test_a_skipped_update_leaves_the_ema_and_advances_the_count():
    model = nn.Linear(3, 3)
    ema = EMA(model, 0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(torch.tensor(1.0))
    assert ema.updates == 1
    assert all(torch.equal(ema.state_dict()[k], start[k]) for k in start)
    ema.update(torch.tensor(0.0))
    assert not torch.equal(ema.state_dict()["weight"], start["weight"])


def test_deepspeed_backend_refuses_ema():
    with pytest.raises(ConfigError, match="train.ema_decay > 0 is not supported with parallel"):
        load_config("configs/tiny.yaml", ["--train.ema_decay=0.99", "--parallel.backend=deepspeed"])
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0 must be"):
        load_config("configs/tiny.yaml", ["--train.ema_decay=1.0"])
