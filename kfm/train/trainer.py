"""The training loop and the components it is built from.

``train(cfg)`` reads top to bottom: build (or resume) -> loop(step, log, evaluate, checkpoint).
Everything else (model, loader, optimizer, checkpoints, loggers) is built from the config by the
small functions below and knows nothing about the loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from kfm.checkpoint import (
    find_latest_valid,
    load_checkpoint,
    resolve_checkpoint_arg,
    save_checkpoint,
    validate_checkpoint,
)
from kfm.config import Config, ConfigError, to_dict
from kfm.data import Batch, PackedLoader, validation_batches
from kfm.model.flops import flops_per_token, peak_flops
from kfm.model.transformer import Transformer
from kfm.parallel import build_mesh, dp_rank_size, mesh_shape, parallelize
from kfm.parallel.tp import local_loss, loss_parallel_context
from kfm.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
from kfm.train.dist import (
    WorldInfo,
    any_rank,
    broadcast_from_rank0,
    mean_over_ranks,
    process_group,
    world_from_env,
)
from kfm.train.loggers import MetricLogger
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import build_optimizer, build_scheduler
from kfm.train.rundir import prepare_run_dir
from kfm.train.signals import StopRequest
from kfm.train.status import write_status
from kfm.train.validation import evaluate

# Test-only fault injection: SIGKILL this process right after the given step (checkpoint included),
# so the exact-resume test kills a real training process at a known point.
_FAULT_ENV = "KFM_FAULT_SIGKILL_AT_STEP"
# Test-only trace: each rank appends which global samples it consumed to <dir>/batches_rank{r}.jsonl,
# so the resharding test can check that no sample is skipped or repeated across a world change.
_TRACE_ENV = "KFM_TRACE_BATCHES"


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible (set --train.device=cpu)"
        )
    return torch.device(name)


def seed_everything(seed: int, *, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def world_info() -> WorldInfo:
    """Rank, world size and local rank from the torchrun environment (1 process without it)."""
    return world_from_env()


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The single-device model, initialised from train.seed alone, so every rank builds the same
    weights (FSDP2 then keeps each rank's shard). Compilation (train.compile), activation
    checkpointing and fp8 come later, per block, from `kfm.parallel.parallelize`.
    """
    torch.manual_seed(cfg.train.seed)  # init depends only on the seed, not on what ran before
    return Transformer(cfg.model).to(device)


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank.

    Raises:
        ConfigError: global_batch_size is not a multiple of micro_batch_size * dp_size.
    """
    per_pass = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {cfg.train.micro_batch_size} * "
            f"{dp_size} = {per_pass} (set --train.micro_batch_size, --train.global_batch_size or "
            "--parallel.tp / the number of processes)"
        )
    return cfg.train.global_batch_size // per_pass


class _BatchTrace:
    """Test-only wrapper (see _TRACE_ENV): logs each micro-batch's first global sample index and
    a hash of every row before handing the batch on."""

    def __init__(self, loader: PackedLoader, path: Path) -> None:
        self._loader = loader
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 -- lives as long as the run

    def next_batch(self) -> Batch:
        start = self._loader.samples_consumed
        batch = self._loader.next_batch()
        rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch.tokens]
        record = {"start": start, "dp_rank": self._loader.rank, "rows": rows}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return batch


def check_tokenizer(cfg: Config, loader: PackedLoader) -> Any:
    """Load the tokenizer and check it is the one the shards were packed with and fits the model."""
    tok = load_tokenizer(cfg.tokenizer.path)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer.path} has {len(tok)} tokens but model.vocab_size="
            f"{cfg.model.vocab_size} (set --model.vocab_size to at least {len(tok)})"
        )
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"shards hold token ids up to vocab {loader.vocab_size} > model.vocab_size="
            f"{cfg.model.vocab_size} (set --model.vocab_size to at least {loader.vocab_size})"
        )
    if tokenizer_hash(cfg.tokenizer.path) != loader.tokenizer_hash:
        raise ConfigError(
            f"the shards in data.sources were packed with a different tokenizer than "
            f"tokenizer.path={cfg.tokenizer.path}: re-run `kfm pack` with this tokenizer or point "
            "--tokenizer.path at the one used for packing"
        )
    return tok


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory (CUDA) or peak resident set size of the process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@dataclass
class StepResult:
    loss: torch.Tensor  # mean cross-entropy over the global batch (fp32, on device: no sync)
    grad_norm: torch.Tensor
    lr: float  # learning rate this update used (the scheduler has already moved on)


def train_step(
    model, optimizer, scheduler, loader, cfg: Config, device, accum: int, *, autocast: bool = True
) -> StepResult:
    """One optimizer step: ``accum`` micro-batches of forward/backward, clip, update.

    ``autocast=False`` when FSDP2's MixedPrecisionPolicy already computes in bf16 (autocast on
    top would only add casts). With FSDP2 each backward reduce-scatters the gradients averaged
    over the data-parallel ranks, so the result is the gradient of the global-batch mean loss.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_parallel = cfg.parallel.loss_parallel and cfg.parallel.tp != 1
    autocast_ctx = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.dtype == "bf16" and autocast
        else nullcontext()
    )
    loss_sum = torch.zeros((), device=device)
    for _ in range(accum):
        batch = loader.next_batch()
        with autocast_ctx:
            logits = model(batch.tokens.to(device), batch.doc_ids.to(device))
        # With TP loss parallelism the logits stay vocab-sharded: the loss and its backward
        # must run inside loss_parallel (no-op context otherwise).
        with loss_parallel_context(loss_parallel):
            ce, z = cross_entropy_loss(logits, batch.labels.to(device), z_loss=cfg.optim.z_loss)
            loss = ce if z is None else ce + z
            (loss / accum).backward()
        loss_sum += local_loss(ce.detach())
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    # Works on DTensor (FSDP2/TP) params too: the per-shard norms are combined across ranks.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return StepResult(loss=loss_sum / accum, grad_norm=grad_norm, lr=lr)


def find_resume_point(cfg: Config, ckpt_root: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return find_latest_valid(ckpt_root)  # DCP and DeepSpeed manifests alike
    return resolve_checkpoint_arg(cfg.checkpoint.resume)


def _fp8_scale_hook(model: nn.Module, cfg: Config) -> Any:
    """With fp8 all-gather under FSDP2: a call that computes every sharded weight's fp8 scale in
    one all-reduce after each update (instead of one per layer in the next forward); else None."""
    if cfg.parallel.fp8 == "none" or not isinstance(model, FSDPModule):
        return None
    from kfm.parallel.fp8 import precompute_fp8_scales

    return lambda: precompute_fp8_scales(model, cfg.parallel)


def resume_point(cfg: Config, ckpt_root: Path, world: WorldInfo) -> Path | None:
    """`find_resume_point`, decided once: with several ranks, rank 0 finds and hash-checks the
    checkpoint and tells the others (who then skip the hashing: one read of it, not one per rank,
    and no chance of ranks disagreeing about which checkpoint is newest).

    Raises:
        CheckpointError: on every rank, when rank 0's search or check failed.
    """
    if not world.distributed:
        return find_resume_point(cfg, ckpt_root)
    found: Path | None = None
    error: Exception | None = None
    if world.rank == 0:
        try:
            found = find_resume_point(cfg, ckpt_root)
            if found is not None:
                validate_checkpoint(found)
        except Exception as e:  # re-raised on every rank below, not only on rank 0
            error = e
    found, error = broadcast_from_rank0((found, error))
    if error is not None:
        raise error
    return found


def train(cfg: Config) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (steps done, first/last validation metrics).

    Under torchrun (WORLD_SIZE > 1) it joins the process group first and leaves it at the end.
    """
    world = world_info()
    device = resolve_device(cfg.train.device)
    if not world.distributed:
        return _train(cfg, world, device)
    with process_group(cfg.parallel, world, device) as rank_device:
        return _train(cfg, world, rank_device)


def _train(cfg: Config, world: WorldInfo, device: torch.device) -> dict[str, Any]:
    rank = world.rank
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    # One process: no mesh, no process group, the model as built. Several: the data loader sees
    # the data-parallel coordinates (tp ranks of one replica read the same batch). DeepSpeed is
    # data-parallel only and shards inside its engine: every rank is a data-parallel rank.
    deepspeed = cfg.parallel.backend == "deepspeed"
    mesh = None
    if world.distributed and not deepspeed:
        mesh = build_mesh(cfg.parallel, world.world_size, device.type)
    if mesh is not None:
        dp_rank, dp_size = dp_rank_size(mesh)
    else:
        dp_rank, dp_size = (world.rank, world.world_size) if deepspeed else (0, 1)
    accum = accumulation_steps(cfg, dp_size)
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    ckpt_root = run_dir / "checkpoints"

    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
        rank=dp_rank,
        world_size=dp_size,
        verify=cfg.data.verify,
    )
    trace_dir = os.environ.get(_TRACE_ENV)
    batches = (
        _BatchTrace(loader, Path(trace_dir) / f"batches_rank{rank}.jsonl") if trace_dir else loader
    )
    tok = check_tokenizer(cfg, loader)
    model = build_model(cfg, device)
    # Before the optimizer: it must hold the parameters as parallelize leaves them (DTensors).
    model = parallelize(model, cfg, mesh)
    # FSDP2's MixedPrecisionPolicy gathers bf16 params: compute is bf16 without autocast.
    autocast = not isinstance(model, FSDPModule)
    after_update = _fp8_scale_hook(model, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.train.steps)
    engine = None
    if deepspeed:
        from kfm.parallel.deepspeed import DeepSpeedBackend

        # The engine takes over model, optimizer and scheduler (and casts params to bf16 with
        # train.dtype=bf16, so no autocast); evaluation runs its module on every rank.
        engine = DeepSpeedBackend(
            model, cfg, optimizer=optimizer, scheduler=scheduler, loss_fn=cross_entropy_loss
        )
        model, autocast = engine.module, False
    val = (
        validation_batches(
            cfg.data.sources,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            n_batches=cfg.eval.batches,
            verify=cfg.data.verify,
        )
        if cfg.eval.interval > 0
        else []
    )
    token_bytes = token_byte_lengths(tok)
    autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and autocast else None

    start_step = 0
    resume_from = resume_point(cfg, ckpt_root, world)
    if resume_from is not None and engine is not None:
        state = engine.load(resume_from, config=to_dict(cfg))  # with the scheduler's state
    elif resume_from is not None:
        state = load_checkpoint(
            resume_from,
            model=model,
            optimizer=optimizer,
            config=to_dict(cfg),
            verify_hashes=not world.distributed,  # rank 0 checked them in resume_point
        )
        scheduler.load_state_dict(state["scheduler"])
    if resume_from is not None:
        start_step = state["step"]
        loader.load_state_dict(state["loader"])  # RNG states were restored by load_checkpoint
        saved_numpy = state.get("numpy_version")
        if saved_numpy and saved_numpy != np.__version__:
            # The sample order comes from numpy's default_rng, which numpy does not promise to
            # keep across versions: the run continues, but the data order may differ.
            warnings.warn(
                f"{resume_from} was saved with numpy {saved_numpy}, this is {np.__version__}: "
                "the data order after resume may differ from an uninterrupted run",
                stacklevel=1,
            )

    # Only now that data, tokenizer and checkpoint agree with the config is it recorded: a refused
    # resume must not overwrite the run's config.yaml with the config that was refused.
    if rank == 0:
        prepare_run_dir(cfg)
        write_status(run_dir, "running", step=start_step)
    logger = MetricLogger(
        cfg, run_dir, total_steps=cfg.train.steps, start_step=start_step, enabled=rank == 0
    )
    if resume_from is not None:
        logger.info(f"resumed from {resume_from} at step {start_step}")
    if mesh is not None:
        replicate, shard, tp = mesh_shape(cfg.parallel, world.world_size)
        logger.info(
            f"{world.world_size} ranks: mesh dp_replicate={replicate} dp_shard={shard} tp={tp}; "
            f"{accum} micro-batches of {cfg.train.micro_batch_size} per rank per step"
        )
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device, cfg.train.dtype)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": start_step}

    def run_eval(step: int) -> None:
        metrics = evaluate(
            model,
            val,
            token_bytes=token_bytes,
            bos_id=tok.bos_token_id,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        summary.setdefault("first_eval", metrics)
        summary["last_eval"] = metrics
        logger.log(step, metrics)

    def checkpoint(step: int) -> None:
        # save_checkpoint adds the RNG states of python/numpy/torch(/cuda)
        trainer_state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "numpy_version": np.__version__,
        }
        if engine is not None:
            path = engine.save(
                ckpt_root,
                step,
                trainer_state=trainer_state,
                config=to_dict(cfg),
                keep_last=cfg.checkpoint.keep_last,
            )
        else:
            path = save_checkpoint(
                ckpt_root,
                step,
                model=model,
                optimizer=optimizer,
                trainer_state=trainer_state,
                config=to_dict(cfg),
                keep_last=cfg.checkpoint.keep_last,
            )
        logger.info(f"saved checkpoint {path}")

    stop = StopRequest()
    fault_step = int(os.environ.get(_FAULT_ENV, -1))
    if start_step == 0 and val and cfg.eval.at_start:
        run_eval(0)
    t_last, step_last = time.perf_counter(), start_step
    step = start_step
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            if engine is not None:
                result = StepResult(*engine.step(batches))  # (loss, grad_norm, lr) as ours
            else:
                result = train_step(
                    model, optimizer, scheduler, batches, cfg, device, accum, autocast=autocast
                )
            if after_update is not None:
                after_update()
            last = step == cfg.train.steps
            # Ranks must agree to stop at the same step (a signal may reach them at different
            # times): one tiny all-reduce per step when distributed, nothing otherwise.
            stopping = any_rank(stop.requested, device)
            if step % cfg.logging.interval == 0 or last or stopping:
                # The mean over data-parallel ranks is the global-batch loss; a collective plus
                # .item() (a device sync): only on log steps, which every rank takes together.
                loss = mean_over_ranks(result.loss).item()
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {step}: lower --optim.lr, keep --optim.grad_clip > 0 "
                        "or try --train.dtype=fp32"
                    )
                dt = time.perf_counter() - t_last
                tps = (step - step_last) * tokens_per_step / dt
                logger.log(
                    step,
                    {
                        "loss": loss,
                        "grad_norm": result.grad_norm.item(),
                        "lr": result.lr,
                        "tokens_per_second": tps,
                        "tflops": tps * flops_tok / 1e12,
                        "mfu": tps * flops_tok / peak if peak else None,
                        "peak_memory_gb": peak_memory_gb(device),
                    },
                )
                t_last, step_last = time.perf_counter(), step
            logger.advance()
            if val and (last or step % cfg.eval.interval == 0):
                run_eval(step)
            interval = cfg.checkpoint.interval
            if last or stopping or (interval > 0 and step % interval == 0):
                checkpoint(step)
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                logger.info(
                    f"{stop.signal_name or 'stop signal on another rank'} received: "
                    f"checkpoint saved at step {step}, exiting"
                )
                break
    except BaseException as e:
        if rank == 0:
            # kfm's own errors (bad config, data, checkpoint, loss) recur on a rerun; anything else
            # (a lost peer, an I/O error) may not.
            retry = not isinstance(e, ConfigError | FloatingPointError | ValueError)
            write_status(run_dir, "failed", step=step, reason=repr(e)[:500], requeue=retry)
        raise
    finally:
        stop.restore()
        logger.close()
    if rank == 0:
        state = "stopped" if stop.signal_name or step < cfg.train.steps else "finished"
        write_status(run_dir, state, step=step, reason=stop.signal_name)
    summary["steps_done"] = step
    summary["stopped_by_signal"] = stop.signal_name
    return summary
