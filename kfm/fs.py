"""Durable, atomic file-system writes shared by every writer in kfm (shards, tokenizer,
checkpoints, exports, run directory).

The rule: a reader sees the old state or the complete new one, never a mix. Files are written
under a temporary name, fsynced, then renamed; directories are built under a temporary name and
renamed into place; the parent directory is fsynced after a rename, since the rename lives in
the directory's entries.

Where a writer may write (``check_output_dir``): ``--overwrite`` replaces only an output of the same
kind that kfm made, recognised by what kfm leaves in it, and never a path that is, contains or
lies inside one of the writer's inputs, a checkpoint or a training run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

_HASH_CHUNK = 8 << 20  # 8 MiB reads: sha256 runs ~1 GB/s per core, so a 10 GB file is ~10 s


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so renames and new entries in it survive a crash.

    Some file systems refuse fsync on a directory; that is not an error worth failing a run for.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every regular file below ``path`` and every directory, deepest first."""
    root = Path(path)
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, os.replace.

    A symlink is followed (its target is replaced, the link stays). A path that exists and is
    not a regular file (a device such as /dev/stdout or /dev/full, a pipe) is written in place:
    renaming over it would replace the device with a file. Errors name ``path``, not the temp file.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as f:
            f.write(data)
        return
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def publish_dir(tmp: str | Path, out: str | Path, *, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``out`` (same file system), durably.

    An existing ``out`` is replaced only with ``overwrite`` (an empty directory always): it is
    moved aside first, removed after the rename succeeds, and put back if the rename fails. Which
    ``out`` a writer may replace is decided before it starts, by :func:`check_output_dir`.

    Raises:
        FileExistsError: ``out`` exists, is not an empty directory, and ``overwrite`` is False.
    """
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    backup = None
    if out.exists() or out.is_symlink():
        if not overwrite and not _is_empty_dir(out):
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    fsync_dir(out.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


# ---- which directories a writer may replace -------------------------------------------------

OutputKind = Literal[
    "shard set", "tokenizer", "export", "data run", "report", "import", "release", "merge"
]

# The files by which kfm recognises its own outputs and the directories it protects. They are
# the writers' own names (kfm.data.shards, kfm.tokenizer.core, kfm.export.hf, kfm.checkpoint,
# data_pipeline.card); those modules import this one, so tests/test_overwrite.py pins the copies.
MANIFEST = "manifest.json"
SHARDS_FORMAT = "kfm-shards"
CHECKPOINT_FORMAT = "kfm-checkpoint"
TOKENIZER_MARKER = "kfm_tokenizer.json"
EXPORT_MARKER = "kfm_export.json"
EXPORT_FORMAT = "kfm-export"
IMPORT_MARKER = "kfm_import.json"
IMPORT_FORMAT = "kfm-import"
MERGE_MARKER = "kfm_merge.json"
MERGE_FORMAT = "kfm-merge"
RELEASE_MARKER = "kfm_release.json"
RELEASE_FORMAT = "kfm-release"
DATA_RUN_MARKER = "pipeline.yaml"
REPORT_MARKER = "kfm_report.json"
RUN_CONFIG = "config.yaml"
RUN_STATUS = "status.json"
CHECKPOINTS = "checkpoints"

_RECOGNISED_BY: dict[str, str] = {
    "shard set": f"{MANIFEST} with format {SHARDS_FORMAT!r}",
    "tokenizer": f"{TOKENIZER_MARKER} beside tokenizer.json",
    "export": f"{EXPORT_MARKER}",
    "data run": f"{DATA_RUN_MARKER}",
    "report": f"{REPORT_MARKER}",
    "import": f"{IMPORT_MARKER}",
    "merge": f"{MERGE_MARKER}",
    "release": f"{RELEASE_MARKER}",
}


class OutputError(ValueError):
    """kfm refuses to write an output at a path; the message names the path, why, and the fix."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_format(folder: Path) -> Any:
    manifest = _read_json(folder / MANIFEST)
    return manifest.get("format") if isinstance(manifest, dict) else None


def _is_legacy_export(folder: Path) -> bool:
    """An export written before kfm_export.json existed: HF files plus kfm's model card."""
    card = folder / "README.md"
    if not ((folder / "config.json").is_file() and card.is_file()):
        return False
    try:
        head = card.read_text(encoding="utf-8")[:2000]
    except (OSError, UnicodeDecodeError):
        return False
    return "tags: [kfm," in head and "trained with kfm and exported" in head


def _is_data_run(folder: Path) -> bool:
    import yaml

    try:
        config = yaml.safe_load((folder / DATA_RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and "inputs" in config and "output_dir" in config


def output_kind(path: str | Path) -> OutputKind | None:
    """The kind of kfm output the directory ``path`` holds, by its marker; None if none.

    shard set: ``manifest.json`` of format "kfm-shards"; tokenizer: ``kfm_tokenizer.json`` beside
    ``tokenizer.json``; export: ``kfm_export.json`` (or, for exports made before it existed,
    config.json with kfm's model card); data run: ``pipeline.yaml`` of a `kfm data run`; report:
    ``kfm_report.json`` of a `kfm report`; import: ``kfm_import.json`` of a `kfm import-hf`;
    release: ``kfm_release.json`` of a `kfm release`; merge: ``kfm_merge.json`` of a `kfm merge`.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    if _manifest_format(folder) == SHARDS_FORMAT:
        return "shard set"
    marker = _read_json(folder / RELEASE_MARKER)
    if isinstance(marker, dict) and marker.get("format") == RELEASE_FORMAT:
        return "release"
    marker = _read_json(folder / EXPORT_MARKER)
    if (isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT) or _is_legacy_export(
        folder
    ):
        return "export"
    if (
        isinstance(_read_json(folder / TOKENIZER_MARKER), dict)
        and (folder / "tokenizer.json").is_file()
    ):
        return "tokenizer"
    if _is_data_run(folder):
        return "data run"
    if isinstance(_read_json(folder / REPORT_MARKER), dict):
        return "report"
    marker = _read_json(folder / IMPORT_MARKER)
    if isinstance(marker, dict) and marker.get("format") == IMPORT_FORMAT:
        return "import"
    marker = _read_json(folder / MERGE_MARKER)
    if isinstance(marker, dict) and marker.get("format") == MERGE_FORMAT:
        return "merge"
    return None


def _is_run_dir(folder: Path) -> bool:
    return (folder / RUN_STATUS).is_file() or (
        (folder / RUN_CONFIG).is_file() and (folder / CHECKPOINTS).is_dir()
    )


def _protected(folder: Path) -> str | None:
    """What ``folder`` is if kfm must never replace it: a checkpoint or a training run dir."""
    if _manifest_format(folder) == CHECKPOINT_FORMAT:
        return "a checkpoint directory"
    if _is_run_dir(folder):
        return "a training run directory"
    if folder.name == CHECKPOINTS and _is_run_dir(folder.parent):
        return "the checkpoints folder of a training run"
    return None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "lies inside"
    return None


def _input_paths(inputs: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(as given, path) for each local input, both as written (absolute) and with symlinks
    resolved: deleting ``out`` must touch neither."""
    found = []
    for given in inputs:
        if str(given).startswith("hf://"):
            continue  # a Hugging Face dataset name, not a path
        absolute = Path(os.path.abspath(given))
        found += [(str(given), absolute), (str(given), absolute.resolve())]
    return found


def check_output_dir(
    out: str | Path,
    kind: OutputKind,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool,
    flag: str = "output path",
) -> Path:
    """Check that a writer of ``kind`` may write (or with ``overwrite`` replace) ``out``.

    Call before any work; the writer then builds its output beside ``out`` and swaps it in with
    :func:`publish_dir`, so an earlier output is removed only once the new one is complete.

    Allowed: a new path, an empty directory, or (with ``overwrite``) a directory holding a kfm
    output of the same ``kind`` (see :func:`output_kind`). Never, with or without ``overwrite``: a
    path that is, contains or lies inside one of ``inputs``; one that is, contains or lies inside
    a checkpoint directory (a kfm checkpoint manifest) or a run's ``checkpoints/``; one that is or
    contains a training run directory (config.yaml + checkpoints/, or status.json; a folder
    inside a run, such as ``RUN/export/hf``, is fine). Symlinks are resolved before comparing.

    Args:
        inputs: the paths the writer reads (files or folders; ``hf://`` names are skipped).
        flag: the option that sets ``out``, named in the fix (e.g. "--out").

    Returns:
        ``out`` with symlinks resolved: the directory to write, and to build the new output beside.

    Raises:
        OutputError: naming ``out``, the reason, and the fix.
    """
    absolute = Path(os.path.abspath(out))
    target = absolute.resolve()
    where = f"{out}" if target == absolute else f"{out} (-> {target})"
    fix = f"choose another {flag}"

    if what := _protected(target):
        raise OutputError(
            f"{where} is {what}; kfm never writes {_a(kind)} over it (--overwrite included); {fix}"
        )
    for parent in target.parents:
        if (what := _protected(parent)) and what != "a training run directory":
            raise OutputError(
                f"{where} lies inside {what} ({parent}); kfm never writes {_a(kind)} there; {fix}"
            )
    # After the run and checkpoint checks, whose reasons are the more specific ones.
    for given, path in _input_paths(inputs):
        if relation := _relation(target, path):
            raise OutputError(
                f"{where} {relation} the input {given}: writing the {kind} there would delete or "
                f"mix with what it reads; {fix}, outside the inputs"
            )

    if target.exists() and not target.is_dir():
        raise OutputError(f"{where} exists and is not a directory; {fix}")
    if not target.is_dir() or _is_empty_dir(target):
        return target
    found = output_kind(target)
    if found != kind:
        is_what = (
            f"holds a kfm {found}, not {_a(kind)}"
            if found
            else f"is not {_a(kind)} made by kfm (it has no {_RECOGNISED_BY[kind]})"
        )
        raise OutputError(
            f"{where} exists and {is_what}; --overwrite replaces only {_a(kind)} kfm made, so "
            f"kfm will not delete it: {fix}, or empty or move that folder yourself"
        )
    # A kfm output of the right kind: still never one that holds a run or checkpoint, or an
    # input (checked above by path), since replacing it deletes everything below it.
    for dirpath, _, _ in os.walk(target):
        if kind in ("import", "merge") and Path(dirpath).is_relative_to(target / CHECKPOINTS):
            # an import's or merge's own checkpoint (kfm import-hf, kfm merge) is part of what
            # it replaces
            continue
        if what := _protected(Path(dirpath)):
            raise OutputError(f"{where} contains {what} ({dirpath}); kfm never deletes it; {fix}")
    if not overwrite:
        raise OutputError(
            f"{where} already holds a kfm {kind}; pass --overwrite to replace it (the old one is "
            f"removed only once the new one is complete), or {fix}"
        )
    return target
