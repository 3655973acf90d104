"""Dry-run plan for the 32 x 8 B200 presets at world size 256, in this one CPU process.

The plan comes from torch's fake process group and the real `parallelize` on meta tensors, so
these tests check its bookkeeping, not GPU behaviour: the mesh it prints, that each rank holds
1/(dp_shard * tp) of the parameters, that the memory total and its fit verdict follow the stated
formula, and that a wrong world size fails naming the --parallel.* flags.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kfm.config import ConfigError, load_config
from kfm.model.attention import build_attention_mask
from kfm.model.transformer import Transformer
from kfm.parallel import plan as plan_mod
from kfm.parallel.plan import (
    GIB,
    activation_bytes_per_token,
    block_activation_bytes_per_token,
    build_plan,
    format_plan,
)
from kfm.plan.report import dry_run_report
from tests.conftest import REPO

WORLD = 256
PRESETS = ["b200_1b", "b200_8b"]


def _cfg(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


@pytest.fixture(scope="module", params=PRESETS)
def preset(request):
    cfg = _cfg(request.param)
    plan = build_plan(cfg, WORLD)
    return cfg, plan, format_plan(cfg, plan)


def test_mesh_is_hsdp_32_by_8(preset):
    cfg, plan, report = preset
    assert plan.mesh == (32, 8, 1)
    assert "mesh: dp_replicate=32 x dp_shard=8 x tp=1" in report
    assert plan.method.startswith("fake process group")
    # every parameter is a DTensor sharded on dim 0 within the node and replicated across nodes
    assert {p.placements for p in plan.params} == {"(Replicate(), Shard(dim=0))"}


def test_rank_holds_one_eighth_of_the_parameters(preset):
    cfg, plan, _ = preset
    # FSDP2 pads dim 0 up to a multiple of dp_shard: rank 0 holds ceil(rows / 8) of each tensor.
    assert plan.local_numel == pytest.approx(plan.total_numel / 8, rel=1e-3)
    assert plan.memory.params == 4 * plan.local_numel
    assert plan.memory.optimizer == 8 * plan.local_numel
    expected_b = {"b200_1b": 1.141, "b200_8b": 8.030}[cfg.train.name]
    assert plan.total_numel / 1e9 == pytest.approx(expected_b, abs=1e-3)


def test_memory_total_and_fit_follow_the_formula(preset):
    cfg, plan, report = preset
    mem = plan.memory
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    assert plan.micro_batch_tokens == tokens
    assert mem.activations == int(activation_bytes_per_token(cfg, tp=1) * tokens)
    assert mem.fp8 == 0 and mem.tp_buffers == 0  # bf16, no TP
    assert mem.total == mem.params + mem.grads + mem.optimizer + mem.gathered + mem.activations
    assert mem.fits == (mem.total <= 0.9 * 179 * GIB)
    assert mem.fits, report  # both presets are sized to fit
    assert mem.activations_full_ac < mem.activations_no_ac
    assert plan.tokens_per_step == cfg.train.global_batch_size * cfg.data.seq_len
    assert 4.0e6 <= plan.tokens_per_step <= 4.3e6  # ~4M tokens per step
    assert "FITS" in report and f"{mem.total / GIB:.2f} GiB" in report


def test_activation_formula_by_hand():
    # 8B: h=4096, kv=8*128=1024, f=14336, n=32, n_kv=8, bf16 (a=2), t=1, V=128256; QK-norm
    # keeps fp32 copies of q and k and a rsqrt per head: 8*(h + kv) + 4*(n + n_kv).
    cfg = _cfg("b200_8b")
    qk_norm = 8 * (4096 + 1024) + 4 * (32 + 8)
    block = 2 * 2 * 4096 + (
        16 * 4096 + 2 * (2 * 4096 + 2 * 1024) + 8 * 14336 + 4 * 32 + 8 + qk_norm
    )
    assert block == 217224 + 41120
    head = 8 * 4096 + 2 * 4096 + 10 * 128256
    assert activation_bytes_per_token(cfg, tp=1, ac="none") == 32 * block + block + head
    # full AC: each block keeps its bf16 input; one block is recomputed in backward
    assert activation_bytes_per_token(cfg, tp=1, ac="full") == 32 * 2 * 4096 + 2 * block + head
    # selective every 2: blocks 0, 2, ..., 30 checkpointed
    assert activation_bytes_per_token(cfg, tp=1, ac="selective") == (
        16 * block + 16 * 2 * 4096 + 2 * block + head
    )


def test_oversized_micro_batch_does_not_fit_and_says_what_to_change():
    cfg = _cfg("b200_8b", "--train.micro_batch_size=4", "--train.global_batch_size=1024")
    plan = build_plan(cfg, WORLD)
    assert not plan.memory.fits
    report = format_plan(cfg, plan)
    assert "DOES NOT FIT" in report and "--parallel.ac=full" in report
    # the fix it names works: full activation checkpointing brings it back under budget
    cfg_ac = _cfg(
        "b200_8b",
        "--train.micro_batch_size=4",
        "--train.global_batch_size=1024",
        "--parallel.ac=full",
    )
    assert build_plan(cfg_ac, WORLD).memory.fits


def test_tp2_shards_over_dp_shard_times_tp_and_matches_the_analytic_plan():
    cfg = _cfg("b200_8b", "--parallel.dp_shard=4", "--parallel.tp=2")
    plan = build_plan(cfg, WORLD)
    assert plan.mesh == (32, 4, 2)
    assert "mesh: dp_replicate=32 x dp_shard=4 x tp=2" in format_plan(cfg, plan)
    # norms are replicated over tp (a few hundred KB), everything else splits 8 ways
    assert plan.local_numel == pytest.approx(plan.total_numel / 8, rel=1e-3)
    by_name = {p.fqn: p for p in plan.params}
    assert by_name["layers.0.attention.wo.weight"].local_shape == (1024, 2048)  # dp rows, tp cols
    assert by_name["layers.0.attention.wq.weight"].local_shape == (512, 4096)
    analytic = plan_mod._shards_analytic(cfg, plan.mesh)
    assert [p.local_shape for p in analytic] == [p.local_shape for p in plan.params]


@pytest.mark.parametrize(
    ("overrides", "world"),
    [((), 255), (("--parallel.dp_replicate=-1",), 255), (("--parallel.dp_shard=-1",), 100)],
)
def test_bad_world_size_names_the_parallel_flags(overrides, world):
    cfg = _cfg("b200_1b", *overrides)
    with pytest.raises(ConfigError, match=r"--parallel\.(dp_replicate|dp_shard|tp)") as err:
        dry_run_report(cfg, world)
    assert str(world) in str(err.value)
    assert not dist.is_initialized()


def test_batch_that_does_not_split_over_ranks_is_a_clear_error():
    cfg = _cfg("b200_8b", "--train.global_batch_size=384")  # 384 / (1 * 256) is not an integer
    with pytest.raises(ConfigError, match="--train.micro_batch_size"):
        build_plan(cfg, WORLD)


def test_no_gpu_and_no_leftover_process_group(preset):
    _, plan, _ = preset
    assert not torch.cuda.is_initialized()
    assert not dist.is_initialized()  # the fake group is torn down, so training can start after
    assert plan.params


def test_block_formula_matches_what_autograd_saves():
    # One bf16 block on CPU (the FSDP2 bf16-param layout: no autocast copies), n_kv_heads =
    # n_heads so CPU SDPA's k/v expansion does not matter. Per-sequence constants (the dense
    # mask, RoPE tables) and the parameters themselves are left out of the count.
    cfg = _cfg(
        "b200_1b",
        "--model.d_model=256",
        "--model.n_heads=4",
        "--model.n_kv_heads=4",
        "--model.ffn_hidden=768",
        "--model.max_seq_len=256",
        "--model.attn_backend=sdpa",
        "--data.seq_len=256",
    )
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    block = model.layers["0"].to(torch.bfloat16)
    batch, seq = 3, 128  # 384 tokens: no activation dim coincides with a weight dim
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = build_attention_mask(
        "sdpa", doc_ids, batch=batch, seq_len=seq, device=torch.device("cpu")
    )
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    x = torch.randn(batch, seq, 256, dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, mask)
    per_token = sum(
        t.untyped_storage().nbytes()
        for t in saved.values()
        if t.dim() >= 3
        and t.shape[0] == batch
        and t.shape[-2:] != (seq, seq)  # activations
        or t.dim() == 2
        and t.shape[0] == batch * seq
    ) / (batch * seq)
    assert per_token == pytest.approx(block_activation_bytes_per_token(cfg, tp=1), rel=1e-3)


def test_fp8_and_tp_buffers_are_counted():
    base = build_plan(_cfg("b200_8b"), WORLD).memory
    fp8 = build_plan(_cfg("b200_8b", "--parallel.fp8=tensorwise"), WORLD).memory
    # one fp8 (1-byte) copy of the live units: root unit + 2 blocks, gathered over dp_shard=8
    assert fp8.fp8 == base.gathered // (2 + 4)
    gather = build_plan(
        _cfg("b200_8b", "--parallel.fp8=tensorwise", "--parallel.fp8_all_gather=true"), WORLD
    ).memory
    # fp8 all-gather: no separate copy, and the gathered weights take 1 byte instead of 2
    assert gather.fp8 == 0 and gather.gathered == base.gathered - fp8.fp8
    tp = build_plan(_cfg("b200_8b", "--parallel.dp_shard=4", "--parallel.tp=2"), WORLD).memory
    assert tp.tp_buffers == 2 * 8192 * 4096 * 2  # two bf16 full-sequence block inputs
    assert tp.total - tp.tp_buffers == (
        tp.params + tp.grads + tp.optimizer + tp.gathered + tp.activations + tp.fp8
    )


def test_budget_follows_the_gpu():
    from kfm.plan.hardware import GPUS, USABLE_FRACTION

    plan = build_plan(_cfg("b200_8b"), WORLD, gpu=GPUS["h100"], analytic=True)
    assert plan.memory.budget == int(GPUS["h100"].hbm_bytes * USABLE_FRACTION)
    assert not plan.memory.fits  # no activation checkpointing at 8k tokens: too big for 79 GiB
    assert "H100: 79 GiB HBM" in format_plan(_cfg("b200_8b"), plan)
