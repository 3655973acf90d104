"""Stability options of the model: zero-initialised residual outputs and head, logit soft-capping,
and the weight-decay groups of the real Transformer (tied and untied head).

The last two tests train configs/tiny.yaml with the options on, as one process and on two gloo
ranks (FSDP2; TP with vocab-sharded logits), then check that `kfm export` refuses the result.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kfm.config import ConfigError, ModelConfig, OptimConfig, load_config
from kfm.export.gguf import gguf_state_dict
from kfm.export.hf import ExportError, export_hf, to_hf_state_dict
from kfm.model import Transformer
from kfm.model.transformer import softcap
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import build_optimizer
from kfm.train.validation import validation_sums
from tests.conftest import REPO, TOKENIZER
from tests.model.test_transformer import build, tiny
from tests.parallel.harness import relative_error, run_train, shared_root

RESIDUAL_OUT = ("attention.wo.weight", "feed_forward.w2.weight")


def tokens(cfg: ModelConfig, shape: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(1))


# -- zero init ---------------------------------------------------------------------------------


def test_zero_init_output_zeroes_wo_w2_and_keeps_every_other_weight() -> None:
    zero = build(tiny(zero_init_output=True)).state_dict()
    default = build(tiny()).state_dict()
    zeroed = [k for k in zero if k.endswith(RESIDUAL_OUT)]
    assert len(zeroed) == 4  # 2 layers x (wo, w2)
    for name, value in zero.items():
        if name.endswith(RESIDUAL_OUT):
            assert not value.any(), name
            assert default[name].abs().max() > 0, name  # not zero by default
        else:
            assert torch.equal(value, default[name]), name


def test_zero_init_on_meta_then_to_empty_then_init_weights() -> None:
    """The path FSDP2/eval builds take: no memory at construction, init in place afterwards."""
    cfg = tiny(zero_init_output=True, zero_init_head=True, tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    eager = build(cfg)
    torch.manual_seed(0)  # construction drew nn.Linear's own init first: re-draw ours alone
    eager.init_weights()
    want = eager.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert not model.output.weight.any()
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith(RESIDUAL_OUT))


def test_zero_init_output_makes_the_first_forward_skip_the_blocks() -> None:
    """With wo = w2 = 0 every block adds exactly 0: logits = output(norm(embedding)). Without the
    option the blocks contribute and the equality fails."""
    for zero_init in (True, False):
        cfg = tiny(zero_init_output=zero_init)
        model = build(cfg)
        x = tokens(cfg)
        skip = model.output(model.norm(model.tok_embeddings(x)))
        assert torch.equal(model(x), skip) is zero_init


def test_zero_init_output_blocks_start_learning_on_the_second_step() -> None:
    """Step 1: only wo/w2 (and embedding, norms, head) get gradients, the branch's inner weights
    none (wo = 0 cuts their path); once wo/w2 moved, step 2 reaches wq and w1."""
    cfg = tiny(zero_init_output=True)
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = tokens(cfg), tokens(cfg).roll(1, dims=1)
    params = dict(model.named_parameters())
    inner = [params["layers.0.attention.wq.weight"], params["layers.0.feed_forward.w1.weight"]]
    outer = [params["layers.0.attention.wo.weight"], params["layers.0.feed_forward.w2.weight"]]
    for step in (1, 2):
        opt.zero_grad()
        cross_entropy_loss(model(x), y)[0].backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in outer), step
        grads = [p.grad for p in inner]
        assert all(g is not None and bool(g.abs().max() > 0) is (step == 2) for g in grads), step
        opt.step()


def test_zero_init_head_gives_uniform_first_logits() -> None:
    cfg = tiny(zero_init_head=True, tie_embeddings=False)
    model = build(cfg)
    assert not model.output.weight.any()
    assert model.tok_embeddings.weight.abs().max() > 0
    logits = model(tokens(cfg))
    assert not logits.any()
    loss, _ = cross_entropy_loss(logits, tokens(cfg))
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=1e-6)


def test_zero_init_head_refuses_a_tied_head() -> None:
    with pytest.raises(ValueError, match="--model.tie_embeddings=false"):
        Transformer(tiny(zero_init_head=True))
    with pytest.raises(
        ConfigError, match=r"model.zero_init_head=true .*--model.tie_embeddings=false"
    ):
        load_config(None, ["--model.zero_init_head=true"])
    cfg = load_config(None, ["--model.zero_init_head=true", "--model.tie_embeddings=false"])
    assert cfg.model.zero_init_head and not cfg.model.tie_embeddings


# -- logit soft-capping ------------------------------------------------------------------------


def test_softcap_bounds_the_logits_and_changes_the_loss() -> None:
    cap = 0.5  # below the tiny model's largest initial logits, so the cap bites
    capped = build(tiny(logit_softcap=cap))
    plain = build(tiny())
    assert torch.equal(capped.output.weight, plain.output.weight)  # same weights, same seed
    x, y = tokens(capped.cfg), tokens(capped.cfg).roll(1, dims=1)
    raw, out = plain(x), capped(x)
    assert raw.abs().max() > cap
    assert out.abs().max() <= cap
    torch.testing.assert_close(out, cap * torch.tanh(raw / cap), rtol=0, atol=1e-6)
    assert cross_entropy_loss(out, y)[0].item() != pytest.approx(
        cross_entropy_loss(raw, y)[0].item(), rel=1e-3
    )


def test_softcap_gradient_and_dtype() -> None:
    """The hand-written backward equals autograd's tanh; bf16 logits give fp32 capped logits and
    a bf16 gradient."""
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softcap(t, 1.5), (x,))
    ref = torch.randn(4, 11, requires_grad=True)
    mine = ref.detach().clone().requires_grad_()
    weights = torch.randn(4, 11)
    ((2.0 * torch.tanh(ref / 2.0)) * weights).sum().backward()
    (softcap(mine, 2.0) * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-6, atol=1e-6)
    low = torch.randn(2, 9, dtype=torch.bfloat16, requires_grad=True)
    out = softcap(low, 3.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cap > 0"):
        softcap(out, 0.0)


def test_softcap_saves_only_its_output() -> None:
    """No second (B, T, V) fp32 tensor for backward: the one saved is the returned logits."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    logits = torch.randn(2, 6, 13, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = softcap(logits * 1.0, 4.0)
    assert len(saved) == 1 and saved[0].data_ptr() == out.data_ptr()


def test_softcap_must_not_be_negative() -> None:
    with pytest.raises(
        ConfigError, match=r"model.logit_softcap=-1.0 must be >= 0 .*--model.logit_softcap"
    ):
        load_config(None, ["--model.logit_softcap=-1"])
    assert load_config(None, []).model.logit_softcap == 0.0


def test_validation_bits_per_byte_use_the_capped_logits() -> None:
    cap = 0.5
    model = build(tiny(logit_softcap=cap))
    plain = build(tiny())
    x = tokens(model.cfg)
    y = x.roll(-1, dims=1)
    batch = SimpleNamespace(tokens=x, labels=y, doc_ids=torch.zeros_like(x), source_ids=None)
    kw: dict[str, Any] = dict(
        n_sources=1, token_bytes=np.ones(97), bos_id=None, device=torch.device("cpu")
    )
    nats = validation_sums(model, [batch], **kw)[0, 0].item()
    with torch.no_grad():
        want = F.cross_entropy(
            cap * torch.tanh(plain(x) / cap).flatten(0, 1), y.flatten(), reduction="sum"
        )
    assert nats == pytest.approx(want.item(), rel=1e-6)
    assert validation_sums(plain, [batch], **kw)[0, 0].item() != pytest.approx(nats, rel=1e-3)


def test_kfm_eval_forward_uses_the_capped_logits() -> None:
    from transformers import AutoTokenizer

    from eval.lm import KfmLM

    cap = 0.5
    model = build(tiny(vocab_size=1024, logit_softcap=cap))
    lm = KfmLM.from_model(
        model, AutoTokenizer.from_pretrained(TOKENIZER), device="cpu", progress=False
    )
    logits = lm._forward([[5, 6, 7, 8], [9, 10]])
    plain = build(tiny(vocab_size=1024))
    with torch.no_grad():
        want = cap * torch.tanh(plain(torch.tensor([[5, 6, 7, 8]])) / cap)
    assert logits.abs().max() <= cap
    torch.testing.assert_close(logits[:1], want, rtol=0, atol=1e-6)


def test_export_refuses_a_soft_capped_model(tmp_path) -> None:
    cfg = tiny(logit_softcap=15.0)
    state = build(cfg).state_dict()
    for export in (
        lambda: export_hf(state, cfg, tmp_path / "hf", tokenizer_dir=None),
        lambda: to_hf_state_dict(state, cfg),
        lambda: gguf_state_dict(state, cfg),
    ):
        with pytest.raises(
            ExportError, match=r"model.logit_softcap=15: .*no final-logit soft-capping"
        ):
            export()
    assert not (tmp_path / "hf").exists()


# -- weight decay groups of the real model -----------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_decay_groups_of_the_transformer(tie: bool) -> None:
    """Matrices decay; the embedding (also the tied head) and every norm do not; an untied head
    is a matrix like the others and decays."""
    model = build(tiny(tie_embeddings=tie, qk_norm=True))
    groups = {
        g["name"]: {id(p) for p in g["params"]}
        for g in build_optimizer(model, OptimConfig()).param_groups
    }
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i in groups["no_decay"]}
    decay = {names[i] for i in groups["decay"]}
    assert "tok_embeddings.weight" in no_decay
    assert ("output.weight" in decay) is not tie
    assert {n for n in names.values() if "norm" in n} <= no_decay
    assert len([n for n in no_decay if "norm" in n]) == 1 + 2 * 4  # final + 4 per layer (qk_norm)
    assert decay == {
        n
        for n in names.values()
        if n.endswith(
            (
                ".wq.weight",
                ".wk.weight",
                ".wv.weight",
                ".wo.weight",
                ".w1.weight",
                ".w2.weight",
                ".w3.weight",
                "output.weight",
            )
        )
    } - ({"output.weight"} if tie else set())


# -- through `kfm train` on gloo ranks, and `kfm export` ------------------------------------------

STEPS = 3
OPTIONS = (
    f"--train.steps={STEPS}",
    "--train.micro_batch_size=2",
    f"--checkpoint.interval={STEPS}",
    "--model.zero_init_output=true",
    "--model.logit_softcap=3",
    "--model.tie_embeddings=false",
)


def _parity(run, ref, *, rtol: float = 1e-5) -> None:
    got, want = run.losses(), ref.losses()
    assert sorted(got) == list(range(1, STEPS + 1)), got
    assert max(relative_error(got[s], want[s]) for s in got) < rtol, (got, want)
    val, ref_val = run.val_losses(), ref.val_losses()
    assert sorted(val) == sorted(ref_val) == [0, STEPS]
    assert max(relative_error(val[s], ref_val[s]) for s in val) < rtol, (val, ref_val)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mesh",
    [(), ("--parallel.dp_shard=1", "--parallel.tp=2", "--parallel.loss_parallel=true")],
    ids=["fsdp2", "tp2-loss-parallel"],
)
def test_options_on_two_ranks_match_one_process(tiny_sources, tmp_path_factory, mesh) -> None:
    """Zero init reaches the FSDP2 and TP builds; soft-capping of replicated and of vocab-sharded
    (loss-parallel) logits, in training and in validation, matches one process (fp32 bounds of
    tests/parallel/test_fsdp.py)."""
    root = shared_root(tmp_path_factory)
    ref = run_train(tiny_sources, root, "options-single", nproc=0, args=OPTIONS)
    name = "options-" + ("tp2" if mesh else "fsdp2")
    run = run_train(tiny_sources, root, name, nproc=2, args=(*OPTIONS, *mesh))
    _parity(run, ref)


@pytest.mark.distributed
def test_kfm_export_refuses_a_soft_capped_checkpoint(
    tiny_sources, tmp_path_factory, tmp_path
) -> None:
    root = shared_root(tmp_path_factory)
    ref = run_train(tiny_sources, root, "options-single", nproc=0, args=OPTIONS)
    for fmt in ("hf", "gguf"):
        out = tmp_path / fmt
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kfm_cli",
                "export",
                str(ref.checkpoint(STEPS)),
                str(out),
                "--format",
                fmt,
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert (
            "model.logit_softcap=3" in proc.stderr and "no final-logit soft-capping" in proc.stderr
        )
        assert not out.exists()
