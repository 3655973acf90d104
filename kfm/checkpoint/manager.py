"""DCP checkpoints of model + optimizer on the step-directory protocol of `kfm.checkpoint.stepdir`.

Model and optimizer go through torch.distributed.checkpoint (DCP) with the state dicts of
``torch.distributed.checkpoint.state_dict``, so the same code serves one process, FSDP2 and
tensor-parallel DTensors (DCP reshards on load). `save_checkpoint` saves synchronously;
`Checkpointer` is what the training loop uses: with ``async_save`` it copies the state to host
memory (``dcp.async_save``'s staging: the only part that blocks training), then writes the files,
hashes each rank's own files and finalizes the step dir in a background thread while training
goes on, with at most one save in flight. A crash before the finalize leaves only a ``.tmp-*``
dir: the previous checkpoint stays the newest valid one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from kfm.checkpoint.rng import restore_rng_state
from kfm.checkpoint.stepdir import (
    DCP_METADATA,
    CheckpointError,
    PendingSave,
    agree_on_checkpoint,
    rank_world,
    read_manifest,
    read_trainer_state,
    validate_checkpoint,
)

log = logging.getLogger(__name__)
# A single-process DCP save or load says it assumes one process; that is what kfm means by it.
# (Installed for the whole process: asynchronous saves warn from their background thread.)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

_RESUME_HINT = "resume with the matching config or start a new run (--checkpoint.resume=never)"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp_load(state: dict[str, Any], directory: Path, *, no_dist: bool) -> None:
    with _quiet_dist():
        dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=no_dist)


def _short_error(e: BaseException) -> str:
    """One line per failing rank instead of DCP's full per-rank tracebacks."""
    if isinstance(e, dcp.CheckpointException):
        return "; ".join(
            f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in e.failures.items()
        )
    return f"{type(e).__name__}: {e}"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _config_differences(saved: dict, current: dict, sections: tuple[str, ...]) -> list[str]:
    """``"model.d_model=256 but the config has model.d_model=128"`` for each differing key."""
    # Round-trip the current config through JSON so tuples/lists and int/float compare as saved.
    current = json.loads(json.dumps(current))
    absent = "<absent>"
    diffs = []
    for section in sections:
        old = _flatten(saved.get(section, absent), section)
        new = _flatten(current.get(section, absent), section)
        for key in sorted(old.keys() | new.keys()):
            a, b = old.get(key, absent), new.get(key, absent)
            if a != b:
                diffs.append(f"{key}={a} but the config has {key}={b}")
    return diffs


def _check_json(config: dict[str, Any], step: int) -> None:
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"config for checkpoint step {step} is not JSON-serialisable ({e}); "
            "pass kfm.config.to_dict(cfg)"
        ) from e


def model_optimizer_state(
    model: nn.Module, optimizer: Optimizer | None, extra_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``{"model": ..., "optim": ..., **extra_state}`` as DCP saves and loads them (sharded
    tensors stay sharded: each rank holds and writes only its own shards). ``extra_state``: more
    top-level entries, e.g. ``{"ema": ...}`` (kfm.train.ema)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return {**state, **(extra_state or {})}


# -- saving --------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Optimizer | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 0,
    group: Any = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Save model, optimizer and trainer state as ``root/step_XXXXXX`` and point ``latest`` at it,
    synchronously (see `Checkpointer` for the asynchronous save the training loop uses).

    Every rank of ``group`` must call this (DCP's save is collective). The protocol is
    `kfm.checkpoint.stepdir.PendingSave`: write into ``step_XXXXXX.tmp-<pid>/``, each rank
    hashes the files it wrote, rank 0 writes the manifest last and renames the dir into place.
    ``trainer_state`` is anything torch.save can pickle; the RNG states are added under "rng".
    ``config`` is the resolved config as a JSON-serialisable dict (it goes into the manifest);
    ``manifest_extra``: more top-level manifest keys (JSON values), as in `Checkpointer.save`.

    Returns:
        The final step directory.

    Raises:
        ValueError: negative ``step`` or ``keep_last``.
        CheckpointError: ``config`` is not JSON-serialisable, or ``root/latest`` is not a symlink.
    """
    if step < 0 or keep_last < 0:
        raise ValueError(f"step={step} and keep_last={keep_last} must be >= 0")
    _check_json(config, step)
    pending = PendingSave.begin(root, step, group=group)
    try:
        with _quiet_dist():
            # sync_files: DCP fsyncs each file it writes before returning.
            dcp.save(
                model_optimizer_state(model, optimizer),
                storage_writer=FileSystemWriter(pending.tmp, sync_files=True),
                process_group=group,
                no_dist=not _dist_on(),
            )
        pending.write_trainer_state(trainer_state)
        return pending.finalize(
            config=config,
            keep_last=keep_last,
            manifest_extra={**(manifest_extra or {}), "has_optimizer": optimizer is not None},
        )
    except BaseException:
        pending.abort()
        raise


class Checkpointer:
    """Saves a training run's DCP checkpoints, asynchronously when asked, one at a time.

    ``save`` blocks the caller only while the model and optimizer state are copied to host
    memory (async) or for the whole save (sync); ``wait`` returns once the last save is final (or
    raises its error on every rank). In a distributed run the checkpoint's collectives go over a
    process group of its own (gloo), so the background thread never interleaves with training's
    collectives on the default group.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        config: dict[str, Any],
        keep_last: int,
        async_save: bool,
        timeout_s: float = 900.0,
    ) -> None:
        self.root = Path(root)
        self.config = config
        self.keep_last = keep_last
        self.async_save = async_save
        self.group: Any = None
        if _dist_on():
            # Collective at construction: every rank builds its Checkpointer at the same point.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._stager: DefaultStager | None = None
        self._in_flight: _Job | None = None
        self.last_blocking_s = 0.0
        """Seconds the last `save` call blocked its caller."""

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: Optimizer | None,
        trainer_state: dict[str, Any],
        manifest_extra: dict[str, Any] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint ``step`` (collective: every rank calls it at the same step).

        An earlier save still in flight is waited for first. Async: returns once the state is
        staged in host memory; training may then change the weights. ``manifest_extra``: more
        top-level keys of ``manifest.json`` (JSON values; training records the tokenizer hash
        and the data fingerprint there). ``extra_state``: more DCP entries beside model and
        optimizer (`model_optimizer_state`; the weight EMA).
        """
        _check_json(self.config, step)
        self.wait()
        t0 = time.perf_counter()
        pending = PendingSave.begin(self.root, step, group=self.group)
        try:
            pending.write_trainer_state(trainer_state)
            state = model_optimizer_state(model, optimizer, extra_state)
            writer = FileSystemWriter(pending.tmp, sync_files=True)
            extra = {**(manifest_extra or {}), "has_optimizer": optimizer is not None}
            if not self.async_save:
                with _quiet_dist():
                    dcp.save(
                        state,
                        storage_writer=writer,
                        process_group=self.group,
                        no_dist=not _dist_on(),
                    )
                pending.finalize(config=self.config, keep_last=self.keep_last, manifest_extra=extra)
                self.last_blocking_s = time.perf_counter() - t0
                return
            if self._stager is None:
                # Pinned host buffers make the device->host copy fast; kept for every save.
                cuda = torch.cuda.is_available()
                self._stager = DefaultStager(
                    StagingOptions(
                        use_pinned_memory=cuda,
                        use_shared_memory=False,
                        use_async_staging=False,
                        use_non_blocking_copy=cuda,
                    )
                )
            with _quiet_dist():
                upload = dcp.async_save(
                    state,
                    storage_writer=writer,
                    process_group=self.group,
                    async_stager=self._stager,
                    no_dist=not _dist_on(),
                )
            self._in_flight = _Job(lambda: self._finish(upload, pending, extra))
        except BaseException:
            pending.abort()
            raise
        self.last_blocking_s = time.perf_counter() - t0

    def _finish(self, upload: Any, pending: PendingSave, extra: dict[str, Any]) -> Path:
        # Runs in the background thread; collectives only on self.group.
        try:
            upload.result()
        except BaseException:
            pending.abort()
            raise
        return pending.finalize(config=self.config, keep_last=self.keep_last, manifest_extra=extra)

    def poll(self) -> Path | None:
        """The dir of the save in flight if it has finished successfully since (once), without
        blocking; None while it is being written. A failed save is left for `wait` to raise at
        the point every rank calls it."""
        job = self._in_flight
        if job is None or not job.done() or job.failed:
            return None
        return self.wait()

    @property
    def in_flight(self) -> bool:
        """A save is still being written."""
        return self._in_flight is not None and not self._in_flight.done()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is final; return its dir.

        Raises:
            CheckpointError: the background save failed (on every rank; the previous checkpoint
                stays the newest valid one).
        """
        job, self._in_flight = self._in_flight, None
        if job is None:
            return None
        try:
            return job.result()
        except CheckpointError:
            raise
        except BaseException as e:
            raise CheckpointError(f"asynchronous checkpoint save failed: {_short_error(e)}") from e

    def close(self, *, wait: bool = True) -> None:
        """Finish the save in flight and free the staging buffers. ``wait=False`` (after an
        error) abandons a save in flight instead: its thread is a daemon, so a process that
        exits is not held up by it, and its ``.tmp-*`` dir is never loaded."""
        try:
            if wait:
                self.wait()
            else:
                self._in_flight = None
        finally:
            if self._stager is not None and wait:
                self._stager.close()
                self._stager = None


class _Job:
    """``fn()`` running in a daemon thread (a process that is exiting does not wait for it)."""

    def __init__(self, fn: Callable[[], Path]) -> None:
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="kfm-checkpoint")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, fn: Callable[[], Path]) -> None:
        try:
            self._result = fn()
        except BaseException as e:
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def result(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _quiet_dist(warnings.catch_warnings):
    """Silence DCP's "torch.distributed is disabled" warning of single-process saves."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# -- loading -------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: Optimizer | None,
    config: dict[str, Any] | None = None,
    strict_config_keys: tuple[str, ...] = ("model",),
    restore_rng: bool = True,
    verify_hashes: bool = True,
    extra_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate a checkpoint, load model (and optimizer) in place, return the trainer state.

    Every rank must call this; the sha256 checks (``verify_hashes``) are spread over the ranks,
    each file hashed by one. If ``config`` is given, the config sections named in
    ``strict_config_keys`` (the architecture) must equal the manifest's. Model and optimizer are
    loaded with DCP into the state dicts of ``get_model_state_dict``/``get_optimizer_state_dict``
    and set back with ``set_*_state_dict`` (resharding to the current layout). A fresh optimizer
    gets its state initialised first (torch takes one step with zero grads and lr 0, which leaves
    the parameters unchanged). This rank's ``trainer_state_rank{r}.pt`` is read with
    ``torch.load(weights_only=False)`` (it unpickles: load only checkpoints you trust), and, with
    ``restore_rng``, its ``"rng"`` states are restored. ``extra_state``: more DCP entries saved
    with `Checkpointer.save`'s ``extra_state``, loaded in place into its tensors (resharded).

    Raises:
        CheckpointError: invalid checkpoint, differing config keys (each one listed), an
            optimizer requested from a checkpoint saved without one, or a state-dict mismatch.
    """
    path = Path(path)
    if _dist_on():
        # Each rank hashes its share of the files; all ranks raise together if any share is bad.
        if agree_on_checkpoint([path], verify_hashes=verify_hashes) is None:
            raise CheckpointError(f"checkpoint {path} failed validation (see the warning above)")
        manifest = read_manifest(path)
    else:
        manifest = validate_checkpoint(path, verify_hashes=verify_hashes)
    if config is not None:
        diffs = _config_differences(manifest.get("config", {}), config, strict_config_keys)
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was saved with {'; '.join(diffs)}: {_RESUME_HINT}"
            )
    if optimizer is not None and not manifest.get("has_optimizer", False):
        raise CheckpointError(
            f"checkpoint {path} has no optimizer state; load it with optimizer=None "
            "(e.g. for fine-tuning from its weights)"
        )

    state = model_optimizer_state(model, optimizer, extra_state)
    try:
        _dcp_load(state, path, no_dist=not _dist_on())
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])
    except (Exception, dcp.CheckpointException) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer ({_short_error(e)}); "
            f"{_RESUME_HINT}"
        ) from e

    rank, _ = rank_world()
    trainer_state = read_trainer_state(path, rank, int(manifest.get("world_size", 1)))
    if restore_rng and "rng" in trainer_state:
        restore_rng_state(trainer_state["rng"])
    return trainer_state


def saved_entries(path: Path, entry: str) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path in the saved nested dict, DCP metadata) of every item saved under ``entry``
    ("model", "ema", ...) in the DCP checkpoint at ``path``, from its metadata file only."""
    metadata = FileSystemReader(path).read_metadata()
    # planner_data maps DCP's flattened key ("model.layers.0.wq.weight") to its path in the saved
    # nested dict (("model", "layers.0.wq.weight")); dots inside FQNs make the key ambiguous alone.
    paths: dict[str, tuple] = metadata.planner_data or {}
    for key, meta in metadata.state_dict_metadata.items():
        key_path = paths.get(key) or tuple(key.split(".", 1))
        if key_path[0] == entry:
            yield key_path, meta


def load_model_state(
    path: str | Path, *, verify_hashes: bool = True, entry: str = "model"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's full (unsharded) state dict on CPU, and the manifest's config.
    ``entry="ema"``: the weight EMA saved beside it (train.ema_decay), with the same keys.

    Needs neither the model object nor an optimizer: the tensors are allocated from DCP's
    metadata (global shapes and dtypes), so a checkpoint saved sharded over N ranks loads whole
    in this one process. Keys are the model's FQNs as ``get_model_state_dict`` wrote them
    (tied weights appear under each name). Runs locally even if a process group exists.
    Cost: holds the whole model in CPU memory.

    Raises:
        CheckpointError: the checkpoint is invalid or holds no model state.
    """
    path = Path(path)
    manifest = validate_checkpoint(path, verify_hashes=verify_hashes)
    if manifest.get("backend") == "deepspeed":
        if entry != "model":
            raise CheckpointError(f"{path} is a DeepSpeed checkpoint: it holds no {entry} state")
        from kfm.checkpoint.deepspeed import load_model_state_from_deepspeed

        return load_model_state_from_deepspeed(path, verify_hashes=False)  # just verified
    model_state: dict[str, Any] = {}
    for key_path, meta in saved_entries(path, entry):
        if isinstance(meta, TensorStorageMetadata):
            value: Any = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            value = None  # a pickled object (e.g. a module's _extra_state); DCP replaces it
        node = model_state
        for part in key_path[1:-1]:
            node = node.setdefault(part, {})
        node[key_path[-1]] = value
    if not model_state:
        what = "weight EMA (train with --train.ema_decay > 0)" if entry == "ema" else entry
        raise CheckpointError(f"{path / DCP_METADATA} holds no {what} state")
    try:
        _dcp_load({entry: model_state}, path, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:
        raise CheckpointError(f"reading the model state of {path} failed: {_short_error(e)}") from e
    return model_state, manifest.get("config", {})
