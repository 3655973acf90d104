"""Dry run at full scale: mesh, sharding plan and per-rank memory for N ranks, in one CPU process.

`plan_report(cfg, world_size)` (behind ``kfm train CONFIG --dry-run --world-size 256``):

1. starts torch's "fake" process-group backend (every collective is a no-op) as rank 0 of
   ``world_size``, builds the real ("dp_replicate", "dp_shard", "tp") mesh on it, builds the model
   on the meta device (shapes only, no memory) and runs the real `parallelize` (TP plan, then
   FSDP2/HSDP) on it, so each parameter's DTensor placements and rank-0 local shape are the ones
   a real run gets. fp8, activation checkpointing and compile are left out of that call: they do
   not change parameter placements. Activation checkpointing's memory effect is in the
   estimate; fp8's is not (its scales and fp8 weight copies are not counted; with fp8
   all-gather a note says the gathered weights take half the bf16 figure). If a process group
   already exists in this process, the same plan is derived analytically instead, and the report
   says so.
2. estimates rank-0 memory (rank 0 holds the largest FSDP shard: FSDP2 pads dim 0 up to a multiple
   of dp_shard) from those shards and the activation formula in `activation_bytes_per_token`.

Nothing here touches a GPU: tensors live on "meta", the mesh on "cpu" with the fake backend.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kfm.config import Config, ConfigError
from kfm.model.flops import flops_per_token
from kfm.model.transformer import Transformer, ffn_hidden_dim
from kfm.parallel.mesh import MESH_DIMS, build_mesh, mesh_shape

GIB = 1024**3
HBM_GIB = 179.0
"""B200 in HGX/DGX B200 systems: 180 GB marketed ("1,440 GB" per 8-GPU node), ~179 GiB reported
by nvidia-smi / torch.cuda.mem_get_info; the die's 8 HBM3e stacks hold 192 GB, the rest is not
exposed."""
USABLE_FRACTION = 0.9
"""Budget for the estimate: the rest covers the CUDA context, NCCL and cuBLAS workspaces and
caching-allocator fragmentation, none of which the formulas count."""
ASSUMED_MFU = 0.40
"""Model FLOPs utilisation assumed for the step-time line only (a typical dense bf16 figure)."""
B200_BF16_FLOPS = 2250e12
"""Dense bf16 peak of one HGX B200 GPU (kfm.model.flops keeps the same figure)."""

BLOCK_PREFIX = re.compile(r"^layers\.\d+\.")


@dataclass(slots=True)
class ParamShard:
    """One parameter as rank 0 holds it."""

    fqn: str
    module_type: str
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    placements: str
    """DTensor placements, one per mesh dim the parameter is distributed over."""

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.global_shape)


@dataclass(slots=True)
class MemoryEstimate:
    """Rank-0 bytes; `activations` is for the configured activation checkpointing."""

    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    activations_no_ac: int
    activations_full_ac: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    @property
    def budget(self) -> int:
        return int(HBM_GIB * USABLE_FRACTION * GIB)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass(slots=True)
class Plan:
    """Everything `plan_report` prints, as numbers (tests read these)."""

    world_size: int
    mesh: tuple[int, int, int]
    """(dp_replicate, dp_shard, tp)."""
    method: str
    """"fake process group" (real fully_shard / TP on meta tensors) or "analytic"."""
    params: list[ParamShard]
    grad_accum: int
    micro_batch_tokens: int
    tokens_per_step: int
    memory: MemoryEstimate
    notes: list[str] = field(default_factory=list)

    @property
    def total_numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def local_numel(self) -> int:
        return sum(p.local_numel for p in self.params)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """(fqn, owning module, param) once per tensor (a tied output weight counts once)."""
    seen: set[int] = set()
    out = []
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, module, param))
    return out


def _shards_from_fake_pg(cfg: Config, world_size: int) -> list[ParamShard]:
    """Build the mesh on the fake backend and run the real `parallelize` on a meta model."""
    from kfm.parallel.parallelize import parallelize

    # fp8/AC/compile leave placements unchanged; fp8 without a GPU would (rightly) refuse to run.
    shard_cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, fp8="none", ac="none"),
        train=dataclasses.replace(cfg.train, compile=False),
    )
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        mesh = build_mesh(cfg.parallel, world_size, "cpu")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        parallelize(model, shard_cfg, mesh)
        shards = []
        for fqn, module, param in _unique_params(model):
            local = param.to_local() if isinstance(param, DTensor) else param
            placements = str(tuple(param.placements)) if isinstance(param, DTensor) else "local"
            shards.append(
                ParamShard(
                    fqn=fqn,
                    module_type=type(module).__name__,
                    global_shape=tuple(param.shape),
                    local_shape=tuple(local.shape),
                    placements=placements,
                )
            )
        return shards
    finally:
        dist.destroy_process_group()


# Tensor-parallel layouts of kfm.parallel.tp, for the analytic path: the dim each weight is
# sharded on over "tp" (colwise = output features = dim 0; rowwise = input features = dim 1;
# the embedding table is rowwise over the vocab = dim 0); anything else is replicated.
_TP_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}


def _shards_analytic(cfg: Config, mesh: tuple[int, int, int]) -> list[ParamShard]:
    """The same plan without a process group: TP splits per `_TP_DIM`, then FSDP2 splits dim 0
    into dp_shard chunks of ceil(size / dp_shard) rows (rank 0 gets a full chunk)."""
    _, shard, tp = mesh
    with torch.device("meta"):
        model = Transformer(cfg.model)
    shards = []
    for fqn, module, param in _unique_params(model):
        local = list(param.shape)
        placements = []
        tp_dim = _TP_DIM.get(BLOCK_PREFIX.sub("", fqn)) if tp > 1 else None
        if tp_dim is not None:
            local[tp_dim] //= tp
        if shard > 1:
            local[0] = _ceil_div(local[0], shard)
            placements.append(f"Shard(dim=0) over dp_shard={shard}")
        if tp_dim is not None:
            placements.append(f"Shard(dim={tp_dim}) over tp={tp}")
        shards.append(
            ParamShard(
                fqn=fqn,
                module_type=type(module).__name__,
                global_shape=tuple(param.shape),
                local_shape=tuple(local),
                placements=", ".join(placements) or "replicated",
            )
        )
    return shards


def block_activation_bytes_per_token(cfg: Config, *, tp: int) -> float:
    """A_block of `activation_bytes_per_token`: one transformer block's saved bytes per token."""
    m = cfg.model
    a = 2 if cfg.train.dtype == "bf16" else 4
    h, n = m.d_model, m.n_heads
    kv = (m.n_kv_heads or m.n_heads) * (h // n)
    f = ffn_hidden_dim(m)
    return 2 * a * h + (16 * h + a * (2 * h + 2 * kv) + 4 * a * f + 4 * n + 8) / tp


def activation_bytes_per_token(cfg: Config, *, tp: int, ac: str | None = None) -> float:
    """Activation bytes saved for backward per token of a micro-batch on one rank.

    Counted per block (h = d_model, kv = n_kv_heads * head_dim, f = SwiGLU hidden,
    n = n_heads, t = tp, a = 2 bytes under bf16, 4 under fp32):

        A_block = 2*a*h + (16*h + a*(2*h + 2*kv) + 4*a*f + 4*n + 8) / t

    - 16*h / t: each of the two RMSNorms (computed in fp32) keeps its fp32 input copy and the
      fp32 normalised tensor, 8*h, plus a 4-byte rsqrt per token; sequence parallelism splits
      them over t.
    - 2*a*h: the norm outputs that wq/wk/wv and w1/w3 keep (all-gathered to the full sequence
      under TP, hence not divided by t).
    - a*(2*h + 2*kv) / t: flex/flash attention keeps q, k, v (kv heads, GQA is not expanded) and
      its output (also wo's input); 4*n / t: its fp32 log-sum-exp per head. RoPE keeps only its
      constant tables. No T x T score matrix: flex/flash never materialise one.
    - 4*a*f / t: SwiGLU keeps w1 x, silu(w1 x), w3 x and their product (w2's input).
    Checked on CPU against the tensors autograd saves for one bf16 block (saved_tensors_hooks):
    equal up to per-sequence constants, with k/v counted at n_heads because the CPU SDPA path
    expands them.

    Per token, on top of the blocks: the final norm and output input, 8*h/t + a*h; the logits
    and the loss, (a + 8) * V (logits in a, their fp32 copy and the fp32 log-softmax the
    cross-entropy keeps; replicated over tp, as `parallelize` does not enable loss
    parallelism); and one more A_block of backward working memory. With activation
    checkpointing a checkpointed block keeps only its input, a*h/t (the sequence-parallel
    residual), and backward recomputes one block at a time (A_block more at the peak). full:
    every block; selective: blocks whose index is a multiple of parallel.ac_every; none: no
    block. `ac` defaults to cfg.parallel.ac.
    """
    m = cfg.model
    ac = cfg.parallel.ac if ac is None else ac
    a = 2 if cfg.train.dtype == "bf16" else 4
    h = m.d_model
    block = block_activation_bytes_per_token(cfg, tp=tp)
    if ac == "full":
        n_ckpt = m.n_layers
    elif ac == "selective":
        n_ckpt = len(range(0, m.n_layers, cfg.parallel.ac_every))
    else:
        n_ckpt = 0
    blocks = (m.n_layers - n_ckpt) * block + n_ckpt * a * h / tp
    recompute = block if n_ckpt else 0.0
    head = 8 * h / tp + a * h + (a + 8) * m.vocab_size
    return blocks + recompute + block + head


def _batch(cfg: Config, mesh: tuple[int, int, int]) -> tuple[int, int]:
    """(gradient accumulation steps, tokens per micro-batch per rank)."""
    dp = mesh[0] * mesh[1]  # tp ranks of one dp coordinate read the same batch
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} * data-parallel size {dp} "
            f"(dp_replicate={mesh[0]} * dp_shard={mesh[1]}): set --train.global_batch_size or "
            "--train.micro_batch_size, or change --parallel.tp"
        )
    return t.global_batch_size // (t.micro_batch_size * dp), t.micro_batch_size * cfg.data.seq_len


def _memory(cfg: Config, mesh: tuple[int, int, int], params: list[ParamShard]) -> MemoryEstimate:
    _, shard, tp = mesh
    local = sum(p.local_numel for p in params)
    # The gathered (unsharded-over-dp) size of a parameter on this rank is its tp-local size.
    gathered_numel = {p.fqn: p.local_numel * (shard if shard > 1 else 1) for p in params}
    per_block = [
        sum(v for k, v in gathered_numel.items() if k.startswith(f"layers.{i}."))
        for i in range(cfg.model.n_layers)
    ]
    root = sum(v for k, v in gathered_numel.items() if not k.startswith("layers."))
    compute_bytes = 2 if cfg.train.dtype == "bf16" else 4
    reduce_bytes = 4 if cfg.parallel.reduce_dtype == "fp32" else 2
    if shard == 1:
        gathered = 0  # nothing is sharded over dp: the stored params are the compute params
    elif cfg.parallel.reshard_after_forward:
        # Root unit (embedding, final norm, output) stays gathered through the step; blocks are
        # gathered one at a time plus one prefetched; each gathered unit's gradient exists
        # unsharded (in reduce_dtype) until its reduce-scatter.
        live = root + 2 * max(per_block, default=0)
        gathered = live * (compute_bytes + reduce_bytes)
    else:
        # Gathered in forward and kept until backward: every block at once.
        gathered = (root + sum(per_block)) * compute_bytes + (
            root + 2 * max(per_block, default=0)
        ) * reduce_bytes
    _, micro_tokens = _batch(cfg, mesh)

    def acts(ac: str) -> int:
        return int(activation_bytes_per_token(cfg, tp=tp, ac=ac) * micro_tokens)

    return MemoryEstimate(
        params=4 * local,  # fp32 sharded master weights (FSDP2 stores the shard in fp32)
        grads=4 * local,  # fp32 sharded gradients, the optimizer's input
        optimizer=8 * local,  # AdamW exp_avg + exp_avg_sq, fp32
        gathered=gathered,
        activations=acts(cfg.parallel.ac),
        activations_no_ac=acts("none"),
        activations_full_ac=acts("full"),
    )


def build_plan(cfg: Config, world_size: int) -> Plan:
    """Mesh, per-parameter rank-0 shards and the memory estimate for `world_size` ranks.

    Raises:
        ConfigError: a mesh that does not multiply to world_size (names the --parallel.* flags),
            or a global batch that does not split into micro-batches over the data-parallel ranks.
    """
    mesh = mesh_shape(cfg.parallel, world_size)
    notes = []
    if cfg.parallel.backend == "deepspeed":
        notes.append(
            "parallel.backend=deepspeed: this plan shows kfm's FSDP2 layout for the same mesh; "
            "DeepSpeed's ZeRO partitioning is in its generated ds_config"
        )
    if dist.is_available() and not dist.is_initialized():
        params = _shards_from_fake_pg(cfg, world_size)
        method = "fake process group (real parallelize() on meta tensors)"
    else:
        params = _shards_analytic(cfg, mesh)
        method = "analytic (a process group already exists in this process)"
    accum, micro_tokens = _batch(cfg, mesh)
    if cfg.model.tie_embeddings:
        notes.append("output.weight is tok_embeddings.weight (tied): one tensor, listed once")
    if cfg.parallel.fp8_all_gather:
        notes.append("fp8 all-gather: gathered fp8 weights take half the bf16 figure below")
    return Plan(
        world_size=world_size,
        mesh=mesh,
        method=method,
        params=params,
        grad_accum=accum,
        micro_batch_tokens=micro_tokens,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
        memory=_memory(cfg, mesh, params),
        notes=notes,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _placement_table(params: list[ParamShard]) -> list[str]:
    groups: dict[tuple[str, str, str, str, tuple[int, ...]], int] = defaultdict(int)
    for p in params:
        name = BLOCK_PREFIX.sub("layers.*.", p.fqn)
        groups[(name, p.module_type, p.placements, str(p.global_shape), p.local_shape)] += 1
    lines = [
        f"  {'parameter':<34} {'module':<10} {'n':>3}  {'global shape':<16} {'rank-0 shard':<16} "
        "placements"
    ]
    for (name, mtype, placements, gshape, lshape), count in groups.items():
        lines.append(
            f"  {name:<34} {mtype:<10} {count:>3}  {gshape:<16} {str(lshape):<16} {placements}"
        )
    return lines


def format_plan(cfg: Config, plan: Plan) -> str:
    """The human-readable report of `plan`."""
    r, s, t = plan.mesh
    mem = plan.memory
    step_flops = flops_per_token(cfg.model, cfg.data.seq_len) * plan.tokens_per_step
    step_s = step_flops / (plan.world_size * B200_BF16_FLOPS * ASSUMED_MFU)
    ac = cfg.parallel.ac + (
        f" (every {cfg.parallel.ac_every})" if cfg.parallel.ac == "selective" else ""
    )
    lines = [
        f"parallel plan for {plan.world_size} ranks; sharding from: {plan.method}",
        f"mesh: dp_replicate={r} x dp_shard={s} x tp={t}  dims {MESH_DIMS}",
        f"  {'HSDP' if r > 1 else 'FSDP'}: shard within groups of {s} ranks"
        + (f", replicate across {r} groups" if r > 1 else "")
        + (f"; tensor parallel {t} (innermost: adjacent ranks)" if t > 1 else ""),
        f"model: {plan.total_numel / 1e9:.3f} B parameters; rank 0 holds "
        f"{plan.local_numel / 1e6:.1f} M (total / {plan.total_numel / plan.local_numel:.2f})",
        "sharding (rank 0; layers.* = every block):",
        *_placement_table(plan.params),
        "batch:",
        f"  {cfg.train.global_batch_size} sequences x {cfg.data.seq_len} tokens = "
        f"{plan.tokens_per_step:,} tokens/step; micro-batch {cfg.train.micro_batch_size} seq "
        f"({plan.micro_batch_tokens:,} tokens) per rank, grad accumulation {plan.grad_accum}",
        f"  at an assumed {ASSUMED_MFU:.0%} MFU of {B200_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 per "
        f"B200: ~{step_s:.2f} s/step, ~{plan.tokens_per_step / step_s / 1e6:.2f} M tokens/s",
        f"memory per rank (rank 0; train.dtype={cfg.train.dtype}, reduce_dtype="
        f"{cfg.parallel.reduce_dtype}, reshard_after_forward={cfg.parallel.reshard_after_forward}, "
        f"ac={ac}):",
        f"  params (fp32 shard)             {_gib(mem.params)}",
        f"  grads (fp32 shard)              {_gib(mem.grads)}",
        f"  optimizer (AdamW 2 x fp32)      {_gib(mem.optimizer)}",
        f"  gathered params + their grads   {_gib(mem.gathered)}",
        f"  activations (micro-batch)       {_gib(mem.activations)}"
        f"   [none {_gib(mem.activations_no_ac).strip()}, full AC {_gib(mem.activations_full_ac).strip()}]",
        f"  total                           {_gib(mem.total)}",
        f"  B200: {HBM_GIB:.0f} GiB HBM, budget {USABLE_FRACTION:.0%} = {_gib(mem.budget).strip()}"
        f" -> {'FITS' if mem.fits else 'DOES NOT FIT'}"
        + (
            ""
            if mem.fits
            else " (lower --train.micro_batch_size, set --parallel.ac=full, or raise --parallel.tp)"
        ),
        "  formula: params+grads+optimizer = 16 B x rank-0 shard; gathered = (root unit + 2 blocks)"
        " x (compute + reduce bytes); activations = micro-batch tokens x"
        " kfm.parallel.plan.activation_bytes_per_token (see its docstring)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_report(cfg: Config, world_size: int) -> str:
    """Text of ``kfm train CONFIG --dry-run --world-size N``: mesh, sharding, memory per rank.

    Runs in one CPU process for any world size (fake process group, meta tensors; no GPU).

    Raises:
        ConfigError: see `build_plan`.
    """
    return format_plan(cfg, build_plan(cfg, world_size))
