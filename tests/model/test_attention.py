"""Attention masks and kernels: one mask definition, three backends, no leaks across documents."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch

from kfm.config import ModelConfig
from kfm.model import Transformer, dense_mask, document_causal_mask_mod
from kfm.model.attention import (
    FLASH_MISSING,
    attention,
    build_attention_mask,
    causal_cu_seqlens,
    cu_seqlens_from_doc_ids,
    resolve_backend,
)

CPU = torch.device("cpu")
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None

# Eager FlexAttention on CPU warns that it is unfused; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def doc_ids_from_starts(seq_len: int, rows: list[list[int]]) -> torch.Tensor:
    doc_ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for b, starts in enumerate(rows):
        for start in starts:
            doc_ids[b, start:] += 1
    return doc_ids


def naive_attention(q, k, v, allowed):
    """q (B, T, H, D), k/v (B, T, Hkv, D), allowed (B, T, T) -> (B, T, H, D), explicit softmax."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_mask_mod_and_dense_mask_match_the_definition() -> None:
    doc_ids = doc_ids_from_starts(10, [[3, 7], [], [1]])
    mask = dense_mask(doc_ids)
    assert mask.shape == (3, 1, 10, 10) and mask.dtype == torch.bool
    mask_mod = document_causal_mask_mod(doc_ids)
    for b in range(3):
        for q in range(10):
            for kv in range(10):
                expected = q >= kv and doc_ids[b, q] == doc_ids[b, kv]
                got = mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(kv))
                assert bool(got) == expected
                assert bool(mask[b, 0, q, kv]) == expected


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("masked", [True, False])
def test_sdpa_flex_and_naive_agree(n_kv_heads: int, masked: bool) -> None:
    torch.manual_seed(0)
    batch, seq_len, n_heads, head_dim = 2, 150, 4, 16  # 150: not a multiple of flex's 128 blocks
    q = torch.randn(batch, seq_len, n_heads, head_dim)
    k = torch.randn(batch, seq_len, n_kv_heads, head_dim)
    v = torch.randn(batch, seq_len, n_kv_heads, head_dim)
    doc_ids = doc_ids_from_starts(seq_len, [[40, 41, 130], [100]]) if masked else None
    pos = torch.arange(seq_len)
    allowed = (pos[:, None] >= pos[None, :]).expand(batch, seq_len, seq_len)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    expected = naive_attention(q, k, v, allowed)
    for backend in ("sdpa", "flex"):
        mask = build_attention_mask(backend, doc_ids, batch=batch, seq_len=seq_len, device=CPU)
        got = attention(q, k, v, mask)
        assert got.shape == (batch, seq_len, n_heads, head_dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=backend)


def tiny_model(**overrides) -> Transformer:
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    cfg.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg))


def test_model_sdpa_and_flex_forward_agree() -> None:
    sdpa = tiny_model(attn_backend="sdpa", qk_norm=True)
    flex = tiny_model(attn_backend="flex", qk_norm=True)
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 50, (2, 40))
    doc_ids = doc_ids_from_starts(40, [[9, 30], [20]])
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens, doc_ids), sdpa(tokens, doc_ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(flex(tokens), sdpa(tokens), atol=1e-5, rtol=0)


def test_no_attention_across_documents() -> None:
    model = tiny_model(attn_backend="sdpa")
    seq_len, doc1_start, doc2_start = 32, 12, 25
    doc_ids = doc_ids_from_starts(seq_len, [[doc1_start, doc2_start]])
    tokens = torch.randint(0, 50, (1, seq_len))
    base = model(tokens, doc_ids)

    # Changing document 0 changes nothing in documents 1 and 2.
    other = tokens.clone()
    other[0, :doc1_start] = (other[0, :doc1_start] + 1) % 50
    changed = model(other, doc_ids)
    torch.testing.assert_close(changed[:, doc1_start:], base[:, doc1_start:], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[:, :doc1_start], base[:, :doc1_start], atol=1e-4)

    # Changing one token of document 1 reaches every later token of document 1 only.
    other = tokens.clone()
    other[0, doc1_start + 2] = (other[0, doc1_start + 2] + 1) % 50
    changed = model(other, doc_ids)
    torch.testing.assert_close(
        changed[:, : doc1_start + 2], base[:, : doc1_start + 2], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(changed[:, doc2_start:], base[:, doc2_start:], atol=1e-6, rtol=0)
    for t in range(doc1_start + 2, doc2_start):
        assert not torch.allclose(changed[0, t], base[0, t], atol=1e-4), t

    # Without document masking the change to document 0 does propagate.
    causal = tiny_model(attn_backend="sdpa", document_masking=False)
    causal.load_state_dict(model.state_dict())
    other = tokens.clone()
    other[0, 0] = (other[0, 0] + 1) % 50
    assert not torch.allclose(causal(other, doc_ids)[0, -1], causal(tokens, doc_ids)[0, -1])


def test_document_masking_off_is_plain_causal() -> None:
    tokens = torch.randint(0, 50, (2, 30))
    doc_ids = doc_ids_from_starts(30, [[10], [5, 6]])
    off = tiny_model(attn_backend="sdpa", document_masking=False)
    on = tiny_model(attn_backend="sdpa", document_masking=True)
    causal = off(tokens)  # is_causal=True path
    torch.testing.assert_close(off(tokens, doc_ids), causal, atol=0, rtol=0)
    # A single document under the dense block-causal mask is the same causal attention.
    one_doc = torch.zeros_like(doc_ids)
    torch.testing.assert_close(on(tokens, one_doc), causal, atol=1e-6, rtol=0)
    assert not torch.allclose(on(tokens, doc_ids), causal, atol=1e-4)


def test_cu_seqlens_from_doc_ids() -> None:
    doc_ids = doc_ids_from_starts(8, [[3], [], [1, 2, 7]])
    doc_ids[1] += 4  # ids need not restart at 0 per row; row starts always begin a document
    cu_seqlens, seq_info = cu_seqlens_from_doc_ids(doc_ids)
    assert cu_seqlens.dtype == torch.int32
    # 7 document starts, then the end 24 repeated up to the fixed length B*T + 1 = 25.
    assert cu_seqlens.tolist() == [0, 3, 8, 16, 17, 18, 23] + [24] * 18
    assert seq_info.device.type == "cpu" and seq_info.tolist() == [7, 8]  # [n_docs, longest]
    cu_seqlens, seq_info = causal_cu_seqlens(3, 8, CPU)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 8, 16] + [24] * 22
    assert seq_info.device.type == "cpu" and seq_info.tolist() == [3, 8]


def test_backend_resolution() -> None:
    assert resolve_backend("auto", CPU) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_backend("flex", CPU) == "flex"
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_backend("xformers", CPU)


def test_flex_backward_on_cpu_is_refused_clearly() -> None:
    model = tiny_model(attn_backend="flex")
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        model(torch.randint(0, 50, (1, 8)))


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed")
def test_flash_without_flash_attn_names_the_fix() -> None:
    model = tiny_model(attn_backend="flash")
    with pytest.raises(ImportError) as info:
        model(torch.randint(0, 50, (1, 8)), doc_ids_from_starts(8, [[4]]))
    assert str(info.value) == FLASH_MISSING
    assert "pip install 'kfm[gpu]'" in FLASH_MISSING


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_backends_match_sdpa(backend: str) -> None:
    if backend == "flash" and not HAS_FLASH:
        pytest.skip("flash-attn not installed")
    sdpa = tiny_model(attn_backend="sdpa").cuda()
    other = tiny_model(attn_backend=backend).cuda()
    other.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 50, (2, 64), device="cuda")
    doc_ids = doc_ids_from_starts(64, [[9, 30], [20]]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
        expected, got = sdpa(tokens, doc_ids).float(), other(tokens, doc_ids).float()
        got.sum().backward()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
