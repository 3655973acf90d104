"""The Llama-style decoder, its attention kernels and FLOP accounting (single-device code)."""

from kfm.model.attention import dense_mask, document_causal_mask_mod
from kfm.model.flops import flops_per_token, peak_flops
from kfm.model.transformer import Transformer, ffn_hidden_dim

__all__ = [
    "Transformer",
    "dense_mask",
    "document_causal_mask_mod",
    "ffn_hidden_dim",
    "flops_per_token",
    "peak_flops",
]
