"""Tensor parallelism (Megatron-style, with sequence parallelism) for kfm's Transformer via DTensor.

Layouts along the tensor-parallel mesh, per block (T = sequence, D = d_model, tp = mesh size):

    tokens (B, T) replicated
      -> tok_embeddings   rowwise (vocab-sharded table); reduce-scatter -> (B, T/tp, D) Shard(1)
      -> attention_norm   sequence parallel: each rank normalises its own T/tp positions
      -> attention        all-gather -> (B, T, D); wq/wk/wv colwise (heads sharded), so RoPE, the
                          dense document mask and SDPA see the full sequence with n_heads/tp heads;
                          wo rowwise, reduce-scatter -> (B, T/tp, D)
      -> ffn_norm         sequence parallel
      -> feed_forward     all-gather; w1/w3 colwise (hidden sharded), w2 rowwise, reduce-scatter
      -> norm             sequence parallel
      -> output           all-gather; colwise -> logits (B, T, V) replicated, or (B, T, V/tp)
                          Shard(-1) with loss_parallel (the loss then never gathers the vocab)

The residual stream between these modules is a (B, T, D) DTensor sharded Shard(1) (each rank holds
(B, T/tp, D)), so residual adds are local and the model code needs no change: attention takes its
head count from the sharded weights (view with -1). Keeping it a DTensor, not a local tensor, is
also what lets torch.compile'd blocks take it as input (torch 2.13's AOTAutograd mishandles the
gradient of a block input produced by DTensor.to_local). Per-sequence inputs (RoPE tables, the
(B, 1, T, T) document mask) are built from full-length tokens/doc_ids in Transformer.forward and
used only inside attention, where the sequence is whole.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from kfm.model.transformer import Transformer, ffn_hidden_dim


def check_tp_degree(model: Transformer, tp: int) -> None:
    """Raise ValueError unless tp divides n_heads, n_kv_heads and the SwiGLU hidden width.

    Heads must split evenly because every rank reshapes its shard into whole heads (and q/k
    norms treat the local heads as an even Shard of the global ones).
    """
    cfg = model.cfg
    n_kv_heads = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
    sizes = {
        "model.n_heads": cfg.n_heads,
        "model.n_kv_heads": n_kv_heads,
        "the SwiGLU hidden width (model.ffn_hidden)": ffn_hidden_dim(cfg),
    }
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(
                f"tensor parallel degree --parallel.tp={tp} must divide {name}={size} "
                "(choose a --parallel.tp that divides it)"
            )


def _block_plan() -> dict[str, ParallelStyle]:
    # Block inputs are (x, cos, sin, mask): only x is a sequence-sharded activation; the others
    # are full-length and identical on every rank, so they pass through untouched (None).
    gather_x = PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None),
        desired_input_layouts=(Replicate(), None, None, None),
    )
    return {
        "attention_norm": SequenceParallel(),
        "attention": gather_x,
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def _qk_norm_plan() -> dict[str, ParallelStyle]:
    # q/k norms act per head on (B, T, heads/tp, head_dim). Declaring that input Shard(2) makes
    # the (replicated) weight's gradient a partial sum over ranks that DTensor all-reduces; as
    # plain modules each rank would keep a gradient from its own heads only, and ranks diverge.
    return {
        "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool = False) -> None:
    """Shard `model` (a kfm Transformer) over the 1-D `tp_mesh` in place; see the module docstring.

    loss_parallel=True leaves the logits a DTensor sharded on the vocab dim (B, T, V/tp): compute
    the loss, and run backward, inside `loss_parallel_context(True)`. Otherwise logits are a
    plain replicated (B, T, V) tensor. Tied embeddings stay tied: the input table (rowwise) and
    the output projection (colwise) are both sharded along the vocab dim, so one DTensor serves
    both. Every TP rank must see the same tokens; the sequence length must be divisible by the
    TP degree (checked per forward). Raises ValueError for an indivisible --parallel.tp and
    TypeError if model is not a kfm Transformer.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"apply_tp expects a kfm Transformer, got {type(model).__name__}")
    tp = tp_mesh.size()
    check_tp_degree(model, tp)
    tied = model.output.weight is model.tok_embeddings.weight

    top_plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        ),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    parallelize_module(model, tp_mesh, top_plan)
    for block in model.layers.values():
        plan = _block_plan()
        if model.cfg.qk_norm:
            plan |= _qk_norm_plan()
        parallelize_module(block, tp_mesh, plan)
    if tied:
        # parallelize_module replaced each module's weight with its own new DTensor parameter;
        # both are Shard(0) over the vocab rows of the same values, so re-point output at the
        # embedding's to keep one parameter (and one optimizer state) as in the single-device model.
        model.output.weight = model.tok_embeddings.weight

    def _check_seq_len(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seq_len = args[0].shape[1]
        if seq_len % tp:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by --parallel.tp={tp}: sequence "
                "parallelism splits it evenly across ranks (set --data.seq_len to a multiple)"
            )

    model.register_forward_pre_hook(_check_seq_len)


def loss_parallel_context(enabled: bool) -> AbstractContextManager[Any]:
    """Context for the loss and its backward when apply_tp(loss_parallel=True) sharded the logits.

    Inside it F.cross_entropy works on vocab-sharded logits without all-gathering them (each rank
    computes its partial log-sum-exp; only (B, T) statistics cross the network). Both the loss
    computation and `loss.backward()` must run inside. enabled=False returns a no-op context.
    """
    return loss_parallel() if enabled else nullcontext()


def local_loss(loss: Tensor) -> Tensor:
    """The loss as a plain tensor: under loss parallelism it is a replicated DTensor."""
    full_tensor = getattr(loss, "full_tensor", None)
    return full_tensor() if full_tensor is not None else loss
