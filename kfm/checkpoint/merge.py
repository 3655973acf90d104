"""`kfm merge`: the uniform average of a run's last checkpoints (or of their weight EMAs) as a new
kfm checkpoint.

Averaging the weights of the last few checkpoints of a run (Kaddour 2022, "Stop wasting my
time!", LAWA; Sanyal et al. 2023; Li et al. 2023) gives much of the gain of a learning-rate
cooldown at no training cost; the weight EMA (train.ema_decay, kfm/train/ema.py) is the
running version of the same idea. The output is a folder in the layout of `kfm import-hf`::

    OUT/checkpoints/step_000123/   the average, model weights only (DCP + manifest, no optimizer):
                                   step = the newest merged checkpoint's, config and tokenizer
                                   hash copied from it, "merged_from" in the manifest
    OUT/checkpoints/latest
    OUT/kfm_merge.json             what was merged (paths, steps, ema), by which a later
                                   ``overwrite`` recognises the folder

so ``kfm eval OUT``, ``kfm export OUT ...`` and ``--checkpoint.init_from=OUT`` take it like a
training run's checkpoint.

Memory: the checkpoints are streamed one at a time into an fp32 running sum, with no model
object: each process holds the sum plus one checkpoint's tensors (two fp32 model copies; 64 GB
for 8B in one process). Under torchrun every tensor is a DTensor sharded over all ranks
(``Shard(0)``) and DCP reads each rank's slice only: 8B over 8 ranks is 8 GB per rank.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import kfm
from kfm.checkpoint.manager import _flatten, _quiet_dist, _short_error, saved_entries
from kfm.checkpoint.stepdir import (
    MANIFEST,
    CheckpointError,
    PendingSave,
    agree_on_checkpoint,
    list_checkpoints,
    rank_world,
    read_manifest,
    step_of,
)
from kfm.fs import MERGE_FORMAT, MERGE_MARKER, check_output_dir, publish_dir

CHECKPOINTS = "checkpoints"
# Manifest keys that say which data and tokenizer the weights belong to; kfm eval/export and
# init_from read them, so the merged checkpoint keeps them.
_IDENTITY_KEYS = ("tokenizer_hash", "data_fingerprint")


@dataclass
class MergeResult:
    out: Path
    """The output folder."""
    checkpoint: Path
    """Its step dir: OUT/checkpoints/step_N."""
    sources: list[Path]
    """The merged step dirs, oldest first."""
    ema: bool
    """Whether the EMA weights were averaged (else the model weights)."""


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def select_checkpoints(
    run: str | Path, *, last: int | None = None, steps: list[int] | None = None
) -> list[Path]:
    """The step dirs to merge from ``run`` (a run dir or its ``checkpoints/``), oldest first:
    the newest ``last`` complete ones, or those of ``steps``.

    Raises:
        CheckpointError: no checkpoints, ``last`` larger than the number present, a step with
            no complete checkpoint, or neither or both of ``last`` and ``steps``.
    """
    if (last is None) == (steps is None):
        raise CheckpointError("choose the checkpoints to merge with --last K or --steps S1,S2")
    path = Path(run)
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    present = list_checkpoints(root)
    have = ", ".join(str(step_of(p)) for p in present) or "none"
    if not present:
        raise CheckpointError(
            f"no complete checkpoints under {root} (expected step_XXXXXX/ dirs with {MANIFEST}): "
            "pass a run dir or its checkpoints/ dir"
        )
    if last is not None:
        if last < 1:
            raise CheckpointError(f"--last {last} must be >= 1")
        if last > len(present):
            raise CheckpointError(
                f"--last {last} but {root} holds {len(present)} complete checkpoint(s) (steps "
                f"{have}); pass --last {len(present)} or fewer (checkpoint.keep_last keeps "
                "that many during training)"
            )
        return present[-last:]
    assert steps is not None
    by_step = {step_of(p): p for p in present}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise CheckpointError(
            f"--steps {','.join(map(str, steps))}: no complete checkpoint of step(s) "
            f"{', '.join(map(str, missing))} under {root} (steps present: {have})"
        )
    if len(set(steps)) != len(steps):
        raise CheckpointError(f"--steps {','.join(map(str, steps))} names a step twice")
    return [by_step[s] for s in sorted(steps)]


def check_mergeable(paths: list[Path], manifests: list[dict[str, Any]], *, ema: bool) -> None:
    """Refuse checkpoints that cannot be averaged: another model config or tokenizer than the
    first one's, a DeepSpeed checkpoint, or (``ema``) one saved without a weight EMA.

    Raises:
        CheckpointError: naming both paths and the differing key.
    """
    first, ref = paths[0], manifests[0]
    for path, manifest in zip(paths, manifests, strict=True):
        if manifest.get("backend") == "deepspeed":
            raise CheckpointError(
                f"{path} is a DeepSpeed checkpoint: kfm merge reads DCP checkpoints "
                "(parallel.backend=fsdp)"
            )
        if ema and not manifest.get("has_ema", False):
            raise CheckpointError(
                f"{path} holds no weight EMA (trained without --train.ema_decay): merge its "
                "model weights instead (leave out --ema)"
            )
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        a = _flatten(ref.get("config", {}).get("model", {}), "model")
        b = _flatten(manifest.get("config", {}).get("model", {}), "model")
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                raise CheckpointError(
                    f"cannot average {first} ({key}={a.get(key)}) with {path} "
                    f"({key}={b.get(key)}): the model architecture differs"
                )
        if manifest.get("tokenizer_hash") != ref.get("tokenizer_hash"):
            raise CheckpointError(
                f"cannot average {first} (tokenizer_hash={ref.get('tokenizer_hash')}) with {path} "
                f"(tokenizer_hash={manifest.get('tokenizer_hash')}): trained with other tokenizers"
            )


def _tensor_entries(path: Path, entry: str) -> dict[str, TensorStorageMetadata]:
    """{fqn: metadata} of the tensors saved under ``entry`` ("model" or "ema") in ``path``."""
    out: dict[str, TensorStorageMetadata] = {}
    for key_path, meta in saved_entries(path, entry):
        if len(key_path) != 2 or not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(
                f"{path}: {'.'.join(key_path)} is not a tensor of the model; kfm merge averages "
                "tensors only"
            )
        out[key_path[1]] = meta
    if not out:
        raise CheckpointError(f"{path} holds no {entry} state")
    return out


def _empty(meta: TensorStorageMetadata, dtype: torch.dtype, mesh: Any) -> Tensor:
    """A zero tensor of ``meta``'s global shape: whole in one process, this rank's ``Shard(0)``
    slice of a DTensor under torchrun (``Replicate`` for a 0-d tensor)."""
    if mesh is None:
        return torch.zeros(meta.size, dtype=dtype)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    placement = Shard(0) if len(meta.size) > 0 else Replicate()
    return dtensor_zeros(meta.size, dtype=dtype, device_mesh=mesh, placements=[placement])


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def average_checkpoints(paths: list[Path], *, entry: str = "model") -> dict[str, Tensor]:
    """The uniform average of the ``entry`` tensors ("model", or "ema") of ``paths``: an fp32
    running sum, one checkpoint loaded at a time, divided by their number, in the saved dtype.
    Collective under torchrun: every rank gets its ``Shard(0)`` slices (DTensors).

    Raises:
        CheckpointError: a checkpoint whose tensors (names, shapes) differ from the first's, or
            that DCP cannot read.
    """
    metas = _tensor_entries(paths[0], entry)
    mesh = None
    if _dist_on():
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    total = {k: _empty(m, torch.float32, mesh) for k, m in metas.items()}
    buffer = {k: _empty(m, m.properties.dtype, mesh) for k, m in metas.items()}
    for path in paths:
        these = _tensor_entries(path, entry) if path != paths[0] else metas
        shapes = {k: tuple(m.size) for k, m in these.items()}
        want = {k: tuple(m.size) for k, m in metas.items()}
        if shapes != want:
            diff = sorted(k for k in shapes.keys() | want.keys() if shapes.get(k) != want.get(k))
            raise CheckpointError(
                f"cannot average {paths[0]} with {path}: tensor {diff[0]} has shape "
                f"{want.get(diff[0])} vs {shapes.get(diff[0])}"
            )
        try:
            with _quiet_dist():
                dcp.load(
                    {entry: buffer}, storage_reader=FileSystemReader(path), no_dist=mesh is None
                )
        except (Exception, dcp.CheckpointException) as e:
            raise CheckpointError(
                f"reading {entry} state of {path} failed: {_short_error(e)}"
            ) from e
        for key, t in buffer.items():
            _local(total[key]).add_(_local(t).float())
    for key, t in total.items():
        _local(t).div_(len(paths))
        if metas[key].properties.dtype != torch.float32:
            total[key] = t.to(metas[key].properties.dtype)
    return total


def merge_checkpoints(
    paths: list[Path], out_dir: str | Path, *, ema: bool = False, overwrite: bool = False
) -> MergeResult:
    """Average the model weights (``ema``: the weight EMAs) of the step dirs ``paths`` into the
    folder ``out_dir`` (layout in the module docstring), built in ``OUT.tmp-<pid>`` and renamed
    into place. Every listed checkpoint is validated first (sha256, spread over the ranks
    under torchrun), then checked by `check_mergeable`. Collective under torchrun; the folder
    must be on a file system every rank sees.

    Raises:
        CheckpointError: an invalid checkpoint, or ones that cannot be averaged (named).
        OutputError: ``out_dir`` is not new or empty and not an earlier merge with ``overwrite``,
            or is, contains or lies inside one of the checkpoints, a checkpoint or a run.
    """
    if not paths:
        raise CheckpointError("no checkpoints to merge")
    paths = [Path(p) for p in paths]
    out = check_output_dir(out_dir, "merge", inputs=paths, overwrite=overwrite, flag="--out")
    for path in paths:
        # Each rank hashes its share of every file; all ranks fail together.
        if agree_on_checkpoint([path], verify_hashes=True) is None:
            raise CheckpointError(f"checkpoint {path} failed validation (see the warning above)")
    manifests = [read_manifest(p) for p in paths]
    check_mergeable(paths, manifests, ema=ema)
    newest_manifest = manifests[-1]
    step = int(newest_manifest["step"])
    averaged = average_checkpoints(paths, entry="ema" if ema else "model")

    rank, _ = rank_world()
    tmp = out.parent / _broadcast(f"{out.name}.tmp-{os.getpid()}")
    merged_from = {
        "checkpoints": [str(p.resolve()) for p in paths],
        "steps": [int(m["step"]) for m in manifests],
        "weights": "ema" if ema else "model",
    }
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        pending = PendingSave.begin(tmp / CHECKPOINTS, step)
        try:
            with _quiet_dist():
                dcp.save(
                    {"model": averaged},
                    storage_writer=FileSystemWriter(pending.tmp, sync_files=True),
                    no_dist=not _dist_on(),
                )
            pending.write_trainer_state({"step": step, "merged_from": merged_from})
            extra = {k: newest_manifest[k] for k in _IDENTITY_KEYS if k in newest_manifest}
            final = pending.finalize(
                config=newest_manifest.get("config", {}),
                keep_last=0,
                manifest_extra={**extra, "has_optimizer": False, "merged_from": merged_from},
            )
        except BaseException:
            pending.abort()
            raise
        problem = None
        if rank == 0:
            try:
                marker = {
                    "format": MERGE_FORMAT,
                    "version": 1,
                    "created_by": f"kfm {kfm.__version__}",
                    **merged_from,
                }
                (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                publish_dir(tmp, out, overwrite=overwrite)
            except Exception as e:  # the other ranks raise it too instead of waiting
                problem = f"{type(e).__name__}: {e}"
        problem = _broadcast(problem)
        if problem is not None:
            raise CheckpointError(f"writing {out} failed: {problem}")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out=out, checkpoint=out / CHECKPOINTS / final.name, sources=paths, ema=ema)
