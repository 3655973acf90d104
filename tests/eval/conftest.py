"""Fixtures shared by the eval tests."""

from __future__ import annotations

import pytest

from eval.registry import KORMEDMCQA_ENV, KORMEDMCQA_SAMPLE, data_root


@pytest.fixture
def sample_kormedmcqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared eval data, with the hand-written KorMedMCQA rows standing in for the real set
    (CC BY-NC, not bundled)."""
    try:
        data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared eval data not available: {exc}")
    monkeypatch.setenv(KORMEDMCQA_ENV, str(KORMEDMCQA_SAMPLE))
