"""Next-token loss, computed in fp32 whatever the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, z_loss: float = 0.0, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-level cross-entropy (nats) plus optional z-loss.

    logits: (B, T, V) in any dtype; upcast to fp32 here because bf16 log-softmax over a large
    vocabulary loses several bits. labels: (B, T) int64. Returns (ce, z) where ce is the mean
    (or per-token with reduction="none") cross-entropy and z the z-loss term (None when z_loss=0):
    z_loss * mean(logsumexp(logits)^2), which keeps the softmax normaliser near 1 (PaLM).
    """
    logits = logits.float()
    flat = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    ce = F.cross_entropy(flat, labels.reshape(-1), reduction=reduction)
    if reduction == "none":
        ce = ce.view_as(labels)
    if z_loss <= 0.0:
        return ce, None
    lse = torch.logsumexp(flat, dim=-1)
    return ce, z_loss * lse.pow(2).mean()
