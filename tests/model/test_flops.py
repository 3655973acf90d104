"""flops_per_token against torch's FlopCounterMode; peak_flops lookup."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kfm.config import ModelConfig
from kfm.model import Transformer, flops_per_token, peak_flops
from kfm.model.flops import CPU_NOMINAL_TFLOPS


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 2, "tie_embeddings": False, "qk_norm": True, "document_masking": False},
    ],
)
def test_flops_per_token_matches_flop_counter(overrides: dict) -> None:
    cfg = ModelConfig(
        vocab_size=1024, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, attn_backend="sdpa"
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batch, seq_len = 2, 256
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    doc_ids = torch.zeros_like(tokens)
    doc_ids[:, 100:] = 1
    # The math SDPA kernel runs QK^T and AV as bmm, which FlopCounterMode counts; torch 2.13's
    # fused CPU kernel has no FLOP formula registered and would count as 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(tokens, doc_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
    measured = counter.get_total_flops() / (batch * seq_len)
    predicted = flops_per_token(cfg, seq_len)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_attention_term_grows_linearly_with_seq_len() -> None:
    cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4)
    delta = flops_per_token(cfg, 2048) - flops_per_token(cfg, 1024)
    assert delta == 12 * 4 * 128 * 1024


def test_peak_flops() -> None:
    # CPU: the documented nominal figure for every dtype, so MFU shows on CPU runs.
    for dtype in ("bf16", "fp8", "fp32"):
        assert peak_flops(torch.device("cpu"), dtype) == CPU_NOMINAL_TFLOPS * 1e12
    with pytest.raises(ValueError, match="fp8"):
        peak_flops(torch.device("cpu"), "int4")
