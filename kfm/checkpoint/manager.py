"""Save, validate, find and load a run's checkpoints (torch.distributed.checkpoint + a manifest).

Layout under ``runs/<name>/checkpoints/`` (see README.md in this folder)::

    step_000123/              DCP files (.metadata, __*_*.distcp) with model + optimizer,
                              trainer_state_rank{r}.pt per rank, manifest.json (written last)
    latest -> step_000123     relative symlink, replaced atomically after the step dir is final
    step_000200.tmp-<pid>/    an interrupted save: never loaded, deleted by the next save

A save writes everything into the ``.tmp-<pid>`` dir, fsyncs it and renames it into place, so a
``step_*`` dir either is complete or does not exist; the manifest's sizes and sha256 catch
anything that changed afterwards. Model and optimizer go through DCP with the state dicts of
``torch.distributed.checkpoint.state_dict`` so the same code serves plain modules now and
FSDP2/DTensor later (DCP reshards on load). Works with no process group at all; with one, every
rank calls the collectives and rank 0 alone writes the manifest, the symlink and prunes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from kfm.checkpoint._fs import (
    files_under,
    fsync_dir,
    pid_alive,
    remove_tree,
    sha256_file,
    write_bytes_durable,
)
from kfm.checkpoint.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

FORMAT = "kfm-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_DCP_METADATA = ".metadata"  # DCP's index of every tensor and byte blob; written last by DCP
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Leftovers of a save (or of a replace/prune) that did not finish: "<final>.tmp-<pid>[-old]".
_TMP_ENTRY = re.compile(r"^(?:step_\d+|latest)\.tmp-(\d+)(?:-old)?$")
_RESUME_HINT = "resume with the matching config or start a new run (--checkpoint.resume=never)"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run's config."""


# -- small helpers -----------------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps, e.g. ``step_000123``."""
    return f"step_{step:06d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory under root (complete or not), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _step_of(p) is not None and p.is_dir()]
    return sorted(dirs, key=lambda p: _step_of(p) or 0)


def _dcp_save(state: dict[str, Any], directory: Path) -> None:
    no_dist = not _dist_on()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # sync_files: DCP fsyncs each file it writes before returning.
        dcp.save(
            state, storage_writer=FileSystemWriter(directory, sync_files=True), no_dist=no_dist
        )


def _dcp_load(state: dict[str, Any], directory: Path, *, no_dist: bool) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
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


# -- saving ------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Optimizer | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Save model, optimizer and trainer state as ``root/step_XXXXXX`` and point ``latest`` at it.

    Every rank must call this (DCP's save is collective). Order: (1) write DCP files and
    ``trainer_state_rank{r}.pt`` into ``root/step_XXXXXX.tmp-<pid of rank 0>/``; (2) rank 0 hashes
    every file and writes ``manifest.json`` last; (3) fsync, rename the tmp dir into place (an
    existing dir of the same step is replaced: it is renamed aside first, then deleted); (4)
    replace the ``latest`` symlink atomically; (5) keep the ``keep_last`` newest complete
    checkpoints (0 keeps all; the one just written is always kept) and delete ``*.tmp-*`` entries
    whose process is gone.

    ``trainer_state`` is anything torch.save can pickle (step, scheduler, loader state, ...); the
    RNG states of python/numpy/torch(/cuda) are added under ``"rng"`` unless already present, and
    ``"step"`` is set to ``step`` unless present. ``config`` is the full resolved config as a
    JSON-serialisable dict; it goes into the manifest.

    Cost: rank 0 reads every byte back to hash it (~1 GB/s), on top of writing it.

    Returns:
        The final step directory.

    Raises:
        ValueError: negative ``step`` or ``keep_last``.
        CheckpointError: ``config`` is not JSON-serialisable, or ``root/latest`` is not a symlink.
    """
    if step < 0 or keep_last < 0:
        raise ValueError(f"step={step} and keep_last={keep_last} must be >= 0")
    try:
        config_json = json.loads(json.dumps(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"config for checkpoint step {step} is not JSON-serialisable ({e}); "
            "pass kfm.config.to_dict(cfg)"
        ) from e
    root = Path(root)
    rank, world_size = _rank_world()
    final = root / step_dir_name(step)

    tmp: Path | None = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        remove_tree(tmp)  # a failed earlier attempt of this same process
        tmp.mkdir()
    if _dist_on():
        # Other ranks' pids differ; everyone writes into rank 0's directory (shared file system).
        holder = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])  # type: ignore[arg-type]
    assert tmp is not None

    try:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        _dcp_save(state, tmp)

        extra = dict(trainer_state)
        extra.setdefault("step", step)
        extra.setdefault("rng", capture_rng_state())
        with open(tmp / _trainer_state_name(rank), "wb") as f:
            torch.save(extra, f)
            f.flush()
            os.fsync(f.fileno())
        _barrier()  # every rank's files are on disk before rank 0 hashes them

        if rank == 0:
            files = {
                p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files_under(tmp)
            }
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "world_size": world_size,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "has_optimizer": optimizer is not None,
                "torch_version": torch.__version__,
                "config": config_json,
                "files": files,
            }
            write_bytes_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            fsync_dir(tmp)
            _move_into_place(tmp, final)
            _point_latest(root, final.name)
            _prune(root, keep_last=keep_last, keep=final)
    except BaseException:
        if rank == 0 and tmp.exists():
            remove_tree(tmp)  # best effort; the next save removes it otherwise
        raise
    _barrier()  # nobody returns (and maybe loads) before the checkpoint is final
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (a re-save of the same step) is renamed
    aside first, so a crash in between leaves no half-replaced dir, only ``*.tmp-*`` leftovers."""
    aside = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(f"{final.name}.tmp-{os.getpid()}-old")
        remove_tree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        remove_tree(aside)


def _point_latest(root: Path, name: str) -> None:
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"{link} exists and is not a symlink; move it away so checkpoints can update it"
        )
    tmp_link = root / f"{LATEST}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(name, tmp_link)  # relative: the run directory can be moved or copied
    os.replace(tmp_link, link)  # atomic on POSIX: readers see the old or the new target
    fsync_dir(root)


def _prune(root: Path, *, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never ``keep``) and stale
    ``*.tmp-*`` entries of processes that no longer exist (or of this process: it has none)."""
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old.name == keep.name:
                continue
            # Rename first: an interrupted delete then leaves a *.tmp-* leftover, not a step dir
            # that has lost some files.
            aside = old.with_name(f"{old.name}.tmp-{os.getpid()}-old")
            remove_tree(aside)
            os.rename(old, aside)
            remove_tree(aside)
            log.info("pruned checkpoint %s (keep_last=%d)", old, keep_last)
    for entry in root.iterdir():
        match = _TMP_ENTRY.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            log.info("removing leftover of an interrupted save: %s", entry)
            remove_tree(entry)
    fsync_dir(root)


# -- finding and validating --------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint dirs under ``root`` (``step_N`` with a manifest), oldest first by step.

    Complete is not valid: use `validate_checkpoint` or `find_latest_valid` to check contents.
    A missing ``root`` gives an empty list.
    """
    return [p for p in _step_dirs(Path(root)) if (p / MANIFEST).is_file()]


def validate_checkpoint(path: str | Path, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint dir against its manifest and return the manifest.

    Checks: the dir is not a ``*.tmp-*`` leftover; ``manifest.json`` exists, parses and has our
    format and version; its step matches the dir name; DCP's ``.metadata`` and
    ``trainer_state_rank0.pt`` are listed; every listed file exists with the listed size and, if
    ``verify_hashes``, sha256 (this reads every byte: ~1 s per GB).

    Raises:
        CheckpointError: naming the first bad file and what is wrong with it.
    """
    path = Path(path)
    if _TMP_ENTRY.match(path.name):
        raise CheckpointError(f"{path} is an interrupted save (*.tmp-*) and is never loaded")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path} is missing: the save of {path} did not finish; "
            "use an earlier step or delete the directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{manifest_path} is unreadable ({e}); the checkpoint is damaged"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest_path} has version {manifest.get('version')!r}; this kfm reads version "
            f"{VERSION}: use the kfm release that wrote it"
        )
    step = _step_of(path.resolve())
    if step is not None and manifest.get("step") != step:
        raise CheckpointError(
            f"{manifest_path} says step {manifest.get('step')} but the directory is step {step}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path} has no 'files' table")
    # DeepSpeed checkpoints (kfm.parallel.deepspeed) list their own required files.
    for required in manifest.get("required_files", (_DCP_METADATA, _trainer_state_name(0))):
        if required not in files:
            raise CheckpointError(f"{manifest_path} does not list {required}: incomplete save")
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {manifest_path} but missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{file} has {size} bytes but the manifest says {expected['size']}: "
                "truncated or overwritten"
            )
        if verify_hashes and sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {manifest_path}: corrupt")
    return manifest


def find_latest_valid(root: str | Path, *, verify_hashes: bool = True) -> Path | None:
    """The newest ``step_N`` dir under ``root`` that passes `validate_checkpoint`, or None.

    Invalid dirs (no manifest, truncated or altered files) are skipped with a warning naming
    the problem; ``*.tmp-*`` dirs are never candidates.
    """
    for path in reversed(_step_dirs(Path(root))):
        try:
            validate_checkpoint(path, verify_hashes=verify_hashes)
        except CheckpointError as e:
            log.warning("skipping invalid checkpoint %s: %s", path, e)
            continue
        return path
    return None


def resolve_checkpoint_arg(arg: str | Path) -> Path:
    """Turn a user's checkpoint argument into one step dir.

    Accepts a step dir (or the ``latest`` symlink), a ``checkpoints/`` dir, or a run dir holding
    ``checkpoints/``; the latter two give their newest valid checkpoint. The returned dir is not
    re-validated here if it was named directly (`load_checkpoint` validates).

    Raises:
        CheckpointError: the path does not exist, is an unfinished step dir, or holds no valid
            checkpoint.
    """
    path = Path(arg)
    if path.is_symlink():
        path = path.parent / os.readlink(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path {arg} does not exist: pass a step dir "
            "(runs/<name>/checkpoints/step_000123), a checkpoints/ dir or a run dir"
        )
    if (path / MANIFEST).is_file():
        return path
    if _step_of(path) is not None or _TMP_ENTRY.match(path.name):
        raise CheckpointError(
            f"{path} has no {MANIFEST}: its save did not finish; pass an earlier step dir, or "
            f"{path.parent} to use the newest valid checkpoint"
        )
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_latest_valid(root)
    if found is None:
        raise CheckpointError(
            f"no valid checkpoint under {root} (expected step_XXXXXX/ dirs with {MANIFEST}); "
            "start a new run with --checkpoint.resume=never"
        )
    return found


# -- loading -----------------------------------------------------------------------------------


def _read_trainer_state(path: Path, rank: int, saved_world_size: int) -> dict[str, Any]:
    file = path / _trainer_state_name(rank)
    if not file.is_file():
        # Resuming on a different world size: DCP reshards model and optimizer, but per-rank
        # loader/RNG state cannot be split or merged generically.
        log.warning(
            "%s missing (saved with world_size=%d): using rank 0's trainer state",
            file,
            saved_world_size,
        )
        file = path / _trainer_state_name(0)
    # weights_only=False: trainer state holds numpy RNG state and loader state, not only tensors.
    # This unpickles; load only checkpoints you (or your own runs) wrote.
    return torch.load(file, map_location="cpu", weights_only=False)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: Optimizer | None,
    config: dict[str, Any] | None = None,
    strict_config_keys: tuple[str, ...] = ("model",),
    restore_rng: bool = True,
    verify_hashes: bool = True,
) -> dict[str, Any]:
    """Validate a checkpoint, load model (and optimizer) in place, return the trainer state.

    Every rank must call this. If ``config`` is given, the config sections named in
    ``strict_config_keys`` (the architecture) must equal the manifest's. Model and optimizer are
    loaded with DCP into the state dicts of ``get_model_state_dict``/``get_optimizer_state_dict``
    and set back with ``set_*_state_dict`` (resharding to the current layout). A fresh optimizer
    gets its state initialised first (torch takes one step with zero grads and lr 0, which leaves
    the parameters unchanged). This rank's ``trainer_state_rank{r}.pt`` is read with
    ``torch.load(weights_only=False)`` (it unpickles: load only checkpoints you trust), and, with
    ``restore_rng``, its ``"rng"`` states are restored.

    Raises:
        CheckpointError: invalid checkpoint, differing config keys (each one listed), an
            optimizer requested from a checkpoint saved without one, or a state-dict mismatch.
    """
    path = Path(path)
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

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
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

    rank, _ = _rank_world()
    trainer_state = _read_trainer_state(path, rank, int(manifest.get("world_size", 1)))
    if restore_rng and "rng" in trainer_state:
        restore_rng_state(trainer_state["rng"])
    return trainer_state


def load_model_state(
    path: str | Path, *, verify_hashes: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's full (unsharded) state dict on CPU, and the manifest's config.

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
        from kfm.checkpoint.deepspeed import load_model_state_from_deepspeed

        return load_model_state_from_deepspeed(path, verify_hashes=False)  # just verified
    metadata = FileSystemReader(path).read_metadata()
    # planner_data maps DCP's flattened key ("model.layers.0.wq.weight") to its path in the saved
    # nested dict (("model", "layers.0.wq.weight")); dots inside FQNs make the key ambiguous alone.
    paths: dict[str, tuple] = metadata.planner_data or {}
    model_state: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        key_path = paths.get(key) or tuple(key.split(".", 1))
        if key_path[0] != "model":
            continue
        if isinstance(meta, TensorStorageMetadata):
            value: Any = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            value = None  # a pickled object (e.g. a module's _extra_state); DCP replaces it
        node = model_state
        for part in key_path[1:-1]:
            node = node.setdefault(part, {})
        node[key_path[-1]] = value
    if not model_state:
        raise CheckpointError(f"{path / _DCP_METADATA} holds no model state")
    try:
        _dcp_load({"model": model_state}, path, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:
        raise CheckpointError(f"reading the model state of {path} failed: {_short_error(e)}") from e
    return model_state, manifest.get("config", {})
