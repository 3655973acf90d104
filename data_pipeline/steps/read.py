"""KfmReader: the pipeline's first step, turning the configured inputs into datatrove Documents.

Reading itself is `kfm.data.readers` (generic formats, the stack ``kfm pack`` uses too) and
`data_pipeline.shipped` (the shared data sets); this step resolves inputs
(`data_pipeline.readers`), splits the files over tasks, builds the documents and counts every
record it does not forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from data_pipeline.readers import resolve_units
from data_pipeline.shipped import EVAL_FOLDERS, UNKNOWN_LICENSE, get_shipped_set
from data_pipeline.steps import require_datatrove
from eval.registry import data_root
from kfm.data.readers import ReaderError, ReadUnit, Record, Rejection, iter_unit, text_problem

try:
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep
    from datatrove.utils.logging import logger
    from datatrove.utils.typeshelper import StatHints

    _DATATROVE_MISSING: ImportError | None = None
except ImportError as exc:  # the reading logic stays usable without datatrove
    PipelineStep = object
    _DATATROVE_MISSING = exc

if TYPE_CHECKING:
    from datatrove.data import DocumentsPipeline

WARN_PER_UNIT = 5
"""Rejections logged with file and line per unit; the rest are only counted."""
RESERVED_KEYS = ("source", "language", "language_score")
"""Metadata keys the pipeline owns; a record field of that name is kept as record_<key>."""
_NAME = re.compile(r"[a-z0-9_]+")
_LANGUAGE = re.compile(r"[a-z]{2,3}")


@dataclass(kw_only=True, slots=True)
class InputConfig:
    """One input source of the pipeline."""

    name: str
    """Short name, [a-z0-9_]+: becomes metadata["source"] and the prefix of every document id."""
    format: Literal["auto", "jsonl", "parquet", "text", "hf_disk", "shipped"] = "auto"
    """How to read paths; "auto" goes by file ending (.jsonl[.gz|.zst], .parquet, .txt/.md) and
    recognises save_to_disk folders; "shipped" uses a shared-data adapter (see shipped)."""
    paths: list[str] = field(default_factory=list)
    """Files, folders (read recursively) or globs, relative to the current directory; for
    "shipped", the set's folder (empty: <shared data root>/<shipped>)."""
    shipped: str | None = None
    """Shipped-set adapter (data_pipeline.shipped.SHIPPED_SETS); None: the folder's name."""
    license: str | None = None
    """License of every document of this input; None: each record's own, else the adapter's,
    else "unknown"."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet, datasets) holding the text."""
    id_field: str = "id"
    """Field holding the record id; records without one get <file>:<line or row>."""
    language: str | None = None
    """ISO code known for the whole input: sets metadata language (score 1.0) as a hint for
    language ID; None: unknown (shipped sets give their own)."""
    limit: int = -1
    """Most documents forwarded from this input per task (CI slices); -1 means all."""
    max_doc_bytes: int = 1_000_000
    """Documents with more UTF-8 bytes are dropped as too_large; 0 disables the check."""
    weight: float = 1.0
    """Mixture weight used when packing (relative to the other inputs); carried, not used here."""

    def __post_init__(self) -> None:
        who = f"(input {self.name!r})"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"inputs.name={self.name!r} must be lowercase letters, digits and '_' "
                "(it prefixes document ids and becomes metadata source)"
            )
        formats = ("auto", "jsonl", "parquet", "text", "hf_disk", "shipped")
        if self.format not in formats:
            raise ValueError(f"inputs.format={self.format!r} {who} must be one of {formats}")
        self.paths = [str(p) for p in self.paths]
        if self.shipped is not None and self.format == "auto":
            self.format = "shipped"
        if self.format == "shipped":
            if len(self.paths) > 1:
                raise ValueError(
                    f"inputs.paths {who}: a shipped set reads one folder, got {len(self.paths)}; "
                    "use one input per shipped set"
                )
            folder = Path(self.paths[0]).name if self.paths else None
            try:
                self.shipped = get_shipped_set(self.shipped or folder or self.name).name
            except ValueError as e:
                raise ValueError(f"inputs.shipped {who}: {e}") from None
        elif self.shipped is not None:
            raise ValueError(
                f"inputs.shipped={self.shipped!r} {who} needs inputs.format 'shipped' "
                f"(got {self.format!r}); drop shipped or set format: shipped"
            )
        elif not self.paths:
            raise ValueError(f"inputs.paths {who} is empty; list the files, folders or globs")
        if self.license is not None and not self.license.strip():
            raise ValueError(f"inputs.license {who} is blank; set a license or leave it unset")
        for key in ("text_field", "id_field"):
            if not getattr(self, key):
                raise ValueError(f"inputs.{key} {who} is empty; name the record field to use")
        if self.language is not None and not _LANGUAGE.fullmatch(self.language):
            raise ValueError(
                f"inputs.language={self.language!r} {who} must be a lowercase ISO 639 code "
                "such as 'ko' or 'en'"
            )
        if self.limit < -1:
            raise ValueError(f"inputs.limit={self.limit} {who} must be -1 (all) or >= 0")
        if self.max_doc_bytes < 0:
            raise ValueError(f"inputs.max_doc_bytes={self.max_doc_bytes} {who} must be >= 0")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"inputs.weight={self.weight} {who} must be a finite number >= 0")


def _shipped_units(cfg: InputConfig) -> list[ReadUnit]:
    adapter = get_shipped_set(cfg.shipped or cfg.name)
    folder = Path(cfg.paths[0]).resolve() if cfg.paths else data_root() / adapter.name
    for rel in adapter.files:
        if not (folder / rel).is_file():
            raise ReaderError(
                f"input {cfg.name!r}: {folder / rel} not found (shipped set {adapter.name}); "
                "fix inputs.paths or set KFM_SHARED_DATA"
            )
    return [ReadUnit(kind="shipped", path=folder, key=part) for part in adapter.parts]


def _refuse_eval_paths(cfg: InputConfig, units: list[ReadUnit]) -> None:
    try:
        root = data_root().resolve()
    except FileNotFoundError:  # no shared data here: nothing to guard
        return
    for unit in units:
        path = unit.path.resolve()  # symlinks into an eval folder are refused too
        rel = path.relative_to(root).parts if path.is_relative_to(root) else ()
        if rel and rel[0] in EVAL_FOLDERS:
            raise ValueError(
                f"inputs.paths (input {cfg.name!r}): {unit.path} belongs to the evaluation set "
                f"{rel[0]!r} (eval/registry.py), which is never read as pretraining input"
            )


def input_units(cfg: InputConfig) -> list[ReadUnit]:
    """The units of one input in reading order; raises ReaderError / ValueError before any work."""
    if cfg.format == "shipped":
        units = _shipped_units(cfg)
    else:
        units = resolve_units(cfg.paths, cfg.format, input_name=cfg.name)
    _refuse_eval_paths(cfg, units)
    return units


class KfmReader(PipelineStep):
    """datatrove reader: yields one Document per record of the configured inputs.

    Tasks split the work by unit (file, saved dataset, shipped-set part): all units of all inputs
    in a fixed order (inputs in config order, files sorted), unit k to rank k % world_size.
    Document id "<input name>/<record id>"; metadata source, license and, when known, language
    and language_score (1.0), plus the record's extra fields. Stats: total, forwarded, dropped
    and dropped_<reason> (invalid_utf8, invalid_json, missing_text, empty, too_large). Documents
    arriving from an earlier step are passed through first, uncounted.

    Raises at construction: ImportError without datatrove; ValueError for an empty or
    duplicate-named input list; ReaderError (a ValueError) naming the input and path when a
    path is missing or matches nothing. While running: ReaderError naming the file when it is
    corrupt or lacks the text column.
    """

    name = "📖 kfm reader"
    type = "📖 - READER"

    def __init__(self, inputs: list[InputConfig]) -> None:
        require_datatrove("KfmReader", _DATATROVE_MISSING)
        super().__init__()
        if not inputs:
            raise ValueError("inputs is empty: configure at least one input")
        names = [cfg.name for cfg in inputs]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"inputs: names {dup} are used twice; each input needs its own name")
        self.inputs = list(inputs)
        # Resolved here (absolute paths) so every task of a run sees the same file list.
        self.units: list[tuple[InputConfig, ReadUnit]] = [
            (cfg, unit) for cfg in self.inputs for unit in input_units(cfg)
        ]

    def _records(self, cfg: InputConfig, unit: ReadUnit) -> Iterator[Record | Rejection]:
        if unit.kind == "shipped":
            return get_shipped_set(cfg.shipped or cfg.name).read(unit.path, unit.key)
        return iter_unit(
            unit,
            text_field=cfg.text_field,
            id_field=cfg.id_field,
            text_field_setting="inputs.text_field",
        )

    def _reject(self, cfg: InputConfig, rejection: Rejection, n_seen: int) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{rejection.reason}")
        if n_seen <= WARN_PER_UNIT:
            logger.warning(
                f"input {cfg.name}: dropped {rejection.where} ({rejection.reason}: "
                f"{rejection.detail})"
            )

    def _document(self, cfg: InputConfig, rec: Record, default_license: str | None) -> Document:
        metadata = {f"record_{k}" if k in RESERVED_KEYS else k: v for k, v in rec.metadata.items()}
        metadata["source"] = cfg.name
        metadata["license"] = cfg.license or rec.license or default_license or UNKNOWN_LICENSE
        language = cfg.language or rec.language
        if language is not None:
            metadata["language"] = language
            metadata["language_score"] = 1.0
        return Document(text=rec.text, id=f"{cfg.name}/{rec.id}", metadata=metadata)

    def run(
        self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1
    ) -> DocumentsPipeline:
        """Yield the documents of this task's units (datatrove step entry point)."""
        if data:
            yield from data
        forwarded: dict[str, int] = {}
        for k, (cfg, unit) in enumerate(self.units):
            if k % world_size != rank:
                continue
            if cfg.limit >= 0 and forwarded.get(cfg.name, 0) >= cfg.limit:
                continue
            adapter = get_shipped_set(cfg.shipped) if cfg.shipped else None
            default_license = adapter.license if adapter else None
            default_language = adapter.language if adapter else None
            rejected = 0
            records = self._records(cfg, unit)
            try:
                for rec in records:
                    self.stat_update(StatHints.total)
                    if isinstance(rec, Record):
                        reason = text_problem(rec.text, cfg.max_doc_bytes)
                        if reason is not None:
                            size = f"{len(rec.text.encode('utf-8'))} bytes"
                            rec = Rejection(reason, rec.where, size)
                    if isinstance(rec, Rejection):
                        rejected += 1
                        self._reject(cfg, rec, rejected)
                        continue
                    rec.language = rec.language or default_language
                    doc = self._document(cfg, rec, default_license)
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                    forwarded[cfg.name] = forwarded.get(cfg.name, 0) + 1
                    if cfg.limit >= 0 and forwarded[cfg.name] >= cfg.limit:
                        break
            finally:
                records.close()  # type: ignore[attr-defined]  # closes the file on early stop
            if rejected > WARN_PER_UNIT:
                logger.warning(
                    f"input {cfg.name}: {unit.path} ({unit.key}): {rejected} records dropped "
                    f"in all, first {WARN_PER_UNIT} logged above"
                )
