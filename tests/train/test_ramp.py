"""Batch-size ramp-up (train.batch_ramp_*, kfm/train/ramp.py): the schedule, its validation, the
lr factor, one backend step's accumulation and loss, and a real one-process run and its resume.

The runs (`ramp_run`) go through tests/parallel/harness.py, so tests/parallel/test_ramp_parallel.py
compares its 2-rank runs with the same cached one-process run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kfm.config import ConfigError, TrainConfig, load_config
from kfm.data import PackedLoader
from kfm.train.backends.fsdp import FSDPBackend, build_model
from kfm.train.dist import WorldInfo
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import build_scheduler, lr_at
from kfm.train.ramp import (
    accumulation_at,
    check_ramp,
    global_batch_at,
    ramp_lr_factor,
    samples_through,
)
from tests.conftest import REPO, tiny_overrides
from tests.parallel.harness import Run, run_train, shared_root

STEPS, CKPT_AT, SEQ_LEN = 10, 5, 64  # SEQ_LEN: configs/tiny.yaml
# micro-batch 2 and a ramp from 4 to 16 in 6 steps: batches 4 4 8 8 12 12 16 16 16 16, whole
# micro-batches on 1 and 2 ranks (accumulation 2 2 4 4 6 6 8... and 1 1 2 2 3 3 4...); the
# checkpoint at step 5 is in the middle of the ramp.
RAMP = (
    f"--train.steps={STEPS}",
    "--train.micro_batch_size=2",
    "--train.global_batch_size=16",
    "--train.batch_ramp_start=4",
    "--train.batch_ramp_steps=6",
    f"--checkpoint.interval={CKPT_AT}",
    "--optim.grad_clip=0.5",
)


def ramp_run(sources: list[dict], root: Path) -> Run:
    """configs/tiny.yaml with RAMP in one plain process (cached for the session)."""
    return run_train(sources, root, "ramp_single", nproc=0, args=RAMP)


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"micro_batch_size": 1, **kw})


# -- the schedule ------------------------------------------------------------------------------


def test_global_batch_grows_in_stages_of_the_start_batch():
    cfg = train_cfg(global_batch_size=16, batch_ramp_start=4, batch_ramp_steps=6)
    assert [global_batch_at(s, cfg) for s in range(1, 10)] == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    # fewer ramp steps than stages: stages are skipped, the ramp still ends on time
    short = train_cfg(global_batch_size=8, batch_ramp_start=1, batch_ramp_steps=2)
    assert [global_batch_at(s, short) for s in (1, 2, 3)] == [1, 4, 8]
    assert global_batch_at(1, train_cfg(global_batch_size=8)) == 8  # no ramp
    with pytest.raises(ValueError, match="step=0 must be >= 1"):
        global_batch_at(0, cfg)


@pytest.mark.parametrize(
    "start,full,span",
    [(1, 8, 1), (1, 8, 7), (2, 8, 5), (4, 64, 100), (16, 1024, 37), (256, 4096, 2000), (8, 8, 3)],
)
def test_schedule_follows_the_line_rounded_down_to_the_start(start, full, span):
    cfg = train_cfg(global_batch_size=full, batch_ramp_start=start, batch_ramp_steps=span)
    batches = [global_batch_at(s, cfg) for s in range(1, span + 3)]
    assert batches[0] == start
    assert batches[span:] == [full, full]  # steps span+1 on: the full batch
    assert all(b % start == 0 for b in batches)
    assert all(a <= b for a, b in zip(batches, batches[1:], strict=False))
    for step, b in enumerate(batches[:span], start=1):
        line = start + (full - start) * (step - 1) / span  # start at step 1, full at span + 1
        assert line - start < b <= line + 1e-9 or b == full == start
    assert samples_through(span + 2, cfg) == sum(batches)
    assert samples_through(0, cfg) == 0


def test_accumulation_per_rank_follows_the_batch():
    cfg = TrainConfig(
        micro_batch_size=2, global_batch_size=16, batch_ramp_start=4, batch_ramp_steps=6
    )
    assert [accumulation_at(s, cfg, 1) for s in range(1, 8)] == [2, 2, 4, 4, 6, 6, 8]
    assert [accumulation_at(s, cfg, 2) for s in range(1, 8)] == [1, 1, 2, 2, 3, 3, 4]
    check_ramp(cfg, 2)
    with pytest.raises(
        ConfigError, match=r"batch_ramp_start=4 must be a multiple of .* = 2 \* 4 = 8"
    ):
        check_ramp(cfg, 4)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.batch_ramp_steps=5"], "batch_ramp_steps=5 needs train.batch_ramp_start > 0"),
        (["--train.batch_ramp_start=4"], "batch_ramp_start=4 needs train.batch_ramp_steps >= 1"),
        (
            ["--train.batch_ramp_start=16", "--train.batch_ramp_steps=2"],
            r"batch_ramp_start=16 must be <= train.global_batch_size=8",
        ),
        (
            ["--train.batch_ramp_start=2", "--train.batch_ramp_steps=2"],
            r"must be a multiple of train.micro_batch_size=4 .* one of 4, 8$",
        ),
        (
            [
                "--train.global_batch_size=24",
                "--train.batch_ramp_start=16",
                "--train.batch_ramp_steps=2",
            ],
            r"divide train.global_batch_size=24 .* one of 4, 8, 12, 24$",
        ),
        (["--train.batch_ramp_start=-4"], r"train.batch_ramp_start=-4 must be >= 0"),
        (
            [
                "--train.batch_ramp_start=4",
                "--train.batch_ramp_steps=2",
                "--parallel.backend=deepspeed",
            ],
            "batch_ramp_start > 0 is not supported with parallel.backend=deepspeed; use "
            "parallel.backend=fsdp",
        ),
    ],
)
def test_config_errors_name_the_keys_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_the_data_parallel_multiple_is_checked_once_the_world_is_known(tiny_sources, tmp_path):
    """micro 4 x 2 data-parallel ranks: a start of 4 cannot be split. Config loading cannot know
    the world size; FSDPBackend calls check_ramp with its data-parallel size."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *tiny_overrides(tiny_sources, tmp_path, "dp"),
            "--train.batch_ramp_start=4",
            "--train.batch_ramp_steps=2",
        ],
    )
    check_ramp(cfg.train, 1)
    with pytest.raises(
        ConfigError, match=r"= 4 \* 2 = 8 .* set --train.batch_ramp_start to one of 8"
    ):
        check_ramp(cfg.train, 2)


# -- learning rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["sqrt", "linear", "none"])
def test_lr_is_the_schedule_times_the_batch_factor(rule):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*RAMP, f"--train.batch_ramp_lr={rule}", "--schedule.name=wsd"],
    )
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.schedule, total_steps=STEPS, ramp=cfg.train)
    for step in range(1, STEPS + 1):  # the update of loop step s follows s - 1 steps taken
        b = global_batch_at(step, cfg.train)
        factor = {"sqrt": math.sqrt(b / 16), "linear": b / 16, "none": 1.0}[rule]
        want = lr_at(step - 1, total_steps=STEPS, peak_lr=cfg.optim.lr, cfg=cfg.schedule) * factor
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        assert ramp_lr_factor(step, cfg.train) == factor
        opt.step()
        sched.step()
    assert ramp_lr_factor(7, cfg.train) == 1.0  # the full batch from step 7


def test_dry_run_prints_the_ramp_and_its_total_tokens(capsys, tiny_sources, tmp_path):
    from kfm_cli import main

    args = [*tiny_overrides(tiny_sources, tmp_path, "dry"), *RAMP]
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    # 4+4+8+8+12+12 sequences over the ramp, then 4 steps of 16
    assert f"tokens per step: {16 * SEQ_LEN:,}; total tokens: {(48 + 4 * 16) * SEQ_LEN:,}" in out
    assert "batch ramp: 4 -> 16 sequences over the first 6 steps, in steps of 4; " in out


# -- one backend step --------------------------------------------------------------------------


def test_backend_step_runs_the_steps_batch_and_averages_over_it(tiny_sources, tmp_path):
    """Step 1 of a ramp from 4 (micro-batch 2): 2 micro-batches, the loss their mean and the
    gradient norm that of the mean loss over those 4 sequences (the full batch would be 8
    micro-batches, and dividing by 8 would show as a loss 4x too small); later steps consume
    exactly the schedule's samples."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*tiny_overrides(tiny_sources, tmp_path, "step"), *RAMP]
    )
    loader = PackedLoader(
        cfg.data.sources, seq_len=cfg.data.seq_len, micro_batch_size=2, seed=cfg.data.seed
    )
    first = [loader.next_batch() for _ in range(2)]  # the 4 sequences of step 1
    loader = PackedLoader(
        cfg.data.sources, seq_len=cfg.data.seq_len, micro_batch_size=2, seed=cfg.data.seed
    )
    reference = build_model(cfg, torch.device("cpu"))
    loss = torch.stack(
        [cross_entropy_loss(reference(b.tokens, b.doc_ids), b.labels, z_loss=0.0)[0] for b in first]
    ).mean()
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])

    backend = FSDPBackend(cfg, WorldInfo(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    try:
        out = backend.step(loader, step=1)
        assert loader.samples_consumed == 4
        assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert out.grad_norm.item() == pytest.approx(grad_norm.item(), rel=1e-5)
        for step in range(2, 8):
            before = loader.samples_consumed
            backend.step(loader, step=step)
            assert loader.samples_consumed - before == global_batch_at(step, cfg.train)
        # without step= the backend takes the step after the scheduler's count: step 8
        before = loader.samples_consumed
        backend.step(loader)
        assert loader.samples_consumed - before == 16
    finally:
        backend.close()


# -- a real run --------------------------------------------------------------------------------


def test_run_logs_each_steps_batch_lr_and_tokens(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    run = ramp_run(tiny_sources, root)
    cfg = load_config(REPO / "configs" / "tiny.yaml", list(RAMP))
    assert "batch ramp: 4 -> 16 sequences over the first 6 steps" in run.stdout
    steps = {r["step"]: r for r in run.records() if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1))
    batches = [global_batch_at(s, cfg.train) for s in range(1, STEPS + 1)]
    assert (
        [steps[s]["batch_size"] for s in steps] == batches == [4, 4, 8, 8, 12, 12, 16, 16, 16, 16]
    )
    for s, r in steps.items():
        assert r["tokens"] == samples_through(s, cfg.train) * SEQ_LEN
        # logging.interval=1: each throughput window is this step alone
        assert r["tokens_per_s_global"] * r["step_time_s"] == pytest.approx(
            batches[s - 1] * SEQ_LEN
        )
        lr = lr_at(s - 1, total_steps=STEPS, peak_lr=cfg.optim.lr, cfg=cfg.schedule)
        assert r["lr"] == pytest.approx(lr * math.sqrt(batches[s - 1] / 16), rel=1e-12)
    for step in (CKPT_AT, STEPS):  # what the loader really consumed
        state = torch.load(run.checkpoint(step) / "trainer_state_rank0.pt", weights_only=False)
        assert state["loader"]["samples_consumed"] == sum(batches[:step])
    # the trace: one record per micro-batch of 2, consecutive global samples
    trace = run.trace()
    assert [r["start"] for r in trace] == list(range(0, sum(batches), 2))


def test_resume_in_the_middle_of_the_ramp_is_bitwise_exact(tiny_sources, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    straight = ramp_run(tiny_sources, root)
    ckpt = straight.checkpoint(CKPT_AT)
    resumed = run_train(
        tiny_sources, root, "ramp_resumed", nproc=0, args=(*RAMP, f"--checkpoint.resume={ckpt}")
    )
    assert f"resumed from {ckpt} at step {CKPT_AT}" in resumed.stdout
    a, b = straight.losses(), resumed.losses()
    assert sorted(b) == list(range(CKPT_AT + 1, STEPS + 1))
    assert [b[s] for s in b] == [a[s] for s in b]  # bitwise: floats compared with ==
    assert resumed.trace()[0]["start"] == 4 + 4 + 8 + 8 + 12
