"""The config tree: one typed dataclass per component, each default declared once.

YAML presets under ``configs/`` state only what differs from these defaults; dotted CLI overrides
(``--optim.lr=3e-4``) are applied last. Loading, type checking and cross-field validation live in
``kfm.config.loader``; this file only declares fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 8192
    """Embedding rows; must be >= the tokenizer's vocabulary (pad it up to a multiple of 64 on GPU)."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads; head_dim = d_model // n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width; None derives 8/3 * d_model rounded up to ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """Rounding for the derived SwiGLU width."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables cover (exported as max_position_embeddings)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (exported as Qwen3ForCausalLM)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    init_std: float = 0.02
    """Std of the normal init; output projections (wo, w2) use init_std / sqrt(2 * n_layers)."""
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    """auto: flex on CUDA, sdpa on CPU. flash needs the `gpu` extra (flash-attn)."""
    document_masking: bool = True
    """Block-causal attention inside each packed document; False is plain causal over the sequence."""
    zero_init_output: bool = False
    """Start every block's residual output projections (attention.wo, feed_forward.w2) at zero, so
    each block begins as the identity (Fixup / Goyal et al. 2017; modded-nanogpt)."""
    zero_init_head: bool = False
    """Start the output projection (`output`) at zero: the first logits are all 0 (modded-nanogpt).
    Needs tie_embeddings=false (a tied head is the embedding table)."""
    logit_softcap: float = 0.0
    """Cap logits smoothly to (-c, c): c * tanh(logits / c), in training and evaluation (Gemma 2;
    modded-nanogpt uses 15-30); 0 disables it. A capped model cannot be exported (kfm export)."""


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    path: str = "runs/tokenizer"
    """Directory of the trained tokenizer (loadable with transformers.AutoTokenizer)."""
    vocab_size: int = 8192
    """Target vocabulary size of `kfm tokenizer train`, special tokens included."""
    min_frequency: int = 2
    """BPE merges need a pair seen at least this often."""
    n_reserved: int = 64
    """Reserved special-token slots (<|reserved_N|>) for later use without resizing the model."""
    inputs: list[str] = field(default_factory=list)
    """Training text files (.jsonl/.jsonl.gz/.parquet/.txt); empty means the data sources' raw text."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet inputs."""
    max_chars: int = 200_000_000
    """Stop reading training text after this many characters."""


@dataclass(kw_only=True, slots=True)
class DataSourceConfig:
    name: str
    """Short name used in logs and loader state."""
    path: str
    """Directory written by `kfm pack` (holds manifest.json)."""
    weight: float = 1.0
    """Relative sampling weight in the mixture (normalised over sources)."""
    language: str | None = None
    """Language code of the source's text (en, ko...): validation bits per byte is also reported
    per language (val_bpb/lang/<code>), summed over the sources of that language. None: reported
    per source only. The data pipeline's train.yaml fills it in."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)
    """Packed shard sets to mix; each needs name, path and optional weight."""
    seq_len: int = 256
    """Tokens per training sequence (each sample reads seq_len + 1 tokens for the shifted target)."""
    seed: int = 1234
    """Seed of the mixture draw and per-epoch shuffles."""
    verify: Literal["size", "spread", "sha256"] = "spread"
    """Shard check at start-up. size: manifest, file sizes and document indexes; spread: that plus
    the sha256 of every shard file, each file hashed by one rank (the work spread over the ranks);
    sha256: every rank hashes every file it opens (slow at scale: ``kfm data verify`` checks a
    shard set once, outside training)."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW on every parameter. muon: Muon on the 2-D matrices of the Transformer blocks
    (attention wq/wk/wv/wo, feed-forward w1/w2/w3), AdamW on the rest (embedding, output head,
    norms); one lr and schedule drive both (see docs/training.md, "Muon")."""
    lr: float = 3e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and embeddings get none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    z_loss: float = 0.0
    """Weight of the z-loss (mean of logsumexp(logits)^2); 0 disables it. 1e-4 is typical."""
    impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """AdamW kernel: auto picks fused on CUDA, foreach elsewhere."""
    muon_momentum: float = 0.95
    """Muon (optim.name=muon): momentum after warm-up (Nesterov, as torch.optim.Muon)."""
    muon_momentum_start: float = 0.85
    """Muon: momentum at the first optimizer step, raised linearly to muon_momentum."""
    muon_momentum_warmup: int = 300
    """Muon: optimizer steps of the momentum warm-up; 0 uses muon_momentum from the start."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations (torch's quintic coefficients) orthogonalising the update."""


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warm-up then cosine to min; wsd: warm-up, stable, linear decay; constant: warm-up then flat."""
    warmup_steps: int = 100
    """Linear warm-up length in optimizer steps; 0 disables warm-up."""
    decay_fraction: float = 0.2
    """wsd only: fraction of all steps spent in the final decay (used when decay_steps is 0)."""
    decay_steps: int = 0
    """wsd only: length of the final decay in optimizer steps, ending at train.steps; 0 uses
    decay_fraction. Resuming a stable-phase checkpoint at step S with --train.steps=S+D
    --schedule.decay_steps=D cools down from S."""
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    """wsd only: the decay's shape from peak to min: linear, or 1-sqrt (lr falls as
    1 - sqrt(progress); Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations")."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    name: str = "default"
    """Run name; the run directory is run_root/name."""
    run_root: str = "runs"
    """Parent directory of run directories."""
    steps: int = 1000
    """Optimizer steps to train."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation = global / (micro * world size)."""
    batch_ramp_start: int = 0
    """Batch-size ramp-up: sequences in the global batch at step 1, growing linearly in stages of
    this size to global_batch_size over batch_ramp_steps steps (kfm/train/ramp.py); must be a
    multiple of micro_batch_size * data-parallel size and divide global_batch_size. 0: off."""
    batch_ramp_steps: int = 0
    """Optimizer steps during which the batch is below global_batch_size (ramp only)."""
    batch_ramp_lr: Literal["sqrt", "linear", "none"] = "sqrt"
    """Ramp only: the lr is multiplied by sqrt(b / global_batch_size) (Adam's rule), by
    b / global_batch_size, or not at all while the step's batch b is below the full batch."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype: fp32, or bf16 autocast with fp32 master weights and fp32 loss."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    seed: int = 0
    """Seed of model init and torch RNG."""
    compile: bool = False
    """torch.compile the model (inductor)."""
    deterministic: bool = True
    """Use deterministic algorithms where torch offers them (needed for bitwise resume)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for MFU; None: the datasheet figure of the GPU for the
    compute dtype (bf16, or fp8 with parallel.fp8), or kfm.model.flops.CPU_NOMINAL_TFLOPS on CPU."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights, updated after every optimizer step: 0 off; e.g.
    0.999 (averages over ~1/(1-decay) steps). Its decay warms up as min(ema_decay, (1+t)/(10+t))
    at update t; fp32, one copy of each rank's parameter shard; saved in checkpoints and
    evaluated as ema/val_bpb (docs/training.md, "Weight averaging"). FSDP backend only."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    """fsdp: torch FSDP2/HSDP + DTensor tensor parallel (kfm/parallel); deepspeed: ZeRO engine."""
    dp_replicate: int = 1
    """Data-parallel replica groups (HSDP: replicate across nodes); -1 = the rest of the world."""
    dp_shard: int = -1
    """FSDP2 shard-group size (HSDP: within a node); -1 = the rest of the world."""
    tp: int = 1
    """Tensor-parallel degree (keep it within a node); must divide n_heads and n_kv_heads."""
    loss_parallel: bool = False
    """TP: keep logits sharded over the vocabulary and compute the loss on the shards."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Gradient reduce-scatter/all-reduce dtype; params use train.dtype (bf16 or fp32)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered params after forward (ZeRO-3); False keeps them for backward."""
    zero_stage: Literal[1, 2, 3] = 3
    """DeepSpeed ZeRO stage when backend=deepspeed."""
    ac: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing: none, every block (full), or every ac_every-th block (selective)."""
    ac_every: int = 2
    """selective AC: checkpoint blocks whose index is a multiple of this."""
    ac_policy: Literal["block", "op"] = "block"
    """block: recompute the whole checkpointed block; op: keep matmul/attention outputs."""
    fp8: Literal["none", "tensorwise", "rowwise", "mxfp8"] = "none"
    """torchao float8 training recipe for eligible Linear layers (needs the `gpu` extra)."""
    fp8_emulate: bool = False
    """Emulate fp8 matmuls (CPU tests); real fp8 needs an H100/B200-class GPU."""
    fp8_all_gather: bool = False
    """FSDP2: all-gather weights in fp8 (tensorwise recipe only)."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto = nccl on CUDA, gloo on CPU."""
    grad_sync: Literal["last", "every"] = "last"
    """FSDP2 gradient accumulation: last = reduce-scatter (and HSDP all-reduce) only after the
    last micro-batch of a step (the others accumulate unsharded gradients: one full gradient copy
    per rank); every = after every micro-batch (less memory, one reduction per micro-batch)."""
    collective_timeout_s: float = 900.0
    """Seconds a collective may block before the process group aborts it (NCCL and gloo); a
    stuck rank then ends the run with an error instead of a silent hang."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: int = 500
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto: newest valid checkpoint of this run if any; never: start fresh; or a checkpoint path."""
    async_save: bool = True
    """Copy the state to host memory and write the files in a background thread while training
    goes on (at most one save in flight); false blocks the loop until the files are written."""
    verify: Literal["size", "sha256"] = "sha256"
    """Check at resume: file sizes only, or sizes plus sha256, each file hashed by one rank."""
    force_resume: bool = False
    """Resume even where the config or the data differ from the checkpoint's in ways that cannot
    apply mid-run (model.*, data.seq_len/seed/sources, train.seed, parallel.backend, the tokenizer,
    shards re-packed under the same path); every difference is still listed in the log."""
    init_from: str = ""
    """Start a new run from these model weights only: a `kfm import-hf` folder, a run dir or a
    checkpoint step dir. Optimizer, schedule and data order start fresh at step 0; model.* must
    match the weights' architecture and the data must be packed with their tokenizer. A run
    that has a checkpoint of its own resumes from that instead. Empty: random init."""


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    interval: int = 10
    """Log metrics every this many steps."""
    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""
    tensorboard: bool = True
    """Write TensorBoard events under tb/."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE is set)."""
    wandb_project: str = "kfm"
    """wandb project name."""
    progress_bar: bool = True
    """Show a progress bar on the console (rank 0)."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    interval: int = 200
    """Validation loss / bits per byte every this many steps (and at the end); 0 disables."""
    batches: int = 16
    """Validation batches of micro_batch_size sequences per evaluation."""
    at_start: bool = True
    """Also evaluate before the first step (the untrained baseline)."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task or group names (kfm's own: kfm_pubmedqa, kfm_korean...; see eval/README.md)
    scored on the live model at every evaluation, logged as bench/<task>/<metric>; [] disables.
    Needs kfm[eval]."""
    task_limit: int = 50
    """Items per task in-loop: the first task_limit of each (the same ones every time); 0: all
    (slow: a whole benchmark at every evaluation)."""
    task_fewshot: int = 0
    """Few-shot examples per in-loop task item (fixed sample: the same every time)."""


@dataclass(kw_only=True, slots=True)
class GuardConfig:
    skip_nonfinite: bool = True
    """Skip an update whose loss or gradient norm is NaN or inf: weights and optimizer state stay
    as they were, the step counts as done (its data is consumed). false stops the run instead."""
    spike_sigma: float = 6.0
    """Also skip an update whose loss or gradient norm exceeds the mean of the last
    spike_window accepted steps by this many standard deviations; 0 disables spike detection."""
    spike_window: int = 100
    """Accepted steps in the running loss/grad-norm statistics; spike checks start once it is full."""
    max_consecutive_skips: int = 10
    """Stop the run with an error after this many skipped updates in a row."""


@dataclass(kw_only=True, slots=True)
class HealthConfig:
    watchdog_s: float = 600.0
    """If no step completes for this many seconds, dump every thread's stack on this rank (to
    stderr and hang_rank{r}.txt in the run directory) and exit non-zero; 0 disables."""
    watchdog_first_step_s: float = 1800.0
    """The same limit for the first step after start or resume (it compiles and warms up)."""
    straggler_factor: float = 2.0
    """On log steps, name ranks whose own work per step (data loading, local compute) exceeds
    the median over ranks by this factor; 0 disables the per-rank report."""
    straggler_min_s: float = 0.05
    """Differences below this many seconds per step are never reported as stragglers."""
    profile_steps: list[int] = field(default_factory=list)
    """Trace steps [first, last] with torch.profiler into the run directory's profile/; empty: off."""


@dataclass(kw_only=True, slots=True)
class DebugConfig:
    faults: list[str] = field(default_factory=list)
    """Fault injection for tests and drills, each "KIND@STEPS[:rRANK][=VALUE]": nan (NaN loss),
    spike (logits x VALUE), sleep (VALUE seconds at step start), hang (block forever), sigkill
    (after the step, checkpoint included); STEPS is N, N-M or N- (N onwards); see docs/training.md."""
    trace_batches: str = ""
    """Directory where each rank appends the samples it consumed (batches_rank{r}.jsonl); empty: off."""


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
