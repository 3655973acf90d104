"""Validation loss and bits per byte on held-out batches.

bits/byte = sum of target-token losses (nats) / ln 2 / UTF-8 bytes those targets decode to. It is
comparable across tokenizers, unlike per-token loss. Targets that are the bos token (the start of
the next packed document) are left out of both sums: they carry no text and predicting them after
eos is trivial. Special tokens such as eos decode to 0 bytes but their loss counts, as in lm-eval's
bits_per_byte (the model must spend bits to end a document).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from kfm.train.loss import cross_entropy_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence,
    *,
    token_bytes: np.ndarray,
    bos_id: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean validation loss (nats/token) and bits per byte over ``batches`` (kfm.data.Batch).

    token_bytes: (vocab,) UTF-8 bytes per token id (kfm.tokenizer.token_byte_lengths).
    """
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.float64)
    total_nats, total_tokens, total_bytes = 0.0, 0, 0.0
    for batch in batches:
        tokens, labels = batch.tokens.to(device), batch.labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            logits = model(tokens, batch.doc_ids.to(device))
        if isinstance(logits, DTensor):  # TP loss parallelism: vocab-sharded logits
            logits = logits.full_tensor()  # gather once per val batch; off the training path
        ce, _ = cross_entropy_loss(logits, labels, reduction="none")  # (B, T) fp32
        keep = labels != bos_id if bos_id is not None else torch.ones_like(labels, dtype=torch.bool)
        total_nats += ce[keep].double().sum().item()
        total_tokens += int(keep.sum().item())
        total_bytes += byte_table[labels[keep].cpu()].sum().item()
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("validation set is empty: pack with a val split (kfm pack --val-fraction)")
    return {
        "val_loss": total_nats / total_tokens,
        "val_bpb": total_nats / math.log(2) / max(total_bytes, 1.0),
        "val_tokens": total_tokens,
    }
