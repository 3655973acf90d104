"""Muon (optim.name=muon): the update against torch.optim.Muon, which parameters it takes, its
momentum warm-up, resume with changed settings, the DeepSpeed refusal, and real tiny runs
(the loss falls; a resumed run equals a straight one bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kfm.config import ConfigError, ModelConfig, OptimConfig, ScheduleConfig, load_config
from kfm.model.transformer import Transformer
from kfm.train.muon import MUON_GROUP, MuonAdamW, momentum_at
from kfm.train.optim import apply_optim_config, build_optimizer, build_scheduler, describe_optimizer
from kfm.train.resume import classify
from tests.conftest import REPO
from tests.train.test_optim import TinyLM
from tests.train.test_resume_changes import run as run_tiny

MUON = OptimConfig(name="muon", lr=2e-2, weight_decay=0.1)


def _groups(opt: torch.optim.Optimizer) -> dict[str, set[int]]:
    return {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}


def _matrices(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(24, 40, generator=g)),
        nn.Parameter(torch.randn(40, 24, generator=g)),
    ]


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], n: int, *, set_momentum=None):
    g = torch.Generator().manual_seed(1)
    for step in range(n):
        if set_momentum is not None:
            opt.param_groups[0]["momentum"] = set_momentum(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _muon_only(params: list[nn.Parameter], **group) -> MuonAdamW:
    settings = {"momentum": 0.95, "momentum_start": 0.85, "momentum_warmup": 0, "ns_steps": 5}
    return MuonAdamW(
        {"params": params, "weight_decay": 0.1, **settings, **group},
        [],
        lr=2e-2,
        adamw_kwargs={},
    )


def test_update_equals_torch_muon_with_moonlight_scaling() -> None:
    """Nesterov momentum, 5 Newton-Schulz steps, decoupled weight decay and the
    0.2 * sqrt(max(rows, cols)) scale: the same numbers as torch.optim.Muon (match_rms_adamw)."""
    ours, theirs = _matrices(0), _matrices(0)
    _steps(_muon_only(ours), ours, 4)
    ref = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    _steps(ref, theirs, 4)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_update_rms_matches_adamw_scale() -> None:
    """Moonlight's scaling makes the update's RMS ~0.2 * lr whatever the matrix shape (an
    orthogonal m x n matrix has RMS 1/sqrt(max(m, n)); NS leaves singular values near 1)."""
    for shape in [(16, 256), (256, 16), (64, 64)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = _muon_only([p], weight_decay=0.0)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        opt.step()
        rms = p.detach().pow(2).mean().sqrt().item() / 2e-2
        assert 0.1 < rms < 0.3, (shape, rms)


def test_momentum_warmup_values_and_use() -> None:
    """0.85 -> 0.95 linearly over muon_momentum_warmup steps (modded-nanogpt), then flat; the
    optimizer uses it: equal to torch.optim.Muon driven with those momenta by hand."""
    at = lambda s: momentum_at(s, momentum=0.95, start=0.85, warmup=300)  # noqa: E731
    assert [at(0), at(150), at(300), at(1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert momentum_at(0, momentum=0.95, start=0.85, warmup=0) == 0.95
    ours, theirs = _matrices(2), _matrices(2)
    _steps(_muon_only(ours, momentum_warmup=4), ours, 6)
    ref = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    by_hand = [0.85, 0.875, 0.9, 0.925, 0.95, 0.95]
    _steps(ref, theirs, 6, set_momentum=lambda s: by_hand[s])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tie", [True, False])
def test_groups_muon_matrices_adamw_rest(tie: bool) -> None:
    model = TinyLM(tie=tie)
    opt = build_optimizer(model, MUON)
    assert isinstance(opt, MuonAdamW)
    groups = _groups(opt)
    assert groups[MUON_GROUP] == {id(model.fc1.weight), id(model.fc2.weight)}
    assert id(model.tok_embeddings.weight) in groups["no_decay"]
    if tie:
        assert "decay" not in groups  # the tied head is the embedding: no_decay, once
    else:
        assert groups["decay"] == {id(model.output.weight)}  # AdamW, decayed, never Muon
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd[MUON_GROUP] == 0.1 and wd["no_decay"] == 0.0
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))


def test_transformer_blocks_matrices_go_to_muon() -> None:
    model = Transformer(
        ModelConfig(
            vocab_size=64, d_model=32, n_layers=2, n_heads=4, tie_embeddings=False, max_seq_len=16
        )
    )
    opt = build_optimizer(model, MUON)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    want = sorted(
        f"layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    )
    assert got[MUON_GROUP] == want
    assert got["decay"] == ["output.weight"]
    assert "tok_embeddings.weight" in got["no_decay"] and "norm.weight" in got["no_decay"]
    line = describe_optimizer(opt)
    muon_params = sum(p.numel() for p in opt.param_groups[0]["params"])
    assert line.startswith(f"optimizer: Muon on 14 matrices ({muon_params:,} params), AdamW on ")
    assert "decay 1 (2,048)" in line  # the untied 64 x 32 head
    assert describe_optimizer(build_optimizer(model, OptimConfig())).startswith(
        "optimizer: AdamW on decay 15 ("
    )


def _trained(cfg: OptimConfig, steps: int) -> tuple[TinyLM, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), total_steps=10)
    _train_steps(model, opt, sched, range(steps))
    return model, opt, sched


def _train_steps(model: TinyLM, opt: torch.optim.Optimizer, sched: object, steps: range) -> None:
    """Optimizer steps ``steps`` (each with its own seeded input), as a training loop takes them."""
    for step in steps:
        torch.manual_seed(100 + step)
        loss = model(torch.randint(0, 16, (6,))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]


def test_state_round_trip_and_resume_with_new_muon_settings() -> None:
    """state_dict -> load_state_dict continues bit for bit; apply_optim_config then installs a
    changed config's muon_* and AdamW settings without touching Newton-Schulz's eps."""
    model, opt, sched = _trained(MUON, 3)
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step", "momentum_buffer"}  # fc1.weight, a Muon matrix
    assert {"exp_avg", "exp_avg_sq"} <= set(saved["state"][len(saved["state"]) - 1])

    new = OptimConfig(
        name="muon",
        lr=1e-2,
        weight_decay=0.05,
        betas=[0.8, 0.9],
        muon_momentum=0.9,
        muon_momentum_start=0.5,
        muon_momentum_warmup=7,
        muon_ns_steps=3,
    )
    _, opt_b, sched_b = _trained(MUON, 0)
    opt_b.load_state_dict(saved)
    sched_b.load_state_dict(sched.state_dict())
    eps = opt_b.param_groups[0]["eps"]
    apply_optim_config(opt_b, sched_b, new)
    muon = opt_b.param_groups[0]
    assert muon["name"] == MUON_GROUP
    assert (
        muon["momentum"],
        muon["momentum_start"],
        muon["momentum_warmup"],
        muon["ns_steps"],
        muon["weight_decay"],
        muon["eps"],
    ) == (0.9, 0.5, 7, 3, 0.05, eps)
    adamw = {g["name"]: g for g in opt_b.param_groups[1:]}
    assert adamw["decay"]["betas"] == (0.8, 0.9) and adamw["decay"]["weight_decay"] == 0.05
    assert adamw["no_decay"]["weight_decay"] == 0.0
    assert opt_b._adamw.param_groups == list(adamw.values())  # the inner AdamW sees the new groups
    assert opt_b._adamw.state is opt_b.state


def test_load_state_dict_resumes_bitwise() -> None:
    full, _, _ = _trained(MUON, 6)
    model, opt, sched = _trained(MUON, 3)
    state = (model.state_dict(), opt.state_dict(), sched.state_dict())
    model_b, opt_b, sched_b = _trained(MUON, 0)
    model_b.load_state_dict(state[0])
    opt_b.load_state_dict(state[1])
    sched_b.load_state_dict(state[2])
    _train_steps(model_b, opt_b, sched_b, range(3, 6))
    for a, b in zip(full.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_config_checks_name_the_key() -> None:
    tiny = REPO / "configs" / "tiny.yaml"
    with pytest.raises(
        ConfigError,
        match="optim.name=muon is not supported with "
        "parallel.backend=deepspeed; use parallel.backend=fsdp",
    ):
        load_config(tiny, ["--optim.name=muon", "--parallel.backend=deepspeed"])
    with pytest.raises(ConfigError, match="optim.muon_momentum=1.0 must be in"):
        load_config(tiny, ["--optim.name=muon", "--optim.muon_momentum=1.0"])
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(tiny, ["--optim.name=lion"])
    assert classify("optim.name", backend="fsdp")[0] == "refused"
    assert classify("optim.muon_momentum", backend="fsdp")[0] == "schedule"


STEPS, CKPT_AT = 10, 5


def _run(sources: list[dict], root: Path, name: str, *extra: str) -> dict[int, float]:
    run_tiny(
        sources,
        root,
        name,
        "--optim.name=muon",
        "--optim.muon_momentum_warmup=6",  # the warm-up straddles the resume step
        f"--train.steps={STEPS}",
        f"--checkpoint.interval={CKPT_AT}",
        *extra,
    )
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_tiny_run_trains_and_resumes_bitwise(tiny_sources, tmp_path, capsys) -> None:
    """configs/tiny.yaml with --optim.name=muon: the loss falls, the log names the optimizer,
    and a run resumed from its step-5 DCP checkpoint equals the straight run bit for bit."""
    straight = _run(tiny_sources, tmp_path, "straight")
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert straight[STEPS] < straight[1] - 0.3  # measured 6.95 -> 6.50
    assert (
        "optimizer: Muon on 14 matrices (98,304 params), AdamW on no_decay 6"
        in capsys.readouterr().out
    )
    ckpt = tmp_path / "straight" / "checkpoints" / f"step_{CKPT_AT:06d}"
    resumed = _run(tiny_sources, tmp_path, "resumed", f"--checkpoint.resume={ckpt}")
    assert sorted(resumed) == list(range(CKPT_AT + 1, STEPS + 1))
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # floats with ==
