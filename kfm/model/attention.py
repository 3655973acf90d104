"""Causal and block-causal (document-masked) attention over three kernels: sdpa, flex, flash.

`document_causal_mask_mod` is the one mask definition: the dense SDPA mask and the flex block mask
are built from it; flash derives document segments from the same doc_ids. Head counts come from
the q/k/v shapes, never the config, so tensor parallelism can shard heads.

flash runs flash-attn's varlen kernels through the custom op `kfm::flash_varlen` (backward:
`kfm::flash_varlen_backward`), which torch.compile treats as one opaque op. Its tensor inputs
have shapes fixed by (B, T), whatever the number of documents, so a compiled block never
recompiles because the document count changed; see `AttentionMask` and `cu_seqlens_from_doc_ids`.
Both ops have a CUDA kernel (flash-attn's) and a fake implementation for tracing; other devices
have none.
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
    # flash: (B*T + 1,) int32 start offsets of the n sequences (documents, or rows without
    # doc_ids) in the flattened B*T tokens, then B*T repeated to fill the fixed length.
    cu_seqlens: Tensor | None = None
    # flash: (2,) int64 on the CPU: [n, longest sequence in tokens], read by the op on the host.
    seq_info: Tensor | None = None


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


# Fixed-shape varlen metadata. torch.compile(dynamic=False) specialises on every input shape, so
# a (n_docs + 1,) cu_seqlens would recompile each block for every new document count until the
# recompile limit sends it back to eager. Instead:
# - cu_seqlens is padded to B*T + 1, the one length that bounds every batch (a document has at
#   least one token); the padding repeats B*T, i.e. zero-length sequences. 4 bytes per token.
# - flash-attn is never handed the padding: the op slices cu_seqlens[: n + 1] first, where n comes
#   from the CPU tensor seq_info (a fixed-shape graph input; dynamo guards on its shape, not its
#   values). flash-attn varlen sizes its work by the sequence count b: the forward launches
#   ceil(max_seqlen / block) x b x heads thread blocks (block 64-128 rows; those past a
#   sequence's end exit at once), and the backward allocates an fp32 dQ accumulator of
#   (total + 128 * b) x heads x head_dim (csrc/flash_attn/flash_api.cpp, mha_varlen_bwd). With
#   b = B*T that is 129x the q activations in fp32, per layer: ~69 GB at B*T = 32768, 32 heads,
#   head_dim 128. (Padding n to a power of two would bound that waste at 2x but recompile up to
#   log2(B*T) times; slicing costs neither.)
# - The price is one device-to-host copy per forward, of [n, longest document], in
#   `cu_seqlens_from_doc_ids`: n sizes flash's grid and buffers, host-side decisions, so some sync
#   is unavoidable while doc_ids arrive on the device only (the previous code synced twice:
#   nonzero and .item()). Layers then run sync-free. The longest document rides along in the same
#   copy, so flash's max_seqlen is exact; the bound T would be equally valid but launch
#   ceil(T / 128) row (forward) or column (backward) blocks per document, mostly empty when
#   documents are short.


def cu_seqlens_from_doc_ids(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Return (cu_seqlens, seq_info) of doc_ids (B, T) for `kfm::flash_varlen`.

    cu_seqlens: (B*T + 1,) int32 on doc_ids' device, the start offset of each of the n documents
    in the flattened B*T tokens, then B*T repeated (n + 1 to B*T + 1: the end, and zero-length
    padding). Documents start at t == 0 and wherever the id changes. seq_info: (2,) int64 on the
    CPU, [n, longest document in tokens]; computing it is this forward's one host sync.
    """
    batch, seq_len = doc_ids.shape
    n_tokens = batch * seq_len
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_of_token = starts.flatten().cumsum(0) - 1  # (B*T,) 0..n-1, non-decreasing
    # First token of document j, for j = 0..B*T; B*T for every j >= n. No data-dependent shapes.
    bounds = torch.arange(n_tokens + 1, device=doc_ids.device)
    cu_seqlens = torch.searchsorted(doc_of_token, bounds, out_int32=True)  # (B*T + 1,)
    longest = (cu_seqlens[1:] - cu_seqlens[:-1]).max().to(doc_of_token.dtype)
    seq_info = torch.stack((doc_of_token[-1] + 1, longest)).cpu()  # the host sync
    return cu_seqlens, seq_info


def causal_cu_seqlens(batch: int, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(cu_seqlens, seq_info) for plain causal attention: each of the B rows is one sequence.

    Same layout as `cu_seqlens_from_doc_ids` (padded to B*T + 1), built without a host sync.
    """
    n_tokens = batch * seq_len
    cu_seqlens = torch.arange(n_tokens + 1, device=device).mul_(seq_len).clamp_(max=n_tokens)
    return cu_seqlens.to(torch.int32), torch.tensor([batch, seq_len], dtype=torch.int64)


def build_attention_mask(
    backend: str, doc_ids: Tensor | None, *, batch: int, seq_len: int, device: torch.device
) -> AttentionMask:
    """Build the mask of one forward: block-causal from doc_ids (B, T), or causal if None.

    backend is cfg.attn_backend. Raises ImportError for flash without flash-attn and
    RuntimeError for flash off CUDA (`_check_flash`).
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
        cu_seqlens, seq_info = causal_cu_seqlens(batch, seq_len, device)
    else:
        cu_seqlens, seq_info = cu_seqlens_from_doc_ids(doc_ids)
    return AttentionMask("flash", cu_seqlens=cu_seqlens, seq_info=seq_info)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Scaled dot-product attention with scale 1/sqrt(head_dim).

    q is (B, T, n_heads, head_dim); k and v are (B, T, n_kv_heads, head_dim) with n_kv_heads
    dividing n_heads (grouped-query attention). Returns (B, T, n_heads, head_dim). flash calls
    `kfm::flash_varlen`, whose one kernel is flash-attn's on CUDA: bf16/fp16 activations and
    head_dim a multiple of 8 up to 256 (`_check_flash_inputs`).
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
    if mask.cu_seqlens is None or mask.seq_info is None:
        raise ValueError(
            "a flash AttentionMask needs cu_seqlens and seq_info (build_attention_mask)"
        )
    if q.device.type != "cuda":
        _check_flash(q.device)
    # Sequences become varlen segments of the flattened (B*T, heads, head_dim); GQA is native.
    out, _ = flash_varlen(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        mask.cu_seqlens,
        mask.seq_info,
        q.shape[-1] ** -0.5,
    )
    return out.view(q.shape)


def _check_flash_inputs(q: Tensor) -> None:
    """Refuse what flash-attn's kernels lack: q (N, H, D) not bf16/fp16, or D (head_dim) not a
    multiple of 8 or above 256 (flash-attn itself checks that k and v match q)."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"attn_backend='flash' needs bf16/fp16 activations, got {q.dtype}; "
            "set --train.dtype=bf16 or --model.attn_backend=sdpa"
        )
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > 256:
        raise RuntimeError(
            f"attn_backend='flash' needs head_dim a multiple of 8 and at most 256, got "
            f"{head_dim}; change model.d_model / model.n_heads or use attn_backend=flex"
        )


def _unpack(cu_seqlens: Tensor, seq_info: Tensor) -> tuple[Tensor, int]:
    # seq_info is on the CPU: no device sync. Drops the zero-length padding of cu_seqlens.
    n_seqs, max_seqlen = (int(x) for x in seq_info.tolist())
    return cu_seqlens[: n_seqs + 1], max_seqlen


# The kernels below are flash-attn's (>= 2.7, the `gpu` extra; these positional signatures are
# unchanged through 2.8), registered for CUDA only: on any other device the dispatcher finds no
# kernel for the ops. `build_attention_mask` refuses attn_backend='flash' before that, off CUDA or
# without flash-attn.


@torch.library.custom_op("kfm::flash_varlen", mutates_args=(), device_types="cuda")
def flash_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, seq_info: Tensor, softmax_scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention inside each sequence of a `build_attention_mask` flash mask.

    q (N, H, D), k and v (N, H_kv, D) with H_kv dividing H; cu_seqlens (N + 1,) and seq_info as in
    `AttentionMask`. Returns (out (N, H, D), lse (H, N) fp32: the log-sum-exp of each query's
    scaled scores), contiguous. Opaque to torch.compile; differentiable in q, k, v. The kernel is
    flash-attn's, for CUDA (RuntimeError outside bf16/fp16 or its head dims); other devices have
    none.
    """
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    _check_flash_inputs(q)
    cu, max_seqlen = _unpack(cu_seqlens, seq_info)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # dropout_p=0, causal=True; returns (out, lse, S_dmask, rng_state).
    out, lse, _, _ = _flash_attn_varlen_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, softmax_scale, True
    )
    return out.contiguous(), lse.contiguous()


@flash_varlen.register_fake
def _flash_varlen_fake(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, seq_info: Tensor, softmax_scale: float
) -> tuple[Tensor, Tensor]:
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("kfm::flash_varlen_backward", mutates_args=(), device_types="cuda")
def flash_varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    seq_info: Tensor,
    softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `flash_varlen`'s out, given dout and its saved out and lse;
    contiguous, shaped like q, k, v. The kernel is flash-attn's, for CUDA; other devices have
    none."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    _check_flash_inputs(q)
    cu, max_seqlen = _unpack(cu_seqlens, seq_info)
    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Writes dq, dk, dv. Arguments after softmax_scale: causal, window (-1, -1) = unlimited,
    # softcap 0, no alibi, deterministic=False, no rng_state (no dropout).
    _flash_attn_varlen_backward(
        dout, q, k, v, out, lse, dq, dk, dv, cu, cu, max_seqlen, max_seqlen, 0.0, softmax_scale,
        True, -1, -1, 0.0, None, False, None,
    )  # fmt: skip
    return dq, dk, dv


@flash_varlen_backward.register_fake
def _flash_varlen_backward_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    seq_info: Tensor,
    softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_varlen_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, v, cu_seqlens, seq_info, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seq_info)
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _flash_varlen_grad(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, cu_seqlens, seq_info = ctx.saved_tensors
    dq, dk, dv = flash_varlen_backward(
        dout, q, k, v, out, lse, cu_seqlens, seq_info, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None


flash_varlen.register_autograd(_flash_varlen_grad, setup_context=_flash_varlen_setup_context)
