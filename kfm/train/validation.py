"""Validation loss and bits per byte on held-out batches: overall, per source and per language.

bits/byte = sum of target-token losses (nats) / ln 2 / UTF-8 bytes those targets decode to. It is
comparable across tokenizers, unlike per-token loss. Targets that are the bos token (the start of
the next packed document) are left out of both sums: they carry no text and predicting them after
eos is trivial. Special tokens such as eos decode to 0 bytes but their loss counts, as in lm-eval's
bits_per_byte (the model must spend bits to end a document).

Each row of a validation batch comes from one source (``Batch.source_ids``), so the sums are kept
per source: (nats, tokens, bytes). A group's figure (all sources, one language) sums its sources'
nats and bytes, never averages their ratios. Under data parallelism each data-parallel rank
evaluates every dp_size-th batch and one all_reduce of the (sources, 3) sums gives every rank the
totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from kfm.config import DataSourceConfig
from kfm.train.dist import is_distributed
from kfm.train.loss import cross_entropy_loss


def language_groups(sources: Sequence[DataSourceConfig]) -> tuple[dict[str, list[str]], list[str]]:
    """({language: source names}, names of sources without data.sources[].language)."""
    groups: dict[str, list[str]] = {}
    for s in sources:
        if s.language is not None:
            groups.setdefault(s.language, []).append(s.name)
    return groups, [s.name for s in sources if s.language is None]


def describe_groups(sources: Sequence[DataSourceConfig]) -> str:
    """One line saying which sources make up each val_bpb/lang/<code>, and which have none."""
    groups, unknown = language_groups(sources)
    parts = [f"{lang} = {', '.join(names)}" for lang, names in groups.items()]
    if unknown:
        parts.append(f"per source only (no data.sources[].language): {', '.join(unknown)}")
    return "validation bits/byte per language: " + ("; ".join(parts) or "none")


@torch.no_grad()
def validation_sums(
    model: nn.Module,
    batches: Sequence,
    *,
    n_sources: int,
    token_bytes: np.ndarray,
    bos_id: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> torch.Tensor:
    """This rank's (n_sources, 3) float64 sums of (nats, target tokens, target bytes) per source,
    over batches ``dp_rank, dp_rank + dp_size, ...`` of ``batches`` (kfm.data.Batch).

    Every rank runs the same number of forwards, ceil(len(batches) / dp_size): a sharded model's
    forward is a collective. A rank short of a batch runs the first one again and discards it.
    With one source, or rows without ``source_ids``, every row counts for source 0.
    token_bytes: (vocab,) UTF-8 bytes per token id (kfm.tokenizer.token_byte_lengths).
    """
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.float64, device=device)
    sums = torch.zeros(n_sources, 3, dtype=torch.float64, device=device)
    mine = list(batches[dp_rank::dp_size])
    passes = -(-len(batches) // dp_size)
    for i in range(passes):
        batch = mine[i] if i < len(mine) else batches[0]
        tokens, labels = batch.tokens.to(device), batch.labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            logits = model(tokens, batch.doc_ids.to(device))
        if i >= len(mine):
            continue  # the padding forward
        if isinstance(logits, DTensor):  # TP loss parallelism: vocab-sharded logits
            logits = logits.full_tensor()  # gather once per val batch; off the training path
        ce, _ = cross_entropy_loss(logits, labels, reduction="none")  # (B, T) fp32
        keep = labels != bos_id if bos_id is not None else torch.ones_like(labels, dtype=torch.bool)
        keep64 = keep.double()
        per_row = torch.stack(  # (B, 3): nats, tokens, bytes of each row
            [
                torch.where(keep, ce.double(), 0.0).sum(1),
                keep64.sum(1),
                (byte_table[labels] * keep64).sum(1),
            ],
            dim=1,
        )
        if n_sources == 1 or batch.source_ids is None:
            sums[0] += per_row.sum(0)
        else:
            sums.index_add_(0, batch.source_ids.to(device), per_row)
    model.train(was_training)
    return sums


def sum_over_ranks(sums: torch.Tensor, *, contributes: bool) -> torch.Tensor:
    """``sums`` added over the ranks that contribute (one all_reduce); a no-op without a process
    group. Exactly one rank of each data-parallel replica contributes: the tensor-parallel ranks
    of a replica evaluate the same rows."""
    if not is_distributed():
        return sums
    out = sums if contributes else torch.zeros_like(sums)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def bpb_metrics(sums: torch.Tensor, sources: Sequence[DataSourceConfig]) -> dict[str, float]:
    """val_loss (nats/token), val_bpb and val_tokens over all sources, plus val_bpb/<source> per
    source with validation tokens and val_bpb/lang/<code> per language of data.sources.

    Raises:
        ValueError: no validation tokens at all.
    """
    rows = sums.cpu().tolist()
    nats, tokens, nbytes = (sum(col) for col in zip(*rows, strict=True))
    if tokens == 0:
        raise ValueError("validation set is empty: pack with a val split (kfm pack --val-fraction)")

    def bpb(n: float, b: float) -> float:
        return n / math.log(2) / max(b, 1.0)

    out: dict[str, float] = {
        "val_loss": nats / tokens,
        "val_bpb": bpb(nats, nbytes),
        "val_tokens": int(tokens),
    }
    by_name = dict(zip((s.name for s in sources), rows, strict=False))
    for name, (n, t, b) in by_name.items():
        if t > 0:
            out[f"val_bpb/{name}"] = bpb(n, b)
    groups, _ = language_groups(sources)
    for lang, names in groups.items():
        n, t, b = (sum(by_name[x][k] for x in names) for k in range(3))
        if t > 0:
            out[f"val_bpb/lang/{lang}"] = bpb(n, b)
    return out


def evaluate(
    model: nn.Module,
    batches: Sequence,
    *,
    token_bytes: np.ndarray,
    bos_id: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    sources: Sequence[DataSourceConfig] = (),
    dp_rank: int = 0,
    dp_size: int = 1,
    contributes: bool = True,
) -> dict[str, float]:
    """Validation metrics of ``model`` on ``batches`` (`bpb_metrics`), each rank evaluating its
    data-parallel share (`validation_sums`) and the sums added over ranks (`sum_over_ranks`).
    ``sources``: the data.sources the batches' ``source_ids`` index; () reports the overall
    figures only. Every rank must call it (the model's forward and the sum are collectives).

    Raises:
        ValueError: no validation tokens at all.
    """
    sums = validation_sums(
        model,
        batches,
        n_sources=max(len(sources), 1),
        token_bytes=token_bytes,
        bos_id=bos_id,
        device=device,
        autocast_dtype=autocast_dtype,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return bpb_metrics(sum_over_ranks(sums, contributes=contributes), sources)
