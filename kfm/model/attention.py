"""Causal and block-causal (document-masked) attention over three kernels: sdpa, flex, flash.

`document_causal_mask_mod` is the one mask definition: the dense SDPA mask and the flex block mask
are built from it; flash derives document segments from the same doc_ids. Head counts come from
the q/k/v shapes, never the config, so tensor parallelism can shard heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    create_mask,
    flex_attention,
)

FLASH_MISSING = "attn_backend='flash' needs flash-attn: pip install 'kfm[gpu]' (CUDA only)"
BACKENDS = ("auto", "sdpa", "flex", "flash")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def document_causal_mask_mod(doc_ids: Tensor) -> MaskMod:
    """Return the mask_mod `(b, h, q_idx, kv_idx) -> bool`: True where the query may attend.

    A query attends to keys at earlier-or-same positions of the same document.
    doc_ids is (B, T) with a per-sequence document index, non-decreasing along T.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def _causal_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def dense_mask(doc_ids: Tensor) -> Tensor:
    """Materialise the block-causal mask of doc_ids (B, T) as a bool tensor (B, 1, T, T).

    True = may attend. Memory is B * T * T bytes, which is why only the sdpa path uses it.
    """
    batch, seq_len = doc_ids.shape
    mask_mod = document_causal_mask_mod(doc_ids)
    return create_mask(mask_mod, batch, 1, seq_len, seq_len, device=doc_ids.device)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)


def _on_device(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    # Eager flex code materialises the full (T, T) score matrix; only compiled code gets the fused
    # kernel. Compiled lazily, once per process, on CUDA only (CPU runs are forward-only tests).
    return _compiled(fn) if device.type == "cuda" else fn


@dataclass(slots=True)
class AttentionMask:
    """Built once per forward by `build_attention_mask`, shared by every layer."""

    backend: str  # resolved: "sdpa", "flex" or "flash"
    dense: Tensor | None = None  # sdpa: (B, 1, T, T) bool; None = is_causal
    block_mask: BlockMask | None = None  # flex
    cu_seqlens: Tensor | None = None  # flash: (n_docs + 1,) int32; None = plain causal
    max_seqlen: int = 0  # flash: longest document in tokens


def resolve_backend(name: str, device: torch.device) -> str:
    """Map cfg.attn_backend to a kernel ("auto": flex on CUDA, else sdpa); ValueError if unknown."""
    if name not in BACKENDS:
        raise ValueError(
            f"model.attn_backend={name!r} is not one of {BACKENDS} (set --model.attn_backend)"
        )
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name


def _check_flash(device: torch.device) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise ImportError(FLASH_MISSING) from e
    if device.type != "cuda":
        raise RuntimeError(
            f"attn_backend='flash' runs on CUDA only, got tensors on {device}; "
            "set --model.attn_backend=sdpa (or auto) for CPU"
        )


def cu_seqlens_from_doc_ids(doc_ids: Tensor) -> tuple[Tensor, int]:
    """Return (cu_seqlens, max_seqlen) of doc_ids (B, T) for flash-attn varlen: int32 start
    offsets (n_docs + 1,) of every document in the flattened B*T tokens, then B*T; and the
    longest document in tokens. Documents start at t == 0 and wherever the id changes."""
    batch, seq_len = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()  # (n_docs,)
    end = torch.tensor([batch * seq_len], device=doc_ids.device, dtype=start_idx.dtype)
    cu_seqlens = torch.cat((start_idx, end)).to(torch.int32)  # (n_docs + 1,)
    # .item() syncs the device; done once per forward and shared by all layers.
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


def build_attention_mask(
    backend: str, doc_ids: Tensor | None, *, batch: int, seq_len: int, device: torch.device
) -> AttentionMask:
    """Build the mask of one forward: block-causal from doc_ids (B, T), or causal if None.

    backend is cfg.attn_backend. Raises ImportError/RuntimeError for flash without flash-attn or
    off CUDA.
    """
    backend = resolve_backend(backend, device)
    if backend == "sdpa":
        return AttentionMask("sdpa", dense=None if doc_ids is None else dense_mask(doc_ids))
    if backend == "flex":
        make = _on_device(create_block_mask, device)
        if doc_ids is None:
            block_mask = make(_causal_mask_mod, None, None, seq_len, seq_len, device=device)
        else:
            mask_mod = document_causal_mask_mod(doc_ids)
            block_mask = make(mask_mod, batch, None, seq_len, seq_len, device=device)
        return AttentionMask("flex", block_mask=block_mask)
    _check_flash(device)
    if doc_ids is None:
        return AttentionMask("flash")
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    return AttentionMask("flash", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Scaled dot-product attention with scale 1/sqrt(head_dim).

    q is (B, T, n_heads, head_dim); k and v are (B, T, n_kv_heads, head_dim) with n_kv_heads
    dividing n_heads (grouped-query attention). Returns (B, T, n_heads, head_dim).
    """
    n_heads, n_kv_heads = q.shape[2], k.shape[2]
    if mask.backend == "flash":
        return _flash(q, k, v, mask)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, n_heads or n_kv_heads, T, head_dim)
    if mask.backend == "sdpa":
        if n_kv_heads != n_heads:
            # Repeat k/v explicitly: every SDPA kernel (math, flash, mem-efficient) accepts it,
            # whereas enable_gqa with a dense mask may fall back to the slow math kernel.
            k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (B, n_heads, T, head_dim)
            v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
        if mask.dense is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    elif mask.backend == "flex":
        if q.device.type == "cpu" and q.requires_grad:
            raise RuntimeError(
                "attn_backend='flex' has no backward on CPU (torch 2.13); use "
                "--model.attn_backend=sdpa (or auto) to train on CPU, or run under torch.no_grad()"
            )
        out = _on_device(flex_attention, q.device)(
            q, k, v, block_mask=mask.block_mask, enable_gqa=n_kv_heads != n_heads
        )
    else:
        raise ValueError(f"unknown attention backend {mask.backend!r}")
    return out.transpose(1, 2)  # (B, T, n_heads, head_dim)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    _check_flash(q.device)
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"attn_backend='flash' needs bf16/fp16 activations, got {q.dtype}; "
            "set --train.dtype=bf16 or --model.attn_backend=sdpa"
        )
    if mask.cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True)  # GQA is native in flash-attn
    # Documents become separate varlen sequences: (B*T, heads, head_dim) plus their offsets.
    cu, max_len = mask.cu_seqlens, mask.max_seqlen
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, causal=True
    )
    return out.view(q.shape)
