"""torch.compile per transformer block.

Compiling each block rather than the whole model keeps compile time flat in depth (identical
blocks reuse one compiled graph) and leaves the block boundaries visible to FSDP2, whose
all-gather/reduce-scatter hooks run between blocks. `nn.Module.compile` compiles in place, so
parameter names do not gain torch.compile's `_orig_mod.` prefix and checkpoints are unaffected.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor


def _compile_target(block: nn.Module) -> nn.Module:
    # A checkpointed block is normally compiled with its checkpoint, so the compiler plans the
    # recomputation. With tensor-parallel (DTensor) weights torch 2.13 fails to compile that
    # combination (AOTAutograd tries to save the DeviceMesh as an activation), so there the block
    # inside the wrapper is compiled and the checkpoint runs eagerly around the compiled code.
    if isinstance(block, CheckpointWrapper) and any(
        isinstance(p, DTensor) for p in block.parameters()
    ):
        return block._checkpoint_wrapped_module
    return block


def apply_compile(model: nn.Module, *, fullgraph: bool = True) -> None:
    """Compile every block of `model.layers` (after TP and activation checkpointing) in place.

    fullgraph=True makes a graph break an error rather than a silent slowdown; a kfm block
    (sdpa attention with a dense or no mask, or flash attention, whose kernels sit behind the
    custom op `kfm::flash_varlen` that the compiler treats as opaque; SwiGLU, RMSNorm; wrapped or
    not in a checkpoint) compiles as one graph. dynamic=False: shapes are fixed by
    (micro_batch_size, seq_len), and the document mask changes values, not shapes: sdpa's dense
    mask is (B, 1, T, T); flash's cu_seqlens is padded to B*T + 1 and the document count and
    longest document travel as values of a (2,) CPU tensor (kfm.model.attention). So a new
    document layout or count causes no recompilation after the first step.
    Raises TypeError if model.layers is not an nn.ModuleDict.
    """
    layers = model.layers
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError("apply_compile expects model.layers to be an nn.ModuleDict of blocks")
    for block in layers.values():
        _compile_target(block).compile(fullgraph=fullgraph, dynamic=False)
