"""The pipeline's inputs -> `ReadUnit`s: which files an ``inputs[]`` entry names, and their ids.

Reading itself (formats, compression, per-record rejections) is `kfm.data.readers`, the stack
``kfm pack`` uses too; this module adds what only the pipeline has: ``inputs.paths`` lists of
files, folders and globs, ``inputs.format``, and record-id keys that stay unique over them.
Shipped sets are resolved by `data_pipeline.steps.read` with `data_pipeline.shipped`.

Record ids come from the record's id field, else ``<file key>:<line or row>`` where the file key is
the file's path relative to the input's root without its suffix (just the file's stem for an input
that names one file), so ids stay unique when an input spans several folders.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

from kfm.data.readers import FORMATS, ReaderError, ReadUnit, UnitKind, file_kind, is_hf_saved

__all__ = ["Format", "resolve_units"]

Format = Literal["auto", "jsonl", "parquet", "text", "hf_disk"]
_GLOB_CHARS = set("*?[")


def _strip_suffix(rel: str, kind: str) -> str:
    low = rel.lower()
    for s in sorted(FORMATS.get(kind, ()), key=len, reverse=True):
        if low.endswith(s):
            return rel[: -len(s)]
    return rel


def _absolute(path: str | Path) -> Path:
    # Not resolve(): a symlinked file must keep its place under the input's folder (its id key).
    return Path(os.path.abspath(path))


def _expand(spec: str, fmt: Format, input_name: str) -> tuple[Path, list[tuple[Path, UnitKind]]]:
    """(root, [(path, kind)]) of one `paths` entry; root is what the id keys are relative to."""
    where = f"input {input_name!r}: path {spec!r}"
    if _GLOB_CHARS & set(spec):
        matches = sorted(_absolute(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise ReaderError(f"{where} matches no file; fix inputs.paths")
        static = Path(spec).parts
        cut = next(i for i, part in enumerate(static) if _GLOB_CHARS & set(part))
        root = _absolute(Path(*static[:cut])) if cut else Path.cwd()
        found: list[tuple[Path, UnitKind]] = []
        for m in matches:
            kind = "hf_disk" if fmt in ("auto", "hf_disk") and is_hf_saved(m) else file_kind(m, fmt)
            if kind is not None and (m.is_file() or kind == "hf_disk"):
                found.append((m, kind))
        if not found:
            raise ReaderError(f"{where} matches no readable {_what(fmt)} file; fix inputs.paths")
        return root, found
    p = _absolute(spec)
    if not p.exists():
        raise ReaderError(f"{where}: {p} does not exist; fix inputs.paths")
    if p.is_dir():
        if fmt == "hf_disk" or (fmt == "auto" and is_hf_saved(p)):
            return p.parent, [(p, "hf_disk")]
        found = []
        for f in sorted(p.rglob("*")):
            kind = file_kind(f, fmt) if f.is_file() else None
            if kind is not None:
                found.append((f, kind))
        if not found:
            raise ReaderError(f"{where}: folder {p} holds no {_what(fmt)} file; fix inputs.paths")
        return p, found
    kind = file_kind(p, fmt)
    if kind is None or fmt == "hf_disk":
        raise ReaderError(
            f"{where}: {p.name} is not a {_what(fmt)} file; set inputs.format for this input"
        )
    return p.parent, [(p, kind)]


def _what(fmt: Format) -> str:
    if fmt == "hf_disk":
        return "save_to_disk dataset"
    kinds = FORMATS if fmt == "auto" else {fmt: FORMATS[fmt]}
    return "/".join(s for suffixes in kinds.values() for s in suffixes)


def resolve_units(paths: list[str], fmt: Format, *, input_name: str) -> list[ReadUnit]:
    """The units of a generic input, in a fixed order: `paths` in order, files sorted within.

    Relative paths are resolved against the current directory. A file listed twice is read once.

    Raises:
        ReaderError: a path does not exist or matches nothing readable, or two files would give
            records the same id (e.g. ``x.jsonl`` next to ``x.jsonl.gz``).
    """
    expanded = [_expand(spec, fmt, input_name) for spec in paths]
    root = Path(os.path.commonpath([r for r, _ in expanded])) if len(expanded) > 1 else None
    units: list[ReadUnit] = []
    seen_paths: set[Path] = set()
    keys: dict[str, Path] = {}
    for own_root, found in expanded:
        for path, kind in found:
            if path in seen_paths:
                continue
            seen_paths.add(path)
            rel = path.relative_to(root or own_root).as_posix()
            key = _strip_suffix(rel, kind)
            if key in keys:
                raise ReaderError(
                    f"input {input_name!r}: {keys[key]} and {path} would give records the same "
                    f"ids ({key}:<line>); keep one of them in inputs.paths"
                )
            keys[key] = path
            units.append(ReadUnit(kind=kind, path=path, key=key))
    return units
