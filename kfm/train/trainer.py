"""The training loop and the components it is built from.

``train(cfg)`` reads top to bottom: build (or resume) -> loop(step, log, evaluate, checkpoint).
Everything else (model, loader, optimizer, checkpoints, loggers) is built from the config by the
small functions below and knows nothing about the loop.
"""

from __future__ import annotations

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

from kfm.checkpoint import (
    find_latest_valid,
    load_checkpoint,
    resolve_checkpoint_arg,
    save_checkpoint,
)
from kfm.config import Config, ConfigError, to_dict
from kfm.data import PackedLoader, validation_batches
from kfm.model.flops import flops_per_token, peak_flops
from kfm.model.transformer import Transformer
from kfm.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
from kfm.train.loggers import MetricLogger
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import build_optimizer, build_scheduler
from kfm.train.rundir import prepare_run_dir
from kfm.train.signals import StopRequest
from kfm.train.validation import evaluate

# Test-only fault injection: SIGKILL this process right after the given step (checkpoint included),
# so the exact-resume test kills a real training process at a known point.
_FAULT_ENV = "KFM_FAULT_SIGKILL_AT_STEP"


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


def world_info() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; this loop is single-process for now."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world}: multi-process training (FSDP2/TP/DeepSpeed) is not available in "
            "this version of kfm; launch a single process (torchrun --nproc-per-node 1)"
        )
    return rank, world


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # init depends only on the seed, not on what ran before
    model = Transformer(cfg.model).to(device)
    if cfg.train.compile:
        model.compile()
    return model


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


def train_step(model, optimizer, scheduler, loader, cfg: Config, device, accum: int) -> StepResult:
    """One optimizer step: ``accum`` micro-batches of forward/backward, clip, update."""
    optimizer.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.dtype == "bf16"
        else nullcontext()
    )
    loss_sum = torch.zeros((), device=device)
    for _ in range(accum):
        batch = loader.next_batch()
        with autocast:
            logits = model(batch.tokens.to(device), batch.doc_ids.to(device))
        ce, z = cross_entropy_loss(logits, batch.labels.to(device), z_loss=cfg.optim.z_loss)
        loss = ce if z is None else ce + z
        (loss / accum).backward()
        loss_sum += ce.detach()
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return StepResult(loss=loss_sum / accum, grad_norm=grad_norm, lr=lr)


def find_resume_point(cfg: Config, ckpt_root: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return find_latest_valid(ckpt_root)
    return resolve_checkpoint_arg(cfg.checkpoint.resume)


def train(cfg: Config) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (steps done, first/last validation metrics)."""
    rank, world = world_info()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    ckpt_root = run_dir / "checkpoints"

    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
        rank=rank,
        world_size=world,
        verify=cfg.data.verify,
    )
    tok = check_tokenizer(cfg, loader)
    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.train.steps)
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
    autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else None

    start_step = 0
    resume_from = find_resume_point(cfg, ckpt_root)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, config=to_dict(cfg))
        start_step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
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
    prepare_run_dir(cfg)
    logger = MetricLogger(
        cfg, run_dir, total_steps=cfg.train.steps, start_step=start_step, enabled=rank == 0
    )
    if resume_from is not None:
        logger.info(f"resumed from {resume_from} at step {start_step}")
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
            result = train_step(model, optimizer, scheduler, loader, cfg, device, accum)
            last = step == cfg.train.steps
            if step % cfg.logging.interval == 0 or last or stop.requested:
                loss = result.loss.item()  # .item() syncs the device: only on log steps
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
            if last or stop.requested or (interval > 0 and step % interval == 0):
                checkpoint(step)
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.requested:
                logger.info(
                    f"{stop.signal_name} received: checkpoint saved at step {step}, exiting"
                )
                break
    finally:
        stop.restore()
        logger.close()
    summary["steps_done"] = step
    summary["stopped_by_signal"] = stop.signal_name
    return summary
