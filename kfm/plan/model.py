"""Step-time model: compute, communication and their overlap for one config on one allocation.

`predict(cfg, alloc)` answers "how long is one optimizer step of this config on N x G GPUs", and
from it tokens/s, tokens/s/GPU, MFU (the loop's formula), tokens/day and days to a token count.

Per rank and micro-batch (mt = micro-batch tokens; every TP rank sees all mt tokens and 1/tp of
the width):

- GEMMs: each block Linear's forward, input-gradient and weight-gradient GEMM, and the output
  projection, as a roofline: max(FLOPs / (peak[dtype] * gemm_efficiency), bytes / HBM bandwidth).
  fp8 GEMMs (parallel.fp8) use the fp8 peak and 1-byte operands; the output projection stays
  bf16 (kfm.parallel.fp8 never converts it).
- Attention: the causal FLOPs fused attention does (half the full-matrix count of
  `flops_per_token`; backward 2.5x forward, as FlashAttention counts) at the generation's
  attention_efficiency of the bf16 peak.
- Memory-bound work: bytes that norms, residual adds, RoPE, SwiGLU and the loss move through HBM
  (`_elementwise_bytes_per_token`; fused under train.compile, several kernels each in eager), fp8
  casts, and the AdamW update, at HBM bandwidth.
- Activation checkpointing: full/selective recompute the checkpointed blocks' forward before
  their backward; ac_policy=op keeps matmul and attention outputs and recomputes only the
  memory-bound ops.
- Communication (`kfm.plan.hardware.COMM_EFFICIENCY` of the link, plus a fixed latency): FSDP2
  all-gathers each unit's parameters in forward (and again in backward with
  reshard_after_forward) and reduce-scatters its gradients (each micro-batch with
  grad_sync=every, the last one with "last"); HSDP all-reduces the sharded gradients over
  dp_replicate once per step; TP with sequence parallelism all-gathers and reduce-scatters the
  block inputs (4 collectives per block forward, 4 backward, 4 more per recomputed forward) and
  all-gathers the logits unless loss_parallel. A group whose ranks share an NVLink domain uses
  NVLink; one spanning domains uses min(NVLink, k x NIC) where k is the number of its ranks per
  domain (a ring leaves each domain once per ring, through k NICs).
- Overlap: FSDP2 prefetches the next unit's all-gather during the current unit's compute and
  reduces gradients while backward continues, so FSDP/HSDP time is hidden up to the compute of
  the same phase, except the first all-gather and the last reduction. TP collectives sit between
  dependent GEMMs (no async TP in kfm): fully exposed.

Not modelled: pipeline/context/expert parallelism (kfm has none), data loading, logging and
evaluation steps, stragglers, power or thermal throttling beyond what gemm_efficiency absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kfm.config import Config
from kfm.model.flops import flops_per_token
from kfm.model.transformer import ffn_hidden_dim
from kfm.parallel.mesh import mesh_shape
from kfm.parallel.plan import batch_split
from kfm.plan.hardware import (
    COLLECTIVE_LATENCY_S,
    COMM_EFFICIENCY,
    GPU,
    RING_STEP_LATENCY_S,
)

SECONDS_PER_DAY = 86400.0
ATTENTION_BACKWARD_RATIO = 2.5
"""Fused attention backward FLOPs / forward FLOPs (5 GEMMs against 2: it recomputes the scores),
the convention of the FlashAttention papers whose efficiencies `hardware` quotes."""


@dataclass(frozen=True, slots=True)
class Allocation:
    """The GPUs a plan runs on."""

    gpu: GPU
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(slots=True)
class Prediction:
    """Seconds per optimizer step by component, and the throughput that follows."""

    mesh: tuple[int, int, int]
    grad_accum: int
    micro_batch_tokens: int
    tokens_per_step: int
    world_size: int
    flops_per_token: float
    """Training FLOPs per token as the loop's MFU counts them (kfm.model.flops)."""
    peak_flops: float
    """Per-GPU peak the loop's MFU divides by: the fp8 peak with parallel.fp8, else train.dtype's."""
    peak_bf16: float
    compute: dict[str, float]
    """Seconds per step of each compute component (already summed over micro-batches)."""
    comm: dict[str, float]
    """Seconds per step each kind of collective takes on its link (before overlap)."""
    exposed_comm: dict[str, float]
    """Seconds per step of communication not hidden behind compute."""
    notes: list[str] = field(default_factory=list)

    @property
    def compute_s(self) -> float:
        return sum(self.compute.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + sum(self.exposed_comm.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.world_size

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation as kfm's training loop reports it."""
        return self.flops_per_token * self.tokens_per_s_per_gpu / self.peak_flops

    @property
    def mfu_bf16(self) -> float:
        """MFU against the bf16 peak (how torchtitan and llm-foundry report it, also under fp8)."""
        return self.flops_per_token * self.tokens_per_s_per_gpu / self.peak_bf16

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * SECONDS_PER_DAY

    def days_for(self, tokens: float) -> float:
        """Wall-clock days to train `tokens` at the predicted rate (no interruptions)."""
        return tokens / self.tokens_per_day


@dataclass(frozen=True, slots=True)
class _Linear:
    name: str
    out_features: int
    """Per TP rank."""
    in_features: int
    """Per TP rank."""
    fp8: bool


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def _block_linears(cfg: Config, tp: int) -> list[_Linear]:
    m = cfg.model
    head_dim = m.d_model // m.n_heads
    q = m.n_heads * head_dim
    kv = (m.n_kv_heads or m.n_heads) * head_dim
    f = ffn_hidden_dim(m)
    h = m.d_model
    multiple = 32 if cfg.parallel.fp8 == "mxfp8" else 16
    # (name, global out, global in, TP shards out (colwise) or in (rowwise))
    shapes = [
        ("wq", q, h, "out"),
        ("wk", kv, h, "out"),
        ("wv", kv, h, "out"),
        ("wo", h, q, "in"),
        ("w1", f, h, "out"),
        ("w3", f, h, "out"),
        ("w2", h, f, "in"),
    ]
    out = []
    for name, n_out, n_in, split in shapes:
        fp8 = cfg.parallel.fp8 != "none" and n_out % multiple == 0 and n_in % multiple == 0
        out.append(
            _Linear(
                name,
                n_out // tp if split == "out" else n_out,
                n_in // tp if split == "in" else n_in,
                fp8,
            )
        )
    return out


def _gemm_s(m: int, n: int, k: int, *, fp8: bool, cfg: Config, gpu: GPU) -> float:
    """Roofline time of one (m x k) @ (k x n) GEMM."""
    if fp8:
        peak, operand = gpu.peak_flops["fp8"], 1
    else:
        peak, operand = gpu.peak_flops[cfg.train.dtype], _bytes(cfg.train.dtype)
    flops = 2.0 * m * n * k
    traffic = operand * (m * k + k * n) + _bytes(cfg.train.dtype) * m * n
    return max(flops / (peak * gpu.generation.gemm_efficiency), traffic / gpu.hbm_bandwidth)


def _elementwise_bytes_per_token(cfg: Config, tp: int) -> tuple[float, float]:
    """(forward, backward) HBM bytes per token per block of the non-GEMM, non-attention ops.

    Fused (train.compile): each RMSNorm reads and writes the residual once (4a*h for two), the
    two residual adds read two and write one tensor (6a*h), RoPE reads and writes q and k, SwiGLU
    reads w1 x and w3 x and writes their product (3a*f). Eager runs each op as its own kernels:
    RMSNorm in fp32 (cast, square, mean, rsqrt-multiply, weight-multiply, cast back: ~(2a + 24)
    bytes per element), RoPE as ~4 elementwise passes, SwiGLU as silu then multiply (5a*f).
    Backward moves about twice the forward bytes. Sequence parallelism splits norms and residual
    adds over tp.
    """
    m = cfg.model
    a = _bytes(cfg.train.dtype)
    head_dim = m.d_model // m.n_heads
    qk = (m.n_heads + (m.n_kv_heads or m.n_heads)) * head_dim / tp
    h_seq = m.d_model / tp
    f = ffn_hidden_dim(m) / tp
    if cfg.train.compile:
        fwd = 4 * a * h_seq + 6 * a * h_seq + 2 * a * qk + 3 * a * f
    else:
        fwd = 2 * (2 * a + 24) * h_seq + 6 * a * h_seq + 8 * a * qk + 5 * a * f
    return fwd, 2 * fwd


def _collective_s(
    kind: str, size_bytes: float, group: int, bandwidth: float, *, crosses_nodes: bool
) -> float:
    """NCCL ring time of one all-gather / reduce-scatter (size = the full, unsharded tensor) or
    all-reduce over `group` ranks."""
    if group <= 1 or size_bytes <= 0:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    moved = factor * size_bytes * (group - 1) / group
    latency = COLLECTIVE_LATENCY_S + (RING_STEP_LATENCY_S * (group - 1) if crosses_nodes else 0.0)
    return moved / (bandwidth * COMM_EFFICIENCY) + latency


def group_bandwidth(gpu: GPU, *, size: int, stride: int) -> float:
    """Per-rank link bandwidth of a group of `size` ranks spaced `stride` apart (ranks are
    numbered tp fastest, then dp_shard, then dp_replicate; an NVLink domain holds
    `gpu.nvlink_domain` consecutive ranks)."""
    if size * stride <= gpu.nvlink_domain:
        return gpu.nvlink_bandwidth
    per_domain = max(1, min(size, gpu.nvlink_domain // stride))
    return min(gpu.nvlink_bandwidth, per_domain * gpu.network_bandwidth)


def _param_counts(cfg: Config, tp: int) -> tuple[float, float]:
    """(one block's, the root unit's) parameters per TP rank (root: embedding, final norm and,
    unless tied, the output projection)."""
    m = cfg.model
    block = sum(lin.out_features * lin.in_features for lin in _block_linears(cfg, tp))
    block += 2 * m.d_model  # two RMSNorm weights (replicated over tp)
    embed = m.vocab_size * m.d_model / tp
    root = embed * (1 if m.tie_embeddings else 2) + m.d_model
    return block, root


def predict(cfg: Config, alloc: Allocation) -> Prediction:
    """Step time, by component, of `cfg` on `alloc` (see the module docstring for the model).

    Raises:
        ConfigError: a mesh that does not fit the world size, or a batch that does not split
            over the data-parallel ranks (both name the flags to change).
        ValueError: fp8 on a GPU without fp8 tensor cores.
    """
    gpu = alloc.gpu
    world = alloc.world_size
    mesh = mesh_shape(cfg.parallel, world)
    r, s, t = mesh
    accum, mt = batch_split(cfg, mesh)
    m, p = cfg.model, cfg.parallel
    if p.fp8 != "none" and "fp8" not in gpu.peak_flops:
        raise ValueError(f"parallel.fp8={p.fp8}: {gpu.name} has no fp8 tensor cores")
    a = _bytes(cfg.train.dtype)
    seq = cfg.data.seq_len
    head_dim = m.d_model // m.n_heads
    L = m.n_layers
    notes: list[str] = []

    # ---- compute, per micro-batch (forward; backward = dgrad + wgrad GEMMs) ----
    lins = _block_linears(cfg, t)
    gemm_fwd = sum(
        _gemm_s(mt, x.out_features, x.in_features, fp8=x.fp8, cfg=cfg, gpu=gpu) for x in lins
    )
    gemm_bwd = sum(
        _gemm_s(mt, x.in_features, x.out_features, fp8=x.fp8, cfg=cfg, gpu=gpu)
        + _gemm_s(x.out_features, x.in_features, mt, fp8=x.fp8, cfg=cfg, gpu=gpu)
        for x in lins
    )
    out_cols = m.vocab_size // t
    head_gemm = _gemm_s(mt, out_cols, m.d_model, fp8=False, cfg=cfg, gpu=gpu)
    head_gemm += 2 * _gemm_s(mt, m.d_model, out_cols, fp8=False, cfg=cfg, gpu=gpu)
    # causal attention: QK^T and AV over half the T x T matrix, 2 * 2 * T/2 * head_dim per head
    attn_fwd_flops = 2.0 * mt * seq * (m.n_heads // t) * head_dim
    attn_rate = gpu.peak_flops["bf16"] * gpu.generation.attention_efficiency
    attn_fwd = attn_fwd_flops / attn_rate
    attn_bwd = ATTENTION_BACKWARD_RATIO * attn_fwd
    ew_fwd_tok, ew_bwd_tok = _elementwise_bytes_per_token(cfg, t)
    ew_fwd = ew_fwd_tok * mt / gpu.hbm_bandwidth
    ew_bwd = ew_bwd_tok * mt / gpu.hbm_bandwidth
    # loss head: logits (full vocab unless loss_parallel), their fp32 copy and log-softmax, and
    # the gradient: ~(3a + 16) bytes per logit
    vocab_seen = m.vocab_size // t if p.loss_parallel else m.vocab_size
    loss_s = (3 * a + 16) * vocab_seen * mt / gpu.hbm_bandwidth
    # fp8 (torchao dynamic scaling): per Linear and token, the input and the output gradient
    # are read for their amax, read again and written as fp8 plus a transposed fp8 copy:
    # (2a + 2) bytes per element when compiled (the amax fuses into the producer: a fewer),
    # (3a + 2) in eager. Weights the same once per micro-batch (on the shard, before the
    # all-gather, with fp8_all_gather). Colwise TP layers cast their all-gathered input on every
    # TP rank (kfm uses no fp8 TP styles).
    cast_bytes = (2 if cfg.train.compile else 3) * a + 2
    cast_fwd = cast_bwd = 0.0
    for x in lins:
        if x.fp8:
            cast_fwd += cast_bytes * x.in_features * mt / gpu.hbm_bandwidth
            cast_bwd += cast_bytes * x.out_features * mt / gpu.hbm_bandwidth
            w = x.in_features * x.out_features / (s if p.fp8_all_gather and s > 1 else 1)
            cast_fwd += cast_bytes * w / gpu.hbm_bandwidth
    if p.ac == "full":
        n_ckpt = L
    elif p.ac == "selective":
        n_ckpt = len(range(0, L, p.ac_every))
    else:
        n_ckpt = 0
    if p.ac_policy == "op":  # matmul and attention outputs kept: recompute the cheap ops only
        recompute = n_ckpt * (ew_fwd + cast_fwd)
        tp_recompute_blocks = 0
    else:
        recompute = n_ckpt * (gemm_fwd + attn_fwd + ew_fwd + cast_fwd)
        tp_recompute_blocks = n_ckpt
    micro = {
        "gemm": L * (gemm_fwd + gemm_bwd) + head_gemm,
        "attention": L * (attn_fwd + attn_bwd),
        "elementwise": L * (ew_fwd + ew_bwd) + loss_s,
        "fp8 casts": L * (cast_fwd + cast_bwd),
        "recompute (AC)": recompute,
    }
    fwd_compute = L * (gemm_fwd + attn_fwd + ew_fwd + cast_fwd) + head_gemm / 3
    bwd_compute = sum(micro.values()) - fwd_compute
    compute = {k: v * accum for k, v in micro.items()}
    block_params, root_params = _param_counts(cfg, t)
    local_params = (L * block_params + root_params) / s
    compute["optimizer"] = 32 * local_params / gpu.hbm_bandwidth  # fused AdamW + grad norm

    # ---- communication ----
    comm: dict[str, float] = {}
    exposed: dict[str, float] = {}
    reduce_bytes = 4 if p.reduce_dtype == "fp32" else 2
    gather_bytes = 1 if p.fp8 != "none" and p.fp8_all_gather else a
    bw_shard = group_bandwidth(gpu, size=s, stride=t)
    bw_repl = group_bandwidth(gpu, size=r, stride=s * t)
    bw_tp = group_bandwidth(gpu, size=t, stride=1)
    x_shard = s * t > gpu.nvlink_domain
    x_repl = r > 1 and r * s * t > gpu.nvlink_domain
    if s > 1:
        ag_block = _collective_s(
            "all_gather", block_params * gather_bytes, s, bw_shard, crosses_nodes=x_shard
        )
        ag_root = _collective_s("all_gather", root_params * a, s, bw_shard, crosses_nodes=x_shard)
        rs_block = _collective_s(
            "reduce_scatter", block_params * reduce_bytes, s, bw_shard, crosses_nodes=x_shard
        )
        rs_root = _collective_s(
            "reduce_scatter", root_params * reduce_bytes, s, bw_shard, crosses_nodes=x_shard
        )
        ag_fwd = L * ag_block + ag_root
        ag_bwd = L * ag_block if p.reshard_after_forward else 0.0
        rs = L * rs_block + rs_root
    else:
        ag_block = ag_root = rs_block = rs_root = ag_fwd = ag_bwd = rs = 0.0
    # HSDP: one all-reduce of the (sharded) gradients per step, unit by unit in backward
    ar_block = _collective_s(
        "all_reduce", block_params / s * reduce_bytes, r, bw_repl, crosses_nodes=x_repl
    )
    ar_root = _collective_s(
        "all_reduce", root_params / s * reduce_bytes, r, bw_repl, crosses_nodes=x_repl
    )
    ar = L * ar_block + ar_root if r > 1 else 0.0
    syncs = accum if p.grad_sync == "every" else 1
    comm["FSDP all-gather"] = accum * (ag_fwd + ag_bwd)
    comm["FSDP reduce-scatter"] = syncs * rs
    comm["HSDP all-reduce"] = ar
    exposed_fsdp = 0.0
    for i in range(accum):
        last = i == accum - 1
        reduces = rs if (last or p.grad_sync == "every") else 0.0
        bwd_comm = ag_bwd + reduces + (ar if last else 0.0)
        # the first unit's all-gather and the last unit's reduction have nothing to hide behind
        exposed_fsdp += ag_root + max(0.0, ag_fwd - ag_root - fwd_compute)
        tail = (rs_root if reduces else 0.0) + (ar_root if last and r > 1 else 0.0)
        exposed_fsdp += tail + max(0.0, bwd_comm - tail - bwd_compute)
    exposed["FSDP/HSDP"] = exposed_fsdp
    if t > 1:
        act = mt * m.d_model * a  # one full-sequence activation
        x_tp = t > gpu.nvlink_domain
        one = _collective_s("all_gather", act, t, bw_tp, crosses_nodes=x_tp)
        per_micro = (8 * L + 4 * tp_recompute_blocks + 2) * one
        if not p.loss_parallel:
            per_micro += _collective_s(
                "all_gather", mt * m.vocab_size * a, t, bw_tp, crosses_nodes=x_tp
            )
        comm["TP collectives"] = exposed["TP"] = accum * per_micro
        if bw_tp < gpu.nvlink_bandwidth:
            notes.append(
                f"parallel.tp={t} spans more than one NVLink domain ({gpu.nvlink_domain} GPUs): "
                "its per-block collectives run over the network"
            )
    dtype = "fp8" if p.fp8 != "none" else cfg.train.dtype
    return Prediction(
        mesh=mesh,
        grad_accum=accum,
        micro_batch_tokens=mt,
        tokens_per_step=cfg.train.global_batch_size * seq,
        world_size=world,
        flops_per_token=flops_per_token(m, seq),
        peak_flops=gpu.peak_flops[dtype],
        peak_bf16=gpu.peak_flops["bf16"],
        compute=compute,
        comm=comm,
        exposed_comm=exposed,
        notes=notes,
    )
