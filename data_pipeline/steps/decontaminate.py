"""Decontamination step: drop (or flag) documents sharing n-grams with any registered eval set.

The eval sets come from `eval.registry.EVAL_SETS`, the registry the evaluator reads too; the
matching itself is `data_pipeline.decontaminate` (pure Python, documented there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from data_pipeline.decontaminate import (
    DEFAULT_N,
    NgramIndex,
    contaminating,
    contamination_reason,
)
from data_pipeline.steps import require_datatrove
from eval.registry import EVAL_SETS, eval_texts, get_eval_set

try:
    from datatrove.pipeline.base import PipelineStep
    from datatrove.utils.typeshelper import StatHints

    _DATATROVE_MISSING: ImportError | None = None
except ImportError as exc:  # the core above stays usable without datatrove
    PipelineStep = object
    _DATATROVE_MISSING = exc

if TYPE_CHECKING:
    from datatrove.data import DocumentsPipeline


@dataclass(kw_only=True, slots=True)
class DecontaminateConfig:
    """Settings of the decontamination step."""

    n: int = DEFAULT_N
    """Window length in normalised tokens; eval items shorter than n form one whole-item shingle."""
    sets: list[str] | None = None
    """Registered eval sets to check against; None means every set in eval.registry.EVAL_SETS."""
    mode: Literal["remove", "flag"] = "remove"
    """"remove" drops contaminated documents; "flag" keeps them and marks doc.metadata."""
    min_matches: int = 1
    """Shared shingles with one eval item needed to call a document contaminated (capped at the
    item's own shingle count)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"decontaminate.n={self.n} must be >= 1 (13 is the usual choice)")
        if self.mode not in ("remove", "flag"):
            raise ValueError(f"decontaminate.mode={self.mode!r} must be 'remove' or 'flag'")
        if self.min_matches < 1:
            raise ValueError(f"decontaminate.min_matches={self.min_matches} must be >= 1")
        for name in self.sets or ():
            get_eval_set(name)  # KeyError listing the registered sets

    @property
    def set_names(self) -> list[str]:
        """The eval sets this config checks against, resolved."""
        return list(EVAL_SETS) if self.sets is None else list(self.sets)


class Decontaminator(PipelineStep):
    """datatrove step: removes or flags documents that overlap an evaluation set.

    Stats: total, forwarded, dropped, and per contaminated document (attributed to the set with
    the most shared shingles) "dropped_contaminated_<set>" in remove mode or
    "flagged_contaminated_<set>" in flag mode, so total == forwarded + sum(dropped_*). In flag
    mode contaminated documents are forwarded with metadata["contaminated"] = <set> and metadata["contamination_items"] =
    ["<set>/<item_id>", ...].
    """

    name = "🧪 Decontaminate"
    type = "🔻 - FILTER"

    def __init__(self, config: DecontaminateConfig | None = None) -> None:
        require_datatrove("Decontaminator", _DATATROVE_MISSING)
        super().__init__()
        self.config = config or DecontaminateConfig()
        self._index: NgramIndex | None = None

    @property
    def index(self) -> NgramIndex:
        """The n-gram index of the configured eval sets, built on first use (once per task)."""
        if self._index is None:
            self._index = NgramIndex.build(eval_texts(self.config.set_names), n=self.config.n)
        return self._index

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to another process rebuilds the index there rather than carrying it.
        return {**self.__dict__, "_index": None}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield the documents of data that are clean (all of them in flag mode)."""
        with self.track_time():
            index = self.index
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                found = contaminating(index.matches(doc.text), self.config.min_matches)
            reason = contamination_reason(found)
            if reason is not None:
                if self.config.mode == "remove":
                    self.stat_update(StatHints.dropped, f"dropped_{reason}")
                    continue
                self.stat_update(f"flagged_{reason}")
                doc.metadata["contaminated"] = reason.removeprefix("contaminated_")
                doc.metadata["contamination_items"] = [f"{m.set_name}/{m.item_id}" for m in found]
            self.stat_update(StatHints.forwarded)
            yield doc
