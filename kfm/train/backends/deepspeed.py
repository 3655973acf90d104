"""DeepSpeed ZeRO backend (``parallel.backend: deepspeed``): the same model, optimizer and schedule
as the FSDP2 backend, stepped by a DeepSpeed engine.

The config comes from `kfm.parallel.deepspeed.ds_config` (batch sizes, ZeRO stage, bf16,
clipping, buckets); the optimizer is kfm's torch AdamW and the schedule kfm's LambdaLR, so the
numerics are those of the FSDP2 path (DeepSpeed's fused Adam would also JIT-build a C++ op for
~60 s on CPU). DeepSpeed is data-parallel only here: every rank is a data-parallel rank.

Bad steps: DeepSpeed skips an update whose gradient norm is not finite on its own (ZeRO 1/2 with
``bf16.check_grad_overflow``, ZeRO-3 always); kfm's guard judges the global loss before the last
micro-batch's backward (one host sync per step) and, for a bad step, makes that backward's loss
NaN so DeepSpeed's own check skips the update. Gradient-norm spikes are not detected under
DeepSpeed (the norm exists only inside its step).

Checkpoints use kfm's step-directory protocol (`kfm.checkpoint.PendingSave`): DeepSpeed's files
(``*_model_states.pt``, ``zero_pp_rank_{r}_*_optim_states.pt``) + ``trainer_state_rank{r}.pt``,
each rank hashing its own files, ``manifest.json`` last with ``"backend": "deepspeed"``. Saving is
synchronous. `kfm.checkpoint.load_model_state` consolidates them for eval and export.

On CPU DeepSpeed runs on gloo; its first ``deepspeed.initialize`` in a fresh environment JIT-builds
a shared-memory comm op (~35-110 s, cached under ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfm.checkpoint import CheckpointError, PendingSave, read_manifest, restore_rng_state
from kfm.checkpoint.deepspeed import BACKEND, import_deepspeed
from kfm.checkpoint.stepdir import read_trainer_state, trainer_state_name
from kfm.config import Config, to_dict
from kfm.parallel.deepspeed import ds_config, grad_accum_steps
from kfm.train.backends.base import BatchSource, DeviceTimer, StepOutput
from kfm.train.backends.fsdp import build_model
from kfm.train.dist import WorldInfo, mean_over_ranks
from kfm.train.ema import EMA
from kfm.train.guard import StepGuard
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import apply_optim_config, build_optimizer, build_scheduler


def model_states_file(zero_stage: int) -> str:
    """DeepSpeed's model file in a checkpoint (no model parallelism: always mp rank 00); ZeRO-3
    writes one per rank and names rank 0's like this."""
    return (
        "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if zero_stage == 3
        else "mp_rank_00_model_states.pt"
    )


def ensure_process_group(backend: str) -> None:
    """Start a process group if the launcher's code has not: from torchrun's environment, or a
    one-rank group in memory for a plain ``python`` run (DeepSpeed always needs a group)."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
    else:
        # DeepSpeed reads LOCAL_RANK (and RANK/WORLD_SIZE) from the environment as torchrun sets it.
        for var, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(var, value)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedBackend:
    """A kfm model trained by a DeepSpeed ZeRO engine with kfm's optimizer and schedule."""

    def __init__(self, cfg: Config, world: WorldInfo, device: torch.device) -> None:
        """Build the model (from train.seed, as the FSDP2 backend), AdamW and the schedule, and
        hand them to ``deepspeed.initialize`` (collective: every rank calls it). Starts a process
        group with ``parallel.dist_backend`` if none exists.

        Raises:
            ImportError: deepspeed is not installed (names the ``kfm[deepspeed]`` extra).
            ConfigError: see `kfm.parallel.deepspeed.ds_config`.
        """
        deepspeed = import_deepspeed()
        ensure_process_group(cfg.parallel.dist_backend)
        self.cfg = cfg
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.accum = grad_accum_steps(cfg, world_size=self.world_size)
        self.config = ds_config(cfg, world_size=self.world_size)
        model = build_model(cfg, device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.train.steps)
        # dist_init_required=False: use the group above instead of DeepSpeed's launcher logic.
        # The engine moves the model to the accelerator's device and, with bf16, casts its
        # parameters (not its buffers) to bf16.
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )
        self.device = self.engine.device
        self.guard = StepGuard(cfg.guard, self.device)
        self.manifest_extra: dict[str, Any] = {}
        self.ema: EMA | None = None  # train.ema_decay > 0 is refused here (kfm/config/loader.py)
        self._optim_timer = DeviceTimer(self.device)
        self._deepspeed_version = deepspeed.__version__
        self._saved: Path | None = None

    @property
    def module(self) -> nn.Module:
        """The wrapped kfm model (its forward works under ZeRO-3 too: every rank must run it)."""
        return self.engine.module

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None  # the engine already holds bf16 parameters with train.dtype=bf16

    def describe(self) -> str:
        return (
            f"DeepSpeed ZeRO-{self.cfg.parallel.zero_stage} over {self.world_size} ranks; "
            f"{self.accum} micro-batches of {self.cfg.train.micro_batch_size} per rank per step"
        )

    def step(self, batches: BatchSource, *, step: int | None = None) -> StepOutput:
        """One optimizer step: ``accum`` micro-batches of forward/backward, then clip and update
        (``step`` is unused: a batch-size ramp is refused under DeepSpeed at config load).

        ``engine.backward`` divides the loss by gradient_accumulation_steps and ``engine.step``
        updates only on the accumulation boundary (every ``accum``-th call).
        """
        engine, device = self.engine, self.device
        loss_sum = torch.zeros((), device=device)
        # What LambdaLR last set: the lr of this update. (Not a saved param_groups reference:
        # loading a ZeRO checkpoint replaces the optimizer's param_groups list.)
        lr = float(self.scheduler.get_last_lr()[0])
        guarded = False
        for i in range(self.accum):
            batch = batches.next_batch()
            logits = engine(batch.tokens.to(device), batch.doc_ids.to(device))
            ce, z = cross_entropy_loss(
                logits, batch.labels.to(device), z_loss=self.cfg.optim.z_loss
            )
            loss_sum += ce.detach()
            loss = ce if z is None else ce + z
            if i == self.accum - 1:
                # The global-batch loss decides before the last backward; a bad step's gradient
                # is made NaN so that DeepSpeed's own overflow check skips the update.
                bad = self.guard.check(mean_over_ranks(loss_sum / self.accum), None)
                guarded = bool(bad.item())  # host sync: DeepSpeed offers no device-side skip
                if guarded:
                    loss = loss * float("nan")
            engine.backward(loss)
            self._optim_timer.start()
            engine.step()
            self._optim_timer.stop()
        applied = engine.was_step_applied()
        if not applied and not guarded:
            self.guard.count_skip()  # DeepSpeed found non-finite gradients itself
        norm = engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        return StepOutput(
            loss=mean_over_ranks(loss_sum / self.accum),
            grad_norm=grad_norm.float(),
            skipped=torch.tensor(0.0 if applied else 1.0),
            lr=lr,
            optim_timer=self._optim_timer,
        )

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict[str, Any]) -> None:
        """Save the engine's state as ``checkpoints/step_XXXXXX`` (collective, synchronous;
        `poll`/`wait` then return its dir once)."""
        root = Path(self.cfg.train.run_root) / self.cfg.train.name / "checkpoints"
        pending = PendingSave.begin(root, step)
        try:
            # save_latest=False: DeepSpeed's "latest" file would collide with kfm's symlink.
            self.engine.save_checkpoint(
                str(root), tag=pending.tmp.name, client_state={}, save_latest=False
            )
            pending.fsync_own_files()  # DeepSpeed does not fsync what it writes
            pending.write_trainer_state(trainer_state)
            self._saved = pending.finalize(
                config=to_dict(self.cfg),
                keep_last=self.cfg.checkpoint.keep_last,
                manifest_extra={
                    **self.manifest_extra,
                    "backend": BACKEND,
                    "zero_stage": self.cfg.parallel.zero_stage,
                    "has_optimizer": True,
                    "deepspeed_version": self._deepspeed_version,
                    # What validation must find besides the hashes (DCP needs .metadata).
                    "required_files": [
                        model_states_file(self.cfg.parallel.zero_stage),
                        trainer_state_name(0),
                    ],
                },
            )
        except BaseException:
            pending.abort()
            raise

    def load(self, path: Path) -> dict[str, Any]:
        """Load model, optimizer and scheduler from a DeepSpeed checkpoint (already validated by
        the caller on every rank); return this rank's trainer state, RNG states restored.

        The caller (`kfm.train.resume`) has compared the checkpoint's config with this one.

        Raises:
            CheckpointError: a non-DeepSpeed checkpoint, or a different world size (ZeRO optimizer shards reload only on as many ranks as
                wrote them; convert with DeepSpeed's ds_to_universal.py to change it).
        """
        path = Path(path)
        manifest = read_manifest(path)
        if manifest.get("backend") != BACKEND:
            raise CheckpointError(
                f"{path} was not written by the DeepSpeed backend: resume it with "
                "--parallel.backend=fsdp"
            )
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint {path} was saved by {manifest['world_size']} DeepSpeed ranks and this "
                f"run has {self.world_size}: resume on {manifest['world_size']} ranks (ZeRO "
                "shards are per rank), or use --parallel.backend=fsdp for resharding"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint to load in {path}")
        # The scheduler's optimizer is kfm's AdamW inside the engine (its param groups are the
        # ones the update reads); the peak lr and hyperparameters become this config's.
        apply_optim_config(self.scheduler.optimizer, self.scheduler, self.cfg.optim)
        state = read_trainer_state(path, self.rank, manifest["world_size"])
        if "rng" in state:
            restore_rng_state(state["rng"])
        return state

    def wait(self) -> Path | None:
        saved, self._saved = self._saved, None  # saves are synchronous: nothing to wait for
        return saved

    def poll(self) -> Path | None:
        return self.wait()

    def close(self, *, wait: bool = True) -> None:
        pass
