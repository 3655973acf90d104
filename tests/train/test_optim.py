"""Parameter groups of build_optimizer, the schedules' key points, and scheduler resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfm.config import OptimConfig, ScheduleConfig
from kfm.train.optim import build_optimizer, build_scheduler, lr_at


class TinyLM(nn.Module):
    """Embedding -> norm -> 2-layer MLP -> output projection (optionally tied to the embedding)."""

    def __init__(self, *, tie: bool, output_first: bool = False) -> None:
        super().__init__()
        if output_first:  # registration order decides which name named_parameters() keeps
            self.output = nn.Linear(8, 16, bias=False)
        self.tok_embeddings = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        if not output_first:
            self.output = nn.Linear(8, 16, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.tok_embeddings(tokens))
        return self.output(self.fc2(torch.relu(self.fc1(h))))


def _groups(opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    return {g["name"]: g["params"] for g in opt.param_groups}


def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("output_first", [False, True])
def test_tied_embedding_not_decayed_and_listed_once(output_first: bool) -> None:
    model = TinyLM(tie=True, output_first=output_first)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    groups = _groups(opt)
    assert set(groups) == {"decay", "no_decay"}
    assert _ids(groups["decay"]) == {id(model.fc1.weight), id(model.fc2.weight)}
    assert _ids(groups["no_decay"]) == {
        id(model.tok_embeddings.weight),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.fc1.bias),
        id(model.fc2.bias),
    }
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len(_ids(all_params)) == len(list(model.parameters()))
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


def test_untied_output_is_decayed_and_frozen_params_skipped() -> None:
    model = TinyLM(tie=False)
    model.fc2.bias.requires_grad_(False)
    groups = _groups(build_optimizer(model, OptimConfig()))
    assert id(model.output.weight) in _ids(groups["decay"])
    assert id(model.tok_embeddings.weight) in _ids(groups["no_decay"])
    assert id(model.fc2.bias) not in _ids(groups["decay"]) | _ids(groups["no_decay"])


@pytest.mark.parametrize(
    ("impl", "foreach", "fused"),
    [("auto", True, None), ("foreach", True, None), ("for-loop", False, False)],
)
def test_impl_selects_kernel(impl: str, foreach: bool | None, fused: bool | None) -> None:
    opt = build_optimizer(TinyLM(tie=True), OptimConfig(impl=impl, betas=[0.8, 0.9]))  # type: ignore[arg-type]
    for group in opt.param_groups:
        assert group["foreach"] is foreach
        assert group["fused"] is fused
        assert group["betas"] == (0.8, 0.9)


def test_fused_on_cpu_steps() -> None:
    model = TinyLM(tie=True)
    opt = build_optimizer(model, OptimConfig(impl="fused"))
    assert all(g["fused"] for g in opt.param_groups)
    model(torch.arange(4)).sum().backward()
    before = model.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.fc1.weight)


def test_bad_betas_names_the_flag() -> None:
    with pytest.raises(ValueError, match="optim.betas"):
        build_optimizer(TinyLM(tie=True), OptimConfig(betas=[0.9]))


PEAK = 2e-3


def test_warmup_ramp_and_cosine_end_points() -> None:
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    at = lambda s: lr_at(s, total_steps=110, peak_lr=PEAK, cfg=cfg)  # noqa: E731
    assert at(0) == pytest.approx(PEAK / 10)  # first update is not zero
    assert at(4) == pytest.approx(PEAK * 5 / 10)
    assert at(9) == pytest.approx(PEAK)
    assert at(10) == pytest.approx(PEAK)  # cosine starts at the peak
    assert at(60) == pytest.approx(0.5 * (PEAK + 0.1 * PEAK))  # half-way: mean of peak and min
    assert at(85) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert at(110) == pytest.approx(0.1 * PEAK)
    assert at(500) == pytest.approx(0.1 * PEAK)
    values = [at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_plateau_and_decay_start() -> None:
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    at = lambda s: lr_at(s, total_steps=100, peak_lr=PEAK, cfg=cfg)  # noqa: E731
    assert at(0) == pytest.approx(PEAK / 5)
    assert [at(s) for s in range(4, 81)] == [pytest.approx(PEAK)] * 77  # stable up to step 80
    assert at(81) < PEAK
    assert at(90) == pytest.approx(PEAK * 0.5)
    assert at(100) == pytest.approx(0.0)


def test_wsd_1_sqrt_cooldown_of_a_given_length() -> None:
    """decay_steps fixes the cooldown's length whatever train.steps is; 1-sqrt falls fast early."""
    cfg = ScheduleConfig(
        name="wsd", warmup_steps=5, decay_steps=40, decay_shape="1-sqrt", min_lr_ratio=0.1
    )
    at = lambda s, total=100: lr_at(s, total_steps=total, peak_lr=PEAK, cfg=cfg)  # noqa: E731
    assert [at(s) for s in range(4, 61)] == [pytest.approx(PEAK)] * 57  # stable up to step 60
    assert at(70) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * (1 - math.sqrt(0.25)))
    assert at(70) < PEAK + (0.1 * PEAK - PEAK) * 0.25  # below the linear cooldown's value
    assert at(100) == pytest.approx(0.1 * PEAK)
    # the same 40-step cooldown at the end of a longer run: only where it starts moves
    assert at(170, total=200) == pytest.approx(at(70))
    assert at(159, total=200) == pytest.approx(PEAK)


def test_constant_and_no_warmup() -> None:
    cfg = ScheduleConfig(name="constant", warmup_steps=0)
    assert [lr_at(s, total_steps=10, peak_lr=PEAK, cfg=cfg) for s in (0, 5, 10)] == [PEAK] * 3


def test_unknown_schedule_names_the_flag() -> None:
    with pytest.raises(ValueError, match="schedule.name"):
        lr_at(0, total_steps=10, peak_lr=1.0, cfg=ScheduleConfig(name="linear"))  # type: ignore[arg-type]


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: range) -> list[float]:
    lrs = []
    for step in steps:
        torch.manual_seed(step)
        loss = model(torch.randint(0, 16, (6,))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_follows_lr_at_and_resumes_identically() -> None:
    cfg = ScheduleConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    ocfg = OptimConfig(lr=PEAK)
    torch.manual_seed(0)
    model = TinyLM(tie=True)
    opt = build_optimizer(model, ocfg)
    sched = build_scheduler(opt, cfg, total_steps=12)
    full = _train(model, opt, sched, range(12))
    assert full == pytest.approx(
        [lr_at(s, total_steps=12, peak_lr=PEAK, cfg=cfg) for s in range(12)]
    )

    torch.manual_seed(0)
    model_a = TinyLM(tie=True)
    opt_a = build_optimizer(model_a, ocfg)
    sched_a = build_scheduler(opt_a, cfg, total_steps=12)
    first = _train(model_a, opt_a, sched_a, range(5))
    model_state, opt_state, sched_state = (
        model_a.state_dict(),
        opt_a.state_dict(),
        sched_a.state_dict(),
    )

    torch.manual_seed(123)  # a different init: everything must come from the saved state
    model_b = TinyLM(tie=True)
    opt_b = build_optimizer(model_b, ocfg)
    sched_b = build_scheduler(opt_b, cfg, total_steps=12)
    model_b.load_state_dict(model_state)
    opt_b.load_state_dict(opt_state)
    sched_b.load_state_dict(sched_state)
    assert sched_b.last_epoch == 5
    second = _train(model_b, opt_b, sched_b, range(5, 12))
    assert first + second == full  # exact: same numbers, same order
    for p_full, p_resumed in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p_full, p_resumed)
