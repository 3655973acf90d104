"""The checkpoint directory protocol shared by every backend: atomic step dirs, per-rank integrity.

Layout under ``runs/<name>/checkpoints/`` (see README.md in this folder)::

    step_000123/              the backend's files + trainer_state_rank{r}.pt + manifest.json (last)
    latest -> step_000123     relative symlink, replaced atomically after the step dir is final
    step_000200.tmp-<pid>/    an interrupted save: never loaded, deleted by a later save

A save (`PendingSave`) goes: `begin` (rank 0 makes ``step_N.tmp-<pid>``, every rank learns its
name) -> the backend writes its files into it (DCP, DeepSpeed) and each rank its trainer state ->
`finalize`: every rank hashes the files *it* wrote (a few, in parallel with the other ranks),
rank 0 gathers the hashes, writes ``manifest.json`` last, renames the dir into place, moves
``latest`` and prunes. No rank reads the whole checkpoint: at 256 ranks an 8B model with AdamW
(~96 GB) is ~0.4 GB per rank to hash instead of 96 GB on rank 0.

Resume checks are spread the same way (`validate_checkpoint` with ``rank``/``world_size``): every
rank checks the manifest and the sizes it needs, and hashes the files whose writer rank maps to
it, so each file is hashed once, by one rank.

Collectives take ``group`` (None: the default group); with no process group at all everything
runs in this one process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kfm.checkpoint._fs import (
    files_under,
    fsync_dir,
    pid_alive,
    remove_tree,
    sha256_file,
    write_bytes_durable,
)
from kfm.checkpoint.rng import capture_rng_state

log = logging.getLogger(__name__)

FORMAT = "kfm-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
DCP_METADATA = ".metadata"  # DCP's index of every tensor and byte blob; written last by DCP
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Leftovers of a save (or of a replace/prune) that did not finish: "<final>.tmp-<pid>[-old]".
_TMP_ENTRY = re.compile(r"^(?:step_\d+|latest)\.tmp-(\d+)(?:-old)?$")
# The rank that writes a file, from its name: DCP "__3_0.distcp", ours "trainer_state_rank3.pt",
# DeepSpeed "zero_pp_rank_3_mp_rank_00_optim_states.pt". Anything else (DCP's .metadata,
# DeepSpeed's mp_rank_00_model_states.pt) is written by rank 0.
_WRITER = (
    re.compile(r"^__(\d+)_\d+\.distcp$"),
    re.compile(r"^trainer_state_rank(\d+)\.pt$"),
    re.compile(r"^zero_pp_rank_(\d+)_"),
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run's config."""


# -- names ---------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps, e.g. ``step_000123``."""
    return f"step_{step:06d}"


def trainer_state_name(rank: int) -> str:
    """This rank's trainer-state file (step, scheduler, loader position, RNG states)."""
    return f"trainer_state_rank{rank}.pt"


def step_of(path: Path) -> int | None:
    """N of a ``step_N`` directory name, else None."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a ``*.tmp-<pid>`` leftover of an unfinished save, replace or prune."""
    return _TMP_ENTRY.match(path.name) is not None


def writer_rank(relative_path: str) -> int:
    """The rank that writes the checkpoint file ``relative_path`` (see _WRITER)."""
    name = Path(relative_path).name
    for pattern in _WRITER:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return 0


# -- process-group helpers -----------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world(group: Any = None) -> tuple[int, int]:
    """(rank, size) in ``group`` (default group), or (0, 1) without a process group."""
    if not _dist_on():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _broadcast(obj: Any, group: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


def _gather(obj: Any, group: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 of ``group`` (None elsewhere)."""
    if not _dist_on():
        return [obj]
    rank, size = rank_world(group)
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, group_dst=0, group=group)
    return out


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` on every rank (pickled: small things only)."""
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * rank_world(group)[1]
    dist.all_gather_object(out, obj, group=group)
    return out


# -- saving --------------------------------------------------------------------------------------


def _hash_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for rel in names:
        path = root / rel
        out[rel] = {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
            "rank": writer_rank(rel),
        }
    return out


@dataclass
class PendingSave:
    """One save in progress: the ``.tmp-<pid>`` dir every rank writes into, then `finalize`."""

    root: Path
    step: int
    tmp: Path
    group: Any = None

    @property
    def final(self) -> Path:
        return self.root / step_dir_name(self.step)

    @classmethod
    def begin(cls, root: str | Path, step: int, *, group: Any = None) -> PendingSave:
        """Make ``root/step_N.tmp-<pid of rank 0>/`` (collective: every rank of ``group``).

        Raises:
            ValueError: negative ``step``.
        """
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        root = Path(root)
        rank, _ = rank_world(group)
        name = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            name = f"{step_dir_name(step)}.tmp-{os.getpid()}"
            remove_tree(root / name)  # a failed earlier attempt of this same process
            (root / name).mkdir()
        # Other ranks' pids differ; everyone writes into rank 0's directory (shared file system).
        name = _broadcast(name, group)
        return cls(root=root, step=step, tmp=root / name, group=group)

    def write_trainer_state(self, trainer_state: dict[str, Any]) -> None:
        """This rank's ``trainer_state_rank{r}.pt`` (fsynced), with ``step`` and the RNG states
        of python/numpy/torch(/cuda) added unless present. It is torch.save'd: anything
        picklable (scheduler and loader state) may go in."""
        rank, _ = rank_world(self.group)
        extra = dict(trainer_state)
        extra.setdefault("step", self.step)
        extra.setdefault("rng", capture_rng_state())
        with open(self.tmp / trainer_state_name(rank), "wb") as f:
            torch.save(extra, f)
            f.flush()
            os.fsync(f.fileno())

    def fsync_own_files(self) -> None:
        """fsync the files this rank wrote (for writers that do not, like DeepSpeed's)."""
        rank, world_size = rank_world(self.group)
        for path in files_under(self.tmp):
            if writer_rank(path.name) % world_size == rank:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

    def finalize(
        self,
        *,
        config: dict[str, Any],
        keep_last: int,
        manifest_extra: dict[str, Any] | None = None,
    ) -> Path:
        """Hash, manifest, rename, ``latest``, prune (collective: every rank of the group).

        Each rank hashes the files `writer_rank` attributes to it; rank 0 gathers them, writes
        ``manifest.json`` last, fsyncs, renames the dir to ``step_N`` (an existing ``step_N`` is
        renamed aside first, then deleted), replaces ``latest`` and keeps the ``keep_last``
        newest checkpoints (0 keeps all). Every rank returns rank 0's outcome: the final dir, or
        the same CheckpointError.

        Raises:
            CheckpointError: ``config`` is not JSON-serialisable, or rank 0 could not finish.
        """
        rank, world_size = rank_world(self.group)
        error: str | None = None
        try:
            config_json = json.loads(json.dumps(config))
        except (TypeError, ValueError) as e:
            error = f"config for checkpoint step {self.step} is not JSON-serialisable ({e})"
        if _dist_on():
            dist.barrier(group=self.group)  # every rank's files are complete before any listing
        mine = [
            p.relative_to(self.tmp).as_posix()
            for p in files_under(self.tmp)
            if writer_rank(p.name) % world_size == rank
        ]
        hashes = _gather(_hash_files(self.tmp, mine), self.group)
        if rank == 0 and error is None:
            assert hashes is not None
            try:
                files: dict[str, Any] = {}
                for part in hashes:
                    files.update(part)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "step": self.step,
                    "world_size": world_size,
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "torch_version": torch.__version__,
                    **(manifest_extra or {}),
                    "config": config_json,
                    "files": dict(sorted(files.items())),
                }
                write_bytes_durable(self.tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
                fsync_dir(self.tmp)
                _move_into_place(self.tmp, self.final)
                point_latest(self.root, self.final.name)
                prune(self.root, keep_last=keep_last, keep=self.final)
            except Exception as e:
                error = f"finishing checkpoint {self.final} failed: {type(e).__name__}: {e}"
        error = _broadcast(error, self.group)
        if error is not None:
            self.abort()
            raise CheckpointError(error)
        return self.final

    def abort(self) -> None:
        """Best effort: remove the tmp dir (rank 0); a later save removes it otherwise."""
        if rank_world(self.group)[0] == 0 and self.tmp.exists():
            remove_tree(self.tmp)


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


def point_latest(root: Path, name: str) -> None:
    """Replace the ``root/latest`` symlink with one to ``name`` (atomic on POSIX).

    Raises:
        CheckpointError: ``root/latest`` exists and is not a symlink.
    """
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"{link} exists and is not a symlink; move it away so checkpoints can update it"
        )
    tmp_link = root / f"{LATEST}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(name, tmp_link)  # relative: the run directory can be moved or copied
    os.replace(tmp_link, link)  # readers see the old or the new target
    fsync_dir(root)


def prune(root: Path, *, keep_last: int, keep: Path) -> None:
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


# -- finding and validating ----------------------------------------------------------------------


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory under root (complete or not), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(dirs, key=lambda p: step_of(p) or 0)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint dirs under ``root`` (``step_N`` with a manifest), oldest first by step.

    Complete is not valid: use `validate_checkpoint` or `find_latest_valid` to check contents.
    A missing ``root`` gives an empty list.
    """
    return [p for p in _step_dirs(Path(root)) if (p / MANIFEST).is_file()]


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of step dir ``path`` (format, version, step, files table).

    Raises:
        CheckpointError: naming what is wrong.
    """
    if is_leftover(path):
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
    step = step_of(path.resolve())
    if step is not None and manifest.get("step") != step:
        raise CheckpointError(
            f"{manifest_path} says step {manifest.get('step')} but the directory is step {step}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path} has no 'files' table")
    # DeepSpeed checkpoints list their own required files (kfm.train.backends.deepspeed).
    for required in manifest.get("required_files", (DCP_METADATA, trainer_state_name(0))):
        if required not in files:
            raise CheckpointError(f"{manifest_path} does not list {required}: incomplete save")
    return manifest


def validate_checkpoint(
    path: str | Path, *, verify_hashes: bool = True, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Check a checkpoint dir against its manifest and return the manifest.

    Checks: the dir is not a ``*.tmp-*`` leftover; ``manifest.json`` exists, parses and has our
    format and version; its step matches the dir name; the required files are listed; every
    listed file exists with the listed size. With ``verify_hashes`` the sha256 of the files this
    rank is responsible for (writer rank mod ``world_size`` == ``rank``; all of them with the
    defaults) is checked too, ~1 s per GB read.

    Raises:
        CheckpointError: naming the first bad file and what is wrong with it.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for rel, expected in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {path / MANIFEST} but missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{file} has {size} bytes but the manifest says {expected['size']}: "
                "truncated or overwritten"
            )
        mine = int(expected.get("rank", 0)) % world_size == rank
        if verify_hashes and mine and sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {path / MANIFEST}: corrupt")
    return manifest


def find_latest_valid(root: str | Path, *, verify_hashes: bool = True) -> Path | None:
    """The newest ``step_N`` dir under ``root`` that passes `validate_checkpoint`, or None.

    One process checks everything; `agree_on_checkpoint` spreads the hashing over ranks.
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


def agree_on_checkpoint(
    candidates: list[Path], *, verify_hashes: bool, group: Any = None
) -> Path | None:
    """The first of ``candidates`` (newest first) that every rank finds valid, or None.

    Collective: every rank passes the same list. Each rank checks the manifest and sizes and,
    with ``verify_hashes``, the sha256 of its share of the files (`validate_checkpoint` with its
    rank), so the hashing is spread over the ranks; the verdicts are combined with one
    all-gather per candidate. Invalid candidates are skipped with a warning naming the problem.
    """
    rank, world_size = rank_world(group)
    for path in candidates:
        try:
            validate_checkpoint(path, verify_hashes=verify_hashes, rank=rank, world_size=world_size)
            problem = None
        except CheckpointError as e:
            problem = str(e)
        problems = [p for p in all_gather(problem, group) if p is not None]
        if not problems:
            return path
        if rank == 0:
            log.warning("skipping invalid checkpoint %s: %s", path, "; ".join(problems))
    return None


def resume_candidates(root: str | Path) -> list[Path]:
    """The ``step_N`` dirs under ``root``, newest first (every one a candidate for resume)."""
    return list(reversed(_step_dirs(Path(root))))


def resolve_checkpoint_arg(arg: str | Path) -> Path:
    """Turn a user's checkpoint argument into one step dir.

    Accepts a step dir (or the ``latest`` symlink), a ``checkpoints/`` dir, or a run dir holding
    ``checkpoints/``; the latter two give their newest valid checkpoint. The returned dir is not
    re-validated here if it was named directly (loading validates).

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
    if step_of(path) is not None or is_leftover(path):
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


def read_trainer_state(path: Path, rank: int, saved_world_size: int) -> dict[str, Any]:
    """This rank's trainer state from step dir ``path`` (rank 0's when resuming on more ranks
    than saved it, with a warning: per-rank loader/RNG state cannot be split generically).

    It is ``torch.load(weights_only=False)``: it unpickles, so load only checkpoints you trust.
    """
    file = path / trainer_state_name(rank)
    if not file.is_file():
        log.warning(
            "%s missing (saved with world_size=%d): using rank 0's trainer state",
            file,
            saved_world_size,
        )
        file = path / trainer_state_name(0)
    return torch.load(file, map_location="cpu", weights_only=False)
