"""WriteReport: the final stage. stats.json, DATA_CARD.md and train.yaml for the packed shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.card import CARD_NAME, render_card
from data_pipeline.report import build_report, write_report
from data_pipeline.steps import require_datatrove
from kfm.fs import atomic_write_text

try:
    from datatrove.pipeline.base import PipelineStep

    _DATATROVE_MISSING: ImportError | None = None
except ImportError as e:
    PipelineStep = object
    _DATATROVE_MISSING = e

TRAIN_CONFIG_NAME = "train.yaml"
ONE_LANGUAGE_SHARE = 0.95
"""A source is of one language (data.sources[].language) when that many of its curated
documents are: kfm train then reports its validation bits per byte under that language."""


def source_language(row: dict[str, Any]) -> str | None:
    """The language of a source's stats row (`build_report`): the language of at least
    ONE_LANGUAGE_SHARE of its curated documents; None when mixed or unknown."""
    counts = row.get("languages") or {}
    total = sum(counts.values())
    if not total:
        return None
    lang, n = max(counts.items(), key=lambda kv: kv[1])
    if n < ONE_LANGUAGE_SHARE * total or lang in ("unknown", "und"):
        return None
    return lang


def train_config(
    preset: str | Path,
    *,
    name: str,
    shards_dir: Path,
    sources: list[tuple[str, float]],
    tokenizer: str,
    languages: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The training preset at ``preset`` with data.sources (the shard sets that exist, with
    their mixture weights and, where ``languages`` gives one, language), tokenizer.path and
    model.vocab_size set for this corpus."""
    cfg = yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {}
    entries, vocab = [], 0
    for source, weight in sources:
        manifest = shards_dir / source / "manifest.json"
        if manifest.is_file():
            vocab = max(vocab, json.loads(manifest.read_text(encoding="utf-8"))["vocab_size"])
            entry = {"name": source, "path": str(shards_dir / source), "weight": weight}
            if (languages or {}).get(source):
                entry["language"] = (languages or {})[source]
            entries.append(entry)
    cfg.setdefault("data", {})["sources"] = entries
    cfg.setdefault("tokenizer", {})["path"] = tokenizer
    cfg["tokenizer"].pop("inputs", None)
    if vocab:
        cfg.setdefault("model", {})["vocab_size"] = vocab
        cfg["tokenizer"]["vocab_size"] = vocab
    cfg.setdefault("train", {})["name"] = name
    return cfg


class WriteReport(PipelineStep):
    """Merges every earlier stage's stats into stats.json and writes DATA_CARD.md and train.yaml.

    Raises (in run) RuntimeError when the counts do not reconcile, after writing both files, so a
    miscount is never published silently.
    """

    name = "🧾 Report and data card"
    type = "📊 - STATS"

    def __init__(self, config_dict: dict[str, Any], *, stages: list[str], logs_dir: str) -> None:
        """``config_dict``: the resolved PipelineConfig as plain values (also in pipeline.yaml)."""
        require_datatrove("WriteReport", _DATATROVE_MISSING)
        super().__init__()
        self.config, self.stages, self.logs_dir = config_dict, list(stages), logs_dir

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        """Task 0 writes the files; other tasks do nothing."""
        if rank != 0:
            yield from ()
            return
        cfg = self.config
        out = Path(cfg["output_dir"])
        sources = {
            i["name"]: {
                "license": i.get("license") or "per document (see shard manifest)",
                "weight": i.get("weight", 1.0),
                "language": i.get("language"),
            }
            for i in cfg["inputs"]
        }
        report = build_report(
            name=cfg["name"], logs_dir=self.logs_dir, stages=self.stages, sources=sources
        )
        self._fill_licenses(report, out / "shards")
        write_report(report, out)
        atomic_write_text(out / CARD_NAME, render_card(report, cfg))
        preset = cfg.get("card", {}).get("train_preset")
        if preset:
            train = train_config(
                preset,
                name=cfg["name"],
                shards_dir=out / "shards",
                sources=[(i["name"], i.get("weight", 1.0)) for i in cfg["inputs"]],
                tokenizer=cfg["pack"]["tokenizer"],
                languages={s: source_language(row) for s, row in report["sources"].items()},
            )
            atomic_write_text(
                out / TRAIN_CONFIG_NAME,
                yaml.safe_dump(train, sort_keys=False, allow_unicode=True),
            )
        self.stat_update("sources", value=len(sources))
        if not report["reconciled"]:
            raise RuntimeError(
                "pipeline counts do not reconcile (a step dropped documents without a reason): "
                + "; ".join(report["problems"])
            )
        yield from ()

    @staticmethod
    def _fill_licenses(report: dict[str, Any], shards_dir: Path) -> None:
        """Per source without a configured license: the licenses its shard manifest records."""
        for source, row in report["sources"].items():
            manifest = shards_dir / source / "manifest.json"
            if not manifest.is_file():
                continue
            entry = json.loads(manifest.read_text(encoding="utf-8"))["sources"][0]
            row["document_licenses"] = entry.get("document_licenses", {})
            if row["license"].startswith("per document"):
                row["license"] = entry.get("license", "unknown")
