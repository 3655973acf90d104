"""The curation pipeline's config: one YAML file (``configs/data/<name>.yaml``) -> PipelineConfig.

Each section is the config dataclass of one step, declared next to that step (``steps/*.py``);
this module only assembles them, loads YAML with kfm's loader (unknown keys and wrong types are
errors naming the key) and runs the cross-section checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.card import SECTIONS
from data_pipeline.dedup import DedupConfig
from data_pipeline.executor import ExecutorConfig
from data_pipeline.steps.decontaminate import DecontaminateConfig
from data_pipeline.steps.korean_rules import KoreanRulesConfig
from data_pipeline.steps.langid import LangIdConfig
from data_pipeline.steps.normalize import NormalizeConfig
from data_pipeline.steps.pack import PackConfig
from data_pipeline.steps.pii_scrub import PIIScrubConfig
from data_pipeline.steps.quality import QualityConfig
from data_pipeline.steps.read import InputConfig
from kfm.config.loader import ConfigError, build_section, deep_merge, parse_overrides, read_yaml

STEPS = (*SECTIONS, "exact_dedup", "minhash")
"""Steps that `skip` may name, in pipeline order (reading and packing always run)."""


@dataclass(kw_only=True, slots=True)
class CardConfig:
    """What the data card and the training preset written next to the shards say."""

    title: str = "kfm curated corpus"
    """Heading of DATA_CARD.md."""
    description: str = ""
    """A paragraph on purpose and contents, shown under the heading."""
    train_preset: str | None = "configs/quickstart.yaml"
    """Training preset copied to <output_dir>/train.yaml with data.sources, tokenizer.path and
    model.vocab_size filled in from this run; None writes no train.yaml."""


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """A whole curation run: inputs, every step's settings, packing and the executor."""

    name: str = "corpus"
    """Run name: Slurm job names and the data card use it."""
    output_dir: str = "runs/data/corpus"
    """Run folder: work/ (intermediate documents), shards/, logs/, stats.json, DATA_CARD.md."""
    inputs: list[InputConfig] = field(default_factory=list)
    """Sources to read, each with name, format, paths, license and mixture weight."""
    tasks: int = 4
    """Parallel tasks of the document stages (curate, dedup signatures); inputs split by file."""
    limit_per_input: int = -1
    """Cap on documents read per input where the input sets no `limit` (-1: all); CI slices."""
    skip: list[str] = field(default_factory=list)
    """Steps to leave out, from: normalize, langid, quality, korean_rules, pii, decontaminate,
    exact_dedup, minhash."""
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    """Unicode NFC, ftfy, jamo debris, control characters, whitespace."""
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    """Offline language identification and per-language thresholds."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """datatrove's Gopher/C4/FineWeb filters, with FineWeb-2 Korean thresholds for Korean."""
    korean_rules: KoreanRulesConfig = field(default_factory=KoreanRulesConfig)
    """Hangul ratio, emoticon runs, Korean spam and boilerplate lines."""
    pii: PIIScrubConfig = field(default_factory=PIIScrubConfig)
    """PII types replaced by typed placeholders."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """n-gram overlap with the eval sets of eval.registry."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact (content hash) and MinHash-LSH near-duplicate removal, across sources."""
    pack: PackConfig = field(default_factory=PackConfig)
    """Tokenizer and shard settings; the shard sets are what `kfm train` reads."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """local (default) or slurm, workers, Slurm partition/time/memory."""
    card: CardConfig = field(default_factory=CardConfig)
    """DATA_CARD.md and train.yaml settings."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: list at least one source under `inputs:`")
        names = [i.name for i in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"inputs: source names must be unique, repeated: {dupes}")
        if self.tasks < 1:
            raise ValueError(f"tasks={self.tasks} must be >= 1 (--pipeline.tasks)")
        if self.limit_per_input >= 0:
            for i in self.inputs:
                if i.limit < 0:
                    i.limit = self.limit_per_input
        for s in self.skip:
            if s not in STEPS:
                raise ValueError(f"skip: unknown step {s!r}; steps: {', '.join(STEPS)}")
        # the dedup stages read their own switches; `skip` is the short way to set them
        if "exact_dedup" in self.skip:
            self.dedup.exact.enabled = False
        if "minhash" in self.skip:
            self.dedup.minhash.enabled = False

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.output_dir)

    @property
    def sources(self) -> list[str]:
        """Source names in config order."""
        return [i.name for i in self.inputs]


def config_to_dict(cfg: Any) -> Any:
    """Dataclasses -> plain YAML/JSON values (lists, dicts, scalars)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


SHARED_DATA_VAR = "${KFM_SHARED_DATA}"


def _expand_shared_data(data: dict[str, Any]) -> None:
    """Replace ${KFM_SHARED_DATA} in input paths by eval.registry.data_root() (the env var, else
    ../shared/data beside the checkout), so presets work from any clone location."""
    for item in data.get("inputs") or []:
        paths = item.get("paths") if isinstance(item, dict) else None
        if isinstance(paths, list) and any(SHARED_DATA_VAR in str(p) for p in paths):
            from eval.registry import data_root

            root = str(data_root())
            item["paths"] = [str(p).replace(SHARED_DATA_VAR, root) for p in paths]


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """YAML at ``path`` <- dotted ``overrides`` (``--quality.enabled=false``; top-level keys as
    ``--pipeline.tasks=8``) -> a checked PipelineConfig.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or a failed check; the message
            names the file and key.
    """
    data = read_yaml(path)
    source = str(path)
    if overrides:
        tree = parse_overrides(overrides)
        tree.update(tree.pop("pipeline", {}))
        data = deep_merge(data, tree)
        source += " + command-line overrides"
    _expand_shared_data(data)
    try:
        return build_section(PipelineConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
