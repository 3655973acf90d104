"""A Llama-style decoder: RMSNorm pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Parameter names are frozen: the exporter maps them 1:1 to Llama/Qwen3ForCausalLM (qk_norm).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kfm.config import ModelConfig
from kfm.model.attention import AttentionMask, attention, build_attention_mask


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: cfg.ffn_hidden, or 8/3 * d_model rounded up to cfg.ffn_multiple_of."""
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.d_model / 3)
    return cfg.ffn_multiple_of * math.ceil(hidden / cfg.ffn_multiple_of)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, *, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Return fp32 (cos, sin) RoPE tables, each (max_seq_len, head_dim), for positions 0..max-1.

    inv_freq[i] = 1 / theta^(2i / head_dim); both halves of head_dim share these frequencies, the
    non-interleaved "rotate_half" layout of transformers' Llama, so q/k weights export as they are.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 2,)
    positions = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, n_heads, head_dim) by position; cos/sin (T, head_dim) are cast to x.dtype."""
    cos = cos.to(x.dtype)[None, :, None, :]  # (1, T, 1, head_dim)
    sin = sin.to(x.dtype)[None, :, None, :]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class _SoftCap(torch.autograd.Function):
    """cap * tanh(x / cap) in fp32, saving only its output for backward.

    d/dx = 1 - tanh^2 = 1 - (out / cap)^2, so the output (which the loss keeps anyway: it is the
    fp32 copy of the logits cross_entropy_loss would otherwise make) is all backward needs.
    Autograd's tanh would save a second fp32 (B, T, V) tensor: 4 bytes per vocabulary entry per
    token, GiBs at a 128k vocabulary. Elementwise, so vocab-sharded DTensor logits (TP
    loss_parallel) stay sharded.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, cap: float) -> Tensor:
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        out = torch.tanh(wide / cap) * cap
        ctx.save_for_backward(out)
        ctx.cap = cap  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors  # type: ignore[attr-defined]
        cap: float = ctx.cap  # type: ignore[attr-defined]
        return grad * (1.0 - (out / cap).square()), None


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap) in fp32 (Gemma 2's final-logit soft-capping): |result| < cap,
    ~logits where |logits| << cap. A few elementwise FLOPs per logit against the output
    projection's 2 * d_model: not counted by the FLOPs model. Raises ValueError if cap <= 0."""
    if cap <= 0:
        raise ValueError(f"softcap needs cap > 0, got {cap} (model.logit_softcap=0 turns it off)")
    out: Tensor = _SoftCap.apply(logits, cap)
    return out


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with optional per-head q/k RMSNorm (applied before RoPE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_heads
        n_kv_heads = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask) -> Tensor:
        batch, seq_len, _ = x.shape
        # -1 heads: the count comes from the (possibly tensor-parallel sharded) weight, not cfg.
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask)  # (B, T, n_heads, head_dim)
        return self.wo(out.reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.d_model, ffn_hidden_dim(cfg))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only language model configured by `ModelConfig`; see `forward` for the masking."""

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.zero_init_head and cfg.tie_embeddings:
            raise ValueError(
                "model.zero_init_head=true would zero the tied embedding table: set "
                "--model.tie_embeddings=false"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A ModuleDict keyed "0".."L-1": parameter names layers.{i} (as checkpoints and the HF
        # export expect) stay fixed even if blocks are removed from it.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent fp32 RoPE tables, (max_seq_len, head_dim): not in the state_dict, filled
        # by init_weights (so meta-device construction + to_empty + init_weights works).
        table = torch.empty(cfg.max_seq_len, cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", table, persistent=False)
        self.register_buffer("rope_sin", table.clone(), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and the RoPE tables in place, on their current device.

        normal(0, init_std) for the embedding and every Linear weight, except the residual
        output projections attention.wo and feed_forward.w2: normal(0, init_std / sqrt(2 *
        n_layers)), so the residual stream's variance does not grow with depth. RMSNorm weights
        are 1. Deterministic given torch.manual_seed.

        cfg.zero_init_output sets wo and w2 to zero (each block starts as the identity; the
        branch's other weights get gradients from the second step on), cfg.zero_init_head the
        untied output projection (the first logits are all 0, the loss ln(vocab_size)). They
        are zeroed after their normal draw, so every other weight equals the default init
        under the same seed: an A/B run differs only in the zeroed weights.
        """
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        zeroed: tuple[str, ...] = ()
        if cfg.zero_init_output:
            zeroed += ("attention.wo.weight", "feed_forward.w2.weight")
        if cfg.zero_init_head:  # untied: __init__ refuses a tied head
            zeroed += ("output.weight",)
        # named_parameters yields a tied output.weight once, as tok_embeddings.weight.
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, mean=0.0, std=out_std)
            else:
                nn.init.normal_(param, mean=0.0, std=cfg.init_std)
            if zeroed and name.endswith(zeroed):
                param.zero_()
        tables = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(tables[0])
        self.rope_sin.copy_(tables[1])

    def forward(self, tokens: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Return logits (B, T, vocab_size) for tokens (B, T), in the dtype autocast gives, or
        fp32 soft-capped to (-c, c) when cfg.logit_softcap = c > 0 (see `softcap`).

        doc_ids (B, T), a per-sequence document index non-decreasing along T, makes attention
        block-causal when cfg.document_masking is True (a token sees only earlier-or-same
        positions of its own document); otherwise attention is plain causal. RoPE positions
        run 0..T-1 over the whole packed sequence and are NOT reset per document: the mask
        already isolates documents, and attention scores depend only on relative positions, so
        a reset would change nothing inside a document while costing a per-token position gather.
        Raises ValueError if T > cfg.max_seq_len or doc_ids has a different shape than tokens.
        """
        batch, seq_len = tokens.shape
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len} "
                "(raise --model.max_seq_len or shorten --data.seq_len)"
            )
        if not self.cfg.document_masking:
            doc_ids = None
        if doc_ids is not None and doc_ids.shape != tokens.shape:
            raise ValueError(
                f"doc_ids shape {tuple(doc_ids.shape)} != tokens {tuple(tokens.shape)}"
            )
        mask = build_attention_mask(
            self.cfg.attn_backend, doc_ids, batch=batch, seq_len=seq_len, device=tokens.device
        )
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]  # (T, head_dim)
        h = self.tok_embeddings(tokens)  # (B, T, d_model)
        for block in self.layers.values():
            h = block(h, cos, sin, mask)
        logits = self.output(self.norm(h))  # (B, T, vocab_size)
        if self.cfg.logit_softcap > 0:
            logits = softcap(logits, self.cfg.logit_softcap)
        return logits

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Count parameters, tied weights once; exclude_embeddings drops the input embedding table
        (with tied embeddings that is also the output projection, the same tensor)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total
