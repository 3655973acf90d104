"""Rotary position embedding (RoPE) in the "rotate_half" layout of transformers' Llama.

The head dimension is split into a first and a second half (not interleaved pairs), so the
exported q/k weights need no permutation for Hugging Face.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Return fp32 (cos, sin) tables, each (max_seq_len, head_dim), for positions 0..max_seq_len-1.

    inv_freq[i] = 1 / theta^(2i / head_dim) for i < head_dim / 2; both halves of the head
    dimension share the same frequencies (the rotate_half convention). Computed in fp32 the way
    transformers does it, so exported models reproduce the same angles.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 2,)
    positions = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, n_heads, head_dim) by position; cos/sin are (T, head_dim) fp32 tables.

    The tables are cast to x's dtype first (so bf16 autocast activations stay bf16).
    """
    cos = cos.to(x.dtype)[None, :, None, :]  # (1, T, 1, head_dim)
    sin = sin.to(x.dtype)[None, :, None, :]
    return x * cos + _rotate_half(x) * sin
