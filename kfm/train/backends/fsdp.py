"""The torch-native backend: one process, or FSDP2/HSDP + tensor parallel over a device mesh.

``FSDPBackend.build`` makes the single-device model (same seed on every rank), applies
`kfm.parallel.parallelize` (fp8 -> TP -> AC -> compile -> FSDP2), then builds AdamW and the
schedule on the parallelised parameters. `step` runs one optimizer step:

- gradient accumulation over ``accum`` micro-batches; with FSDP2 and ``parallel.grad_sync:
  last`` the gradient reduce-scatter (and HSDP all-reduce) runs only after the last micro-batch
  (``set_requires_gradient_sync``): (accum - 1) x (blocks + 1) reduce-scatters fewer per step,
  at the memory of one unsharded gradient copy;
- the global gradient norm (DTensor-aware), clipping, the bad-step guard and the update, skipped
  on the device with the fused AdamW kernel (see kfm/train/guard.py);
- the fp8 scale precompute after the update when fp8 all-gather is on.

Checkpoints go through `kfm.checkpoint.Checkpointer` (DCP, asynchronous when
``checkpoint.async_save``); DCP reshards on load, so a run resumes on another world size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from kfm.checkpoint import Checkpointer, load_checkpoint, read_manifest
from kfm.config import Config, to_dict
from kfm.model.transformer import Transformer
from kfm.parallel import build_mesh, dp_rank_size, mesh_shape, parallelize
from kfm.parallel.fsdp import transformer_blocks
from kfm.parallel.tp import local_loss, loss_parallel_context
from kfm.train.backends.base import BatchSource, DeviceTimer, StepOutput, accumulation_steps
from kfm.train.dist import WorldInfo, mean_over_ranks
from kfm.train.ema import EMA
from kfm.train.guard import StepGuard
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import (
    apply_optim_config,
    build_optimizer,
    build_scheduler,
    describe_optimizer,
)
from kfm.train.ramp import accumulation_at, check_ramp, describe_ramp

log = logging.getLogger(__name__)


def build_model(cfg: Config, device: torch.device) -> Transformer:
    """The single-device model, initialised from train.seed alone, so every rank builds the same
    weights (FSDP2 then keeps each rank's shard)."""
    torch.manual_seed(cfg.train.seed)  # init depends only on the seed, not on what ran before
    return Transformer(cfg.model).to(device)


class FSDPBackend:
    """Model, AdamW, schedule, guard and checkpoints for one process or an FSDP2/TP mesh."""

    def __init__(self, cfg: Config, world: WorldInfo, device: torch.device) -> None:
        """Build everything (collective under torchrun: every rank calls it).

        Raises:
            ConfigError: a mesh or batch size that does not divide (names the flag).
        """
        self.cfg = cfg
        self.device = device
        self.mesh: DeviceMesh | None = None
        if world.distributed:
            self.mesh = build_mesh(cfg.parallel, world.world_size, device.type)
        self.dp_rank, self.dp_size = dp_rank_size(self.mesh) if self.mesh is not None else (0, 1)
        self.accum = accumulation_steps(
            cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dp_size
        )
        check_ramp(cfg.train, self.dp_size)
        model = build_model(cfg, device)
        # Before the optimizer: it must hold the parameters as parallelize leaves them (DTensors).
        self.model: nn.Module = parallelize(model, cfg, self.mesh)
        self.fsdp = isinstance(self.model, FSDPModule)
        self.world_size = world.world_size
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.schedule, total_steps=cfg.train.steps, ramp=cfg.train
        )
        self.guard = StepGuard(cfg.guard, device)
        self.manifest_extra: dict[str, Any] = {}
        self._fused = bool(self.optimizer.defaults.get("fused"))
        self._after_update = self._fp8_scale_hook()
        # After parallelize: the EMA holds fp32 copies of this rank's shards (kfm/train/ema.py).
        self.ema: EMA | None = None
        if cfg.train.ema_decay > 0:
            self.ema = EMA(self.model, cfg.train.ema_decay, after_swap=self._after_update)
        self._optim_timer = DeviceTimer(device)
        self.checkpointer = Checkpointer(
            Path(cfg.train.run_root) / cfg.train.name / "checkpoints",
            config=to_dict(cfg),
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
            timeout_s=cfg.parallel.collective_timeout_s,
        )

    # -- what the loop and the evaluator use ------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast for eval, except under FSDP2, whose MixedPrecisionPolicy already
        gathers bf16 parameters (autocast on top would only add casts)."""
        return torch.bfloat16 if self.cfg.train.dtype == "bf16" and not self.fsdp else None

    def describe(self) -> str:
        ramp = describe_ramp(self.cfg.train)
        text = f"{self._describe_layout()}\n{describe_optimizer(self.optimizer)}"
        return text + (f"\n{ramp}" if ramp else "")

    def _describe_layout(self) -> str:
        if self.mesh is None:
            return f"1 process; {self.accum} micro-batches of {self.cfg.train.micro_batch_size} per step"
        replicate, shard, tp = mesh_shape(self.cfg.parallel, self.world_size)
        text = (
            f"{self.world_size} ranks: mesh dp_replicate={replicate} dp_shard={shard} tp={tp}; "
            f"{self.accum} micro-batches of {self.cfg.train.micro_batch_size} per rank per step"
        )
        if self.fsdp and self.accum > 1:
            units = len(transformer_blocks(self.model)) + 1
            if self.cfg.parallel.grad_sync == "last":
                text += (
                    f"; gradients reduced after the last micro-batch only "
                    f"({(self.accum - 1) * units} reduce-scatters per step saved)"
                )
            else:
                text += (
                    f"; gradients reduced after every micro-batch ({self.accum * units} per step)"
                )
        return text

    # -- one optimizer step -----------------------------------------------------------------

    def step(self, batches: BatchSource, *, step: int | None = None) -> StepOutput:
        """Optimizer step ``step`` (1-based; None: the one after the scheduler's count). Its
        accumulation is `kfm.train.ramp.accumulation_at`: ``self.accum`` unless the batch
        ramps up."""
        cfg, device = self.cfg, self.device
        if step is None:
            step = self.scheduler.last_epoch + 1  # the scheduler counts the steps taken
        accum = accumulation_at(step, cfg.train, self.dp_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss_parallel = cfg.parallel.loss_parallel and cfg.parallel.tp != 1
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.train.dtype == "bf16" and not self.fsdp
            else nullcontext()
        )
        sync_last_only = self.fsdp and cfg.parallel.grad_sync == "last"
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            if sync_last_only:
                assert isinstance(self.model, FSDPModule)
                self.model.set_requires_gradient_sync(i == accum - 1)
            batch = batches.next_batch()
            with autocast:
                logits = self.model(batch.tokens.to(device), batch.doc_ids.to(device))
            # With TP loss parallelism the logits stay vocab-sharded: the loss and its backward
            # must run inside loss_parallel (no-op context otherwise).
            with loss_parallel_context(loss_parallel):
                ce, z = cross_entropy_loss(logits, batch.labels.to(device), z_loss=cfg.optim.z_loss)
                loss = ce if z is None else ce + z
                (loss / accum).backward()
            loss_sum += local_loss(ce.detach())
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        # Works on DTensor (FSDP2/TP) params too: the per-shard norms are combined across ranks.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        # The guard needs the same loss on every rank: one scalar all-reduce, no host sync.
        loss = mean_over_ranks(loss_sum / accum)
        bad = self.guard.check(loss, grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self._optim_timer.start()
        self._update(bad)
        if self.ema is not None:
            self.ema.update(bad)  # local shards only; a skipped update leaves the EMA too
        self._optim_timer.stop()
        self.scheduler.step()
        if self._after_update is not None:
            self._after_update()
        return StepOutput(
            loss=loss, grad_norm=grad_norm, skipped=bad, lr=lr, optim_timer=self._optim_timer
        )

    def _update(self, bad: torch.Tensor) -> None:
        if self._fused:
            # Fused AdamW skips where found_inf is 1: parameters, moments and step count stay.
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]
            self.optimizer.step()
            return
        # foreach/for-loop kernels cannot skip on the device: one host sync per step here.
        if not bad.item():
            self.optimizer.step()

    def _fp8_scale_hook(self) -> Callable[[], None] | None:
        """With fp8 all-gather under FSDP2: a call that computes every sharded weight's fp8 scale
        in one all-reduce after each update (instead of one per layer in the next forward)."""
        if self.cfg.parallel.fp8 == "none" or not self.fsdp:
            return None
        from kfm.parallel.fp8 import precompute_fp8_scales

        return lambda: precompute_fp8_scales(self.model, self.cfg.parallel)

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict[str, Any]) -> None:
        state = {**trainer_state, "scheduler": self.scheduler.state_dict()}
        extra, manifest_extra = None, self.manifest_extra
        if self.ema is not None:
            # DCP entries "ema.<fqn>", sharded like the model; the update count per rank.
            extra = {"ema": self.ema.state_dict()}
            state["ema_updates"] = self.ema.updates
            manifest_extra = {**manifest_extra, "has_ema": True}
        self.checkpointer.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=state,
            manifest_extra=manifest_extra,
            extra_state=extra,
        )

    def load(self, path: Path) -> dict[str, Any]:
        """Model, optimizer, schedule and RNG states from ``path`` (already validated, and its
        config compared with this one, by the caller on every rank: `kfm.train.resume`);
        returns the trainer state. The peak lr and AdamW's hyperparameters are this config's
        (`apply_optim_config`); the step count and moments are the checkpoint's. With
        train.ema_decay the EMA is the checkpoint's too, or, from a checkpoint saved without
        one, starts from the loaded weights (a warning says so)."""
        saved_ema = self.ema is not None and read_manifest(path).get("has_ema", False)
        state = load_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            verify_hashes=False,
            extra_state={"ema": self.ema.state_dict()} if saved_ema and self.ema else None,
        )
        if self.ema is not None:
            if saved_ema:
                self.ema.updates = int(state["ema_updates"])
            else:
                self.ema.reset()
                log.warning(
                    "%s has no weight EMA (saved without train.ema_decay): the EMA starts from "
                    "its weights, with the decay warm-up from the start",
                    path,
                )
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optim_config(self.optimizer, self.scheduler, self.cfg.optim)
        return state

    def wait(self) -> Path | None:
        return self.checkpointer.wait()

    def poll(self) -> Path | None:
        return self.checkpointer.poll()

    def close(self, *, wait: bool = True) -> None:
        self.checkpointer.close(wait=wait)
