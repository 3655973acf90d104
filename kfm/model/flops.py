"""Training FLOPs per token and accelerator peak FLOP/s, for MFU."""

from __future__ import annotations

import torch

from kfm.config import ModelConfig
from kfm.model.transformer import ffn_hidden_dim
from kfm.plan.hardware import gpu_for_device_name

CPU_NOMINAL_TFLOPS = 1.0
"""A nominal peak for one CPU process, so MFU shows (and can be tested) on CPU runs. It is a
round number, not a measurement: compare CPU MFU figures with each other, never with a GPU's."""


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a sequence of seq_len tokens.

    = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len, where N_matmul counts every
    weight used in a matmul (wq, wk, wv, wo, w1, w2, w3 and the output projection, also when it
    is tied) but not the embedding lookup: 2 FLOPs per weight per token forward, 4 backward.
    The second term is QK^T and AV over the full T x T score matrix (4 * T * n_heads * head_dim
    per token per layer forward, twice that backward). This is exactly what
    torch.utils.flop_counter.FlopCounterMode reports for SDPA (it ignores is_causal). Causal
    masking halves the useful attention work (block-causal document masking removes more);
    MFU conventionally still uses this full count. Norms, softmax and elementwise ops are not
    counted (FlopCounterMode does not count them either).
    """
    head_dim = cfg.d_model // cfg.n_heads
    n_kv_heads = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
    attn_params = 2 * cfg.d_model * cfg.n_heads * head_dim + 2 * cfg.d_model * n_kv_heads * head_dim
    ffn_params = 3 * cfg.d_model * ffn_hidden_dim(cfg)
    matmul_params = cfg.n_layers * (attn_params + ffn_params) + cfg.vocab_size * cfg.d_model
    attn_scores = 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len
    return float(6 * matmul_params + attn_scores)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for compute dtype "bf16", "fp8" or "fp32".

    CUDA devices come from the datasheet table `kfm.plan.hardware.GPUS`, which the capacity
    planner also uses (None for an unknown GPU, or fp8 on a GPU without it); a CPU gets
    `CPU_NOMINAL_TFLOPS`. ``train.peak_tflops`` overrides both (the caller's job).

    Raises:
        ValueError: another dtype name.
    """
    if dtype not in ("bf16", "fp8", "fp32"):
        raise ValueError(f"peak_flops dtype must be 'bf16', 'fp8' or 'fp32', got {dtype!r}")
    if device.type != "cuda":
        return CPU_NOMINAL_TFLOPS * 1e12
    gpu = gpu_for_device_name(torch.cuda.get_device_name(device))
    return gpu.peak_flops.get(dtype) if gpu else None
