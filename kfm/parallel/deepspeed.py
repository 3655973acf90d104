"""DeepSpeed ZeRO backend (``parallel.backend: deepspeed``): config, train step and checkpoints.

The same kfm config drives both backends: `ds_config` turns it into DeepSpeed's JSON config
(batch sizes, ZeRO stage, bf16, clipping, communication buckets) and `DeepSpeedBackend` wraps the
model in a DeepSpeed engine together with kfm's own torch AdamW and LambdaLR, so the optimizer
numerics are those of the FSDP2 path (no DeepSpeed optimizer or scheduler block; their fused Adam
would also JIT-build a C++ op for ~60 s on CPU).

Checkpoints keep kfm's layout and atomicity (see kfm/checkpoint/README.md)::

    step_000123/   DeepSpeed's files (*_model_states.pt, zero_pp_rank_{r}_*_optim_states.pt),
                   trainer_state_rank{r}.pt, manifest.json written last
                   with "backend": "deepspeed"
    latest -> step_000123

`load_model_state_from_deepspeed` consolidates the ZeRO shards into one full fp32 state dict, so
``kfm export`` and ``kfm eval`` read a DeepSpeed checkpoint like a DCP one.

On CPU DeepSpeed runs on gloo; its first ``deepspeed.initialize`` in a fresh environment JIT-builds
a shared-memory comm op (~35-110 s, cached under ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from kfm.checkpoint import CheckpointError, capture_rng_state, restore_rng_state, step_dir_name
from kfm.checkpoint.deepspeed import (
    BACKEND,
    _import_deepspeed,
    validate_deepspeed_checkpoint,
)
from kfm.checkpoint.manager import (
    FORMAT,
    MANIFEST,
    VERSION,
    _move_into_place,
    _point_latest,
    _prune,
    _trainer_state_name,
)
from kfm.config import Config, ConfigError
from kfm.fs import fsync_dir, fsync_tree, sha256_file

if TYPE_CHECKING:
    from kfm.data.loader import Batch

log = logging.getLogger(__name__)


def _model_states_file(zero_stage: int) -> str:
    """DeepSpeed's model file in a checkpoint (no model parallelism: always mp rank 00); ZeRO-3
    writes one per rank and names rank 0's like this."""
    return (
        "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if zero_stage == 3
        else "mp_rank_00_model_states.pt"
    )


# -- config ------------------------------------------------------------------------------------


def grad_accum_steps(cfg: Config, *, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: global / (micro * world_size).

    Raises:
        ConfigError: the global batch is not a multiple of micro_batch_size * world_size.
    """
    per_pass = cfg.train.micro_batch_size * world_size
    if world_size < 1 or cfg.train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x world size {world_size} "
            f"(set --train.global_batch_size to a multiple of {per_pass})"
        )
    return cfg.train.global_batch_size // per_pass


def ds_config(cfg: Config, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for ``cfg`` on ``world_size`` data-parallel ranks.

    Batch: ``train_batch_size`` = train.global_batch_size, ``train_micro_batch_size_per_gpu`` =
    train.micro_batch_size, ``gradient_accumulation_steps`` = global / (micro * world_size);
    DeepSpeed checks the three agree. ZeRO stage = parallel.zero_stage; bf16 params (fp32 master
    weights in the ZeRO optimizer) when train.dtype=bf16; gradients reduced in
    parallel.reduce_dtype; global-norm clipping at optim.grad_clip (0 disables). There is no
    ``optimizer``/``scheduler`` block: `DeepSpeedBackend` passes kfm's torch AdamW and LambdaLR.

    Bucket sizes (elements) follow the model width as the Hugging Face integration does: large
    enough to amortise a collective's latency, small enough that a bucket of a 4096-wide model is
    ~32 MiB in bf16. Needs no deepspeed import (``--dry-run`` works without the extra).

    Raises:
        ConfigError: parallel.tp > 1 (the DeepSpeed backend is data-parallel only), or the batch
            sizes do not divide (see `grad_accum_steps`).
    """
    if cfg.parallel.tp != 1:
        raise ConfigError(
            f"parallel.tp={cfg.parallel.tp}: the DeepSpeed backend is data-parallel only "
            "(set --parallel.tp=1, or --parallel.backend=fsdp for tensor parallel)"
        )
    accum = grad_accum_steps(cfg, world_size=world_size)
    d = cfg.model.d_model
    zero: dict[str, Any] = {
        "stage": cfg.parallel.zero_stage,
        # Copy gradients into one contiguous buffer as they are produced: less fragmentation.
        "contiguous_gradients": True,
        # Overlap the gradient reduce with the rest of backward (side streams on GPU).
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": d * d,
    }
    if cfg.parallel.zero_stage < 3:
        zero["allgather_bucket_size"] = d * d
    else:
        zero |= {
            # Gather the next blocks' parameters while this one computes.
            "stage3_prefetch_bucket_size": int(0.9 * d * d),
            # Parameters below this many elements (norm weights) stay whole on every rank:
            # sharding them costs a collective each for nothing.
            "stage3_param_persistence_threshold": 10 * d,
            # Save the consolidated weights through zero_to_fp32 instead (see
            # load_model_state_from_deepspeed): gathering them at every save costs memory.
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    reduce_dtype = {"fp32": "fp32", "bf16": "bf16"}[cfg.parallel.reduce_dtype]
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "fp16": {"enabled": False},
        "communication_data_type": reduce_dtype,
        # kfm passes torch's AdamW; ZeRO runs it on its flat fp32 partitions (elementwise maths,
        # so the result equals unsharded AdamW) but calls it "untested" unless allowed.
        "zero_allow_untested_optimizer": True,
        # kfm's MetricLogger reports progress; DeepSpeed's own printing would only repeat it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def ds_config_yaml(cfg: Config, world_size: int) -> str:
    """`ds_config` as YAML, for ``kfm train --dry-run`` (JSON has the same keys and values)."""
    return yaml.safe_dump(ds_config(cfg, world_size=world_size), sort_keys=False)


# -- training ----------------------------------------------------------------------------------


class BatchSource(Protocol):
    """Anything with ``next_batch()`` (kfm.data.PackedLoader)."""

    def next_batch(self) -> Batch: ...


LossFn = Callable[..., tuple[Tensor, Tensor | None]]
"""``(logits, labels, *, z_loss) -> (ce, z or None)``: kfm.train.loss.cross_entropy_loss."""


class DeepSpeedStepResult(NamedTuple):
    """What one optimizer step reports; field names match kfm.train.trainer.StepResult."""

    loss: Tensor
    """Mean cross-entropy over this rank's micro-batches (fp32 scalar, no sync); the mean of it
    over ranks is the global-batch loss (kfm.train.dist.mean_over_ranks on log steps)."""
    grad_norm: Tensor
    """Global gradient norm before clipping (fp32 scalar)."""
    lr: float
    """Learning rate this update used (the scheduler has already moved on)."""


def _ensure_process_group(backend: str) -> None:
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
    """A kfm model trained by a DeepSpeed ZeRO engine with kfm's optimizer and schedule.

    Build the model, `kfm.train.optim.build_optimizer` and `build_scheduler` as for the FSDP path
    (same seed, so the same initial weights), then hand them over; use `step` for each optimizer
    step, `save`/`load` for checkpoints and `module` for evaluation (with ZeRO-3 every rank must
    run the evaluation: each forward gathers the sharded parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_fn: LossFn,
    ) -> None:
        """Wrap ``model`` in a DeepSpeed engine (collective: every rank calls it).

        Starts a process group with ``parallel.dist_backend`` if none exists. The model must be
        on the CPU or this rank's GPU; DeepSpeed moves it to the accelerator's device and, with
        bf16, casts its parameters (not its buffers) to bf16. ``loss_fn`` is the trainer's
        kfm.train.loss.cross_entropy_loss (passed in: kfm.parallel does not import kfm.train).

        Raises:
            ImportError: deepspeed is not installed (names the ``kfm[deepspeed]`` extra).
            ConfigError: see `ds_config`.
        """
        deepspeed = _import_deepspeed()
        _ensure_process_group(cfg.parallel.dist_backend)
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.accum = grad_accum_steps(cfg, world_size=self.world_size)
        self.config = ds_config(cfg, world_size=self.world_size)
        # dist_init_required=False: use the group above instead of DeepSpeed's own launcher logic.
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )
        self.engine = engine
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler

    @property
    def module(self) -> nn.Module:
        """The wrapped kfm model (for evaluation; its forward works under ZeRO-3 too)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, loader: BatchSource) -> DeepSpeedStepResult:
        """One optimizer step: ``accum`` micro-batches of forward/backward, then clip and update.

        ``engine.backward`` divides the loss by gradient_accumulation_steps and ``engine.step``
        updates only on the accumulation boundary (every ``accum``-th call), averaging gradients
        over ranks, so one call of this method is one kfm optimizer step. The loss is kfm's fp32
        cross-entropy (plus z-loss if configured); like kfm.train.trainer.train_step this returns
        the rank's own mean cross-entropy, without a collective.
        """
        engine = self.engine
        device = engine.device
        loss_sum = torch.zeros((), device=device)
        # What LambdaLR last set: the lr of this update. (Not a saved param_groups reference:
        # loading a ZeRO checkpoint replaces the optimizer's param_groups list.)
        lr = float(self.scheduler.get_last_lr()[0])
        for _ in range(self.accum):
            batch = loader.next_batch()
            logits = engine(batch.tokens.to(device), batch.doc_ids.to(device))
            ce, z = self.loss_fn(logits, batch.labels.to(device), z_loss=self.cfg.optim.z_loss)
            engine.backward(ce if z is None else ce + z)
            engine.step()
            loss_sum += ce.detach()
        if not engine.was_step_applied():
            raise RuntimeError(
                "DeepSpeed skipped the optimizer step (overflow or a wrong accumulation count)"
            )
        grad_norm = torch.as_tensor(float(engine.get_global_grad_norm()), dtype=torch.float32)
        return DeepSpeedStepResult(loss=loss_sum / self.accum, grad_norm=grad_norm, lr=lr)

    # -- checkpoints -----------------------------------------------------------------------

    def save(
        self,
        root: str | Path,
        step: int,
        *,
        trainer_state: dict[str, Any],
        config: dict[str, Any],
        keep_last: int = 0,
    ) -> Path:
        """Save the engine's state as ``root/step_XXXXXX`` and point ``latest`` at it.

        Collective: every rank calls it. Same protocol as kfm.checkpoint.save_checkpoint: every
        rank writes into ``step_XXXXXX.tmp-<pid of rank 0>/`` (DeepSpeed's files via
        ``engine.save_checkpoint`` plus ``trainer_state_rank{r}.pt`` with the RNG states added);
        rank 0 fsyncs, hashes every file, writes ``manifest.json`` last (``"backend":
        "deepspeed"``), renames the dir into place, moves the ``latest`` symlink and prunes to
        ``keep_last``. ``config`` is the resolved config as a JSON-serialisable dict.

        Returns:
            The final step directory.

        Raises:
            CheckpointError: ``config`` is not JSON-serialisable.
        """
        try:
            config_json = json.loads(json.dumps(config))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"config is not JSON-serialisable ({e}): pass to_dict(cfg)"
            ) from e
        root = Path(root)
        final = root / step_dir_name(step)
        holder: list[str | None] = [None]
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            name = f"{final.name}.tmp-{os.getpid()}"
            _remove(root / name)  # a failed earlier attempt of this same process
            holder[0] = name
        dist.broadcast_object_list(holder, src=0)  # other ranks' pids differ
        tag = holder[0]
        assert tag is not None
        tmp = root / tag
        try:
            # save_latest=False: DeepSpeed's "latest" file would collide with kfm's symlink.
            self.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
            extra = dict(trainer_state)
            extra.setdefault("step", step)
            extra.setdefault("rng", capture_rng_state())
            with open(tmp / _trainer_state_name(self.rank), "wb") as f:
                torch.save(extra, f)
                f.flush()
                os.fsync(f.fileno())
            dist.barrier()  # every rank's files are written before rank 0 hashes them
            if self.rank == 0:
                fsync_tree(tmp)  # DeepSpeed does not fsync what it writes
                self._write_manifest(tmp, step, config_json)
                fsync_dir(tmp)
                _move_into_place(tmp, final)
                _point_latest(root, final.name)
                _prune(root, keep_last=keep_last, keep=final)
        except BaseException:
            if self.rank == 0:
                _remove(tmp)
            raise
        dist.barrier()  # nobody returns (and maybe loads) before the checkpoint is final
        return final

    def _write_manifest(self, tmp: Path, step: int, config_json: dict[str, Any]) -> None:
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(q for q in tmp.rglob("*") if q.is_file())
        }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "backend": BACKEND,
            "zero_stage": self.cfg.parallel.zero_stage,
            "step": step,
            "world_size": self.world_size,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "has_optimizer": True,
            "torch_version": torch.__version__,
            "deepspeed_version": _import_deepspeed().__version__,
            # What validation must find besides the hashes (DCP checkpoints need .metadata).
            "required_files": [
                _model_states_file(self.cfg.parallel.zero_stage),
                _trainer_state_name(0),
            ],
            "config": config_json,
            "files": files,
        }
        path = tmp / MANIFEST
        with open(path, "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())

    def load(self, path: str | Path, *, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load model, optimizer and scheduler from a DeepSpeed checkpoint; return trainer state.

        Collective: every rank calls it. Validates the manifest and hashes first. If ``config``
        is given, its ``model`` section must equal the checkpoint's. Restores this rank's RNG
        states from ``trainer_state_rank{r}.pt`` (unpickled: load only checkpoints you trust).

        Raises:
            CheckpointError: invalid or non-DeepSpeed checkpoint, a different model config, or a
                different world size (ZeRO optimizer shards reload only on as many ranks as
                wrote them; convert with DeepSpeed's ds_to_universal.py to change it).
        """
        path = Path(path)
        manifest = validate_deepspeed_checkpoint(path)
        if config is not None and manifest["config"].get("model") != json.loads(
            json.dumps(config.get("model"))
        ):
            raise CheckpointError(
                f"checkpoint {path} was saved with a different model config: resume with the "
                "matching config or start a new run (--checkpoint.resume=never)"
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
        # weights_only=False: trainer state holds numpy RNG and loader state, not only tensors.
        state = torch.load(
            path / _trainer_state_name(self.rank), map_location="cpu", weights_only=False
        )
        if "rng" in state:
            restore_rng_state(state["rng"])
        return state


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
