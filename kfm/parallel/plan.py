"""Dry run at full scale: mesh, sharding plan and per-rank memory for N ranks, in one CPU process.

`build_plan(cfg, world_size)` (behind ``kfm train CONFIG --dry-run --world-size 256`` and
``kfm plan``, which add the step-time prediction of `kfm.plan.model`):

1. starts torch's "fake" process-group backend (every collective is a no-op) as rank 0 of
   ``world_size``, builds the real ("dp_replicate", "dp_shard", "tp") mesh on it, builds the model
   on the meta device (shapes only, no memory) and runs the real `parallelize` (TP plan, then
   FSDP2/HSDP) on it, so each parameter's DTensor placements and rank-0 local shape are the ones
   a real run gets. fp8, activation checkpointing and compile are left out of that call: they do
   not change parameter placements (their memory effects are in the estimate). If a process
   group already exists in this process, the same plan is derived analytically instead, and the
   report says so.
2. estimates rank-0 memory (rank 0 holds the largest FSDP shard: FSDP2 pads dim 0 up to a multiple
   of dp_shard) from those shards and the activation formula in `activation_bytes_per_token`,
   against the usable HBM of the GPU (`kfm.plan.hardware`; B200 unless told otherwise).

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
from kfm.model.transformer import Transformer, ffn_hidden_dim
from kfm.parallel.mesh import MESH_DIMS, build_mesh, mesh_shape
from kfm.plan.hardware import GIB, GPU, GPUS, USABLE_FRACTION

DEFAULT_GPU = "b200"
"""The GPU a plan is checked against when none is named (the 32 x 8 B200 allocation)."""

BLOCK_PREFIX = re.compile(r"^layers\.\d+\.")
BLOCK_INDEX = re.compile(r"^layers\.(\d+)\.")


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
    """FSDP all-gather output (the unsharded params of the live units) and the unsharded
    gradients waiting for their reduce-scatter: FSDP's communication buffers."""
    activations: int
    activations_no_ac: int
    activations_full_ac: int
    fp8: int
    """fp8 weight copies of the live units (torchao casts each weight once per micro-batch);
    0 without parallel.fp8."""
    tp_buffers: int
    """Sequence-parallel all-gather outputs of the live block (full-sequence activations);
    0 without tensor parallelism."""
    budget: int
    """Usable bytes: `USABLE_FRACTION` of the GPU's HBM."""

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.gathered
            + self.activations
            + self.fp8
            + self.tp_buffers
        )

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
    gpu: GPU
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


def param_specs(cfg: Config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(fqn, module type, shape) of every parameter, once per tensor, from a meta model."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return [
        (fqn, type(module).__name__, tuple(p.shape)) for fqn, module, p in _unique_params(model)
    ]


def _shards_analytic(
    cfg: Config,
    mesh: tuple[int, int, int],
    specs: list[tuple[str, str, tuple[int, ...]]] | None = None,
) -> list[ParamShard]:
    """The same plan without a process group: TP splits per `_TP_DIM`, then FSDP2 splits dim 0
    into dp_shard chunks of ceil(size / dp_shard) rows (rank 0 gets a full chunk). `specs`
    (`param_specs(cfg)`) saves rebuilding the meta model when planning many meshes."""
    _, shard, tp = mesh
    shards = []
    for fqn, module_type, shape in specs if specs is not None else param_specs(cfg):
        local = list(shape)
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
                module_type=module_type,
                global_shape=shape,
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
    per_rank = 16 * h + a * (2 * h + 2 * kv) + 4 * a * f + 4 * n + 8
    if m.qk_norm:
        n_kv = m.n_kv_heads or m.n_heads
        per_rank += 8 * (h + kv) + 4 * (n + n_kv)
    return 2 * a * h + per_rank / tp


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
    - with ``model.qk_norm``, (8*(h + kv) + 4*(n + n_kv)) / t more: the per-head RMSNorms of q
      and k keep their fp32 input copy and fp32 normalised tensor and a 4-byte rsqrt per head.
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


def batch_split(cfg: Config, mesh: tuple[int, int, int]) -> tuple[int, int]:
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


def estimate_memory(
    cfg: Config, mesh: tuple[int, int, int], params: list[ParamShard], *, gpu: GPU
) -> MemoryEstimate:
    """Rank-0 memory of a training step for `params` (rank-0 shards) on `mesh`, against `gpu`.

    Raises:
        ConfigError: see `batch_split`.
    """
    _, shard, tp = mesh
    local = sum(p.local_numel for p in params)
    # The gathered (unsharded-over-dp) size of a parameter on this rank is its tp-local size.
    per_block = [0] * cfg.model.n_layers
    root = 0
    for p in params:
        numel = p.local_numel * (shard if shard > 1 else 1)
        if block := BLOCK_INDEX.match(p.fqn):
            per_block[int(block.group(1))] += numel
        else:
            root += numel
    compute_bytes = 2 if cfg.train.dtype == "bf16" else 4
    reduce_bytes = 4 if cfg.parallel.reduce_dtype == "fp32" else 2
    live = root + 2 * max(per_block, default=0)
    # Root unit (embedding, final norm, output) stays gathered through the step; with
    # reshard_after_forward blocks are gathered one at a time plus one prefetched, without it
    # every block stays gathered from forward to backward. Each gathered unit's gradient exists
    # unsharded (in reduce_dtype) until its reduce-scatter: the live units' worth.
    held = live if cfg.parallel.reshard_after_forward else root + sum(per_block)
    fp8_gather = cfg.parallel.fp8 != "none" and cfg.parallel.fp8_all_gather
    # fp8 all-gather moves (and holds) 1-byte weights instead of compute-dtype ones
    param_bytes = 1 if fp8_gather else compute_bytes
    # shard == 1: nothing is sharded over dp, the stored params are the compute params
    gathered = 0 if shard == 1 else held * param_bytes + live * reduce_bytes
    # torchao casts each live weight to fp8 once per micro-batch (already fp8 if all-gathered so)
    fp8 = live if cfg.parallel.fp8 != "none" and not (fp8_gather and shard > 1) else 0
    _, micro_tokens = batch_split(cfg, mesh)
    tp_buffers = 0
    if tp > 1:
        # two full-sequence (all-gathered) inputs per block live at once: attention's and the MLP's
        tp_buffers = 2 * micro_tokens * cfg.model.d_model * compute_bytes

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
        fp8=fp8,
        tp_buffers=tp_buffers,
        budget=int(gpu.hbm_bytes * USABLE_FRACTION),
    )


def build_plan(
    cfg: Config, world_size: int, *, gpu: GPU | None = None, analytic: bool = False
) -> Plan:
    """Mesh, per-parameter rank-0 shards and the memory estimate for `world_size` ranks.

    `gpu` (default `DEFAULT_GPU`) sets the memory budget. `analytic=True` skips the fake process
    group (the layout search builds hundreds of plans; the two paths give equal shards, which
    tests/parallel/test_plan.py checks).

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
    gpu = gpu or GPUS[DEFAULT_GPU]
    if not analytic and dist.is_available() and not dist.is_initialized():
        params = _shards_from_fake_pg(cfg, world_size)
        method = "fake process group (real parallelize() on meta tensors)"
    else:
        params = _shards_analytic(cfg, mesh)
        method = "analytic (a process group already exists in this process)"
    accum, micro_tokens = batch_split(cfg, mesh)
    if cfg.model.tie_embeddings:
        notes.append("output.weight is tok_embeddings.weight (tied): one tensor, listed once")
    return Plan(
        world_size=world_size,
        mesh=mesh,
        method=method,
        params=params,
        grad_accum=accum,
        micro_batch_tokens=micro_tokens,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
        memory=estimate_memory(cfg, mesh, params, gpu=gpu),
        gpu=gpu,
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


def format_plan(cfg: Config, plan: Plan, *, timing: list[str] | None = None) -> str:
    """The human-readable report of `plan`; `timing` lines (the step-time prediction of
    `kfm.plan.model`, which this module cannot import) go after the batch lines."""
    r, s, t = plan.mesh
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
        *(timing or []),
        *format_memory(cfg, plan.memory, plan.gpu, ac=ac),
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_memory(cfg: Config, mem: MemoryEstimate, gpu: GPU, *, ac: str) -> list[str]:
    """The memory-per-rank lines of a report, with the fit verdict and what to change."""
    fp8 = cfg.parallel.fp8 != "none"
    return [
        f"memory per rank (rank 0; train.dtype={cfg.train.dtype}, reduce_dtype="
        f"{cfg.parallel.reduce_dtype}, reshard_after_forward={cfg.parallel.reshard_after_forward}, "
        f"ac={ac}, fp8={cfg.parallel.fp8}):",
        f"  params (fp32 shard)             {_gib(mem.params)}",
        f"  grads (fp32 shard)              {_gib(mem.grads)}",
        f"  optimizer (AdamW 2 x fp32)      {_gib(mem.optimizer)}",
        f"  gathered params + their grads   {_gib(mem.gathered)}   (FSDP communication buffers)",
        f"  activations (micro-batch)       {_gib(mem.activations)}"
        f"   [none {_gib(mem.activations_no_ac).strip()}, full AC "
        f"{_gib(mem.activations_full_ac).strip()}]",
        *([f"  fp8 weight copies               {_gib(mem.fp8)}"] if fp8 else []),
        *([f"  TP all-gather buffers           {_gib(mem.tp_buffers)}"] if mem.tp_buffers else []),
        f"  total                           {_gib(mem.total)}",
        f"  {gpu.name.upper()}: {gpu.hbm_bytes / GIB:.0f} GiB HBM, budget {USABLE_FRACTION:.0%} = "
        f"{_gib(mem.budget).strip()} -> {'FITS' if mem.fits else 'DOES NOT FIT'}"
        + (
            ""
            if mem.fits
            else " (lower --train.micro_batch_size, set --parallel.ac=full, or raise --parallel.tp)"
        ),
        "  formula: params+grads+optimizer = 16 B x rank-0 shard; gathered = live units x "
        "(param + reduce bytes), live = root unit + 2 blocks; activations = micro-batch tokens x"
        " kfm.parallel.plan.activation_bytes_per_token (see its docstring)",
    ]
