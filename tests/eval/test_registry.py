"""The eval-set registry reads every shipped set with the figures its SOURCE.md states."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from eval.registry import (
    DATA_ROOT_ENV,
    EVAL_SETS,
    data_root,
    eval_texts,
    get_eval_set,
    item_text,
    iter_items,
)


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared eval data not available: {exc}")


# Figures copied from each /work/shared/data/<set>/SOURCE.md (records and answer distribution).
EXPECTED = {
    "pubmedqa": (1000, 3, {"yes": 552, "no": 338, "maybe": 110}),
    "medqa_usmle": (1273, 4, {"A": 353, "B": 309, "C": 346, "D": 265}),
    "medqa_usmle_5opt": (1273, 5, None),
    "medmcqa": (2816, 4, {"A": 950, "B": 735, "C": 617, "D": 514}),
    "mmlu_medical": (1089, 4, None),
    "klue_nli": (3000, 3, None),
    "xnli_ko": (2490 + 5010, 3, None),
}
KORMEDMCQA = {f"kormedmcqa_{s}" for s in ("doctor", "nurse", "pharm", "dentist")}
"""Not in the shared data (CC BY-NC, Hugging Face only): tested in tests/eval/test_tasks.py."""


def test_registry_names_the_issue_sets() -> None:
    assert {"pubmedqa", "medqa_usmle", "medmcqa", "mmlu_medical"} <= set(EVAL_SETS)
    assert set(EXPECTED) | KORMEDMCQA == set(EVAL_SETS), "new set: add its SOURCE.md figures here"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_set_loads_with_source_md_figures(root: Path, name: str) -> None:
    n_items, n_choices, answers = EXPECTED[name]
    items = list(iter_items(name, root=root))
    assert len(items) == n_items
    assert len({i.id for i in items}) == n_items
    for item in items:
        assert item.id and item.question.strip()
        assert len(item.choices) == n_choices and all(c.strip() for c in item.choices)
        assert 0 <= item.answer < n_choices
    if answers is not None:
        key = (lambda i: i.answer_text) if name == "pubmedqa" else (lambda i: "ABCDE"[i.answer])
        assert Counter(map(key, items)) == answers


def test_pubmedqa_splits_and_context(root: Path) -> None:
    items = list(iter_items("pubmedqa", root=root))
    assert Counter(i.split for i in items) == {"test": 500, "dev": 500}
    assert all(i.context and i.long_answer for i in items)
    sample = next(i for i in items if i.id == "21645374")
    assert sample.question.startswith("Do mitochondria play a role in remodelling lace plant")
    assert sample.answer_text == "yes"
    assert sample.long_answer.startswith("Results depicted mitochondrial dynamics in vivo")


def test_medqa_files_share_questions(root: Path) -> None:
    four = list(iter_items("medqa_usmle", root=root))
    five = list(iter_items("medqa_usmle_5opt", root=root))
    assert [i.question for i in four] == [i.question for i in five]
    # SOURCE.md sample: the first question's gold answer is B with 4 options, C with 5.
    assert four[0].answer_text == "Tell the attending that he cannot fail to disclose this mistake"
    assert (four[0].answer, five[0].answer) == (1, 2)


def test_unknown_set_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="medmcqa.*mmlu_medical"):
        get_eval_set("medqa")
    with pytest.raises(KeyError, match="registered sets"):
        list(eval_texts(["pubmedqa", "nope"]))


def test_data_root_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_ROOT_ENV):
        data_root()


def test_eval_texts_hold_question_choices_and_context(root: Path) -> None:
    texts = list(eval_texts(EXPECTED, root=root))
    assert len(texts) == sum(n for n, _, _ in EXPECTED.values())
    by_key = {(s, i): t for s, i, t in texts}
    mcq = next(iter_items("mmlu_medical", root=root))
    text = by_key[("mmlu_medical", mcq.id)]
    assert mcq.question in text and all(c in text for c in mcq.choices)
    pqa = next(iter_items("pubmedqa", root=root))
    text = by_key[("pubmedqa", pqa.id)]
    assert pqa.question in text and pqa.context in text and pqa.long_answer in text
    assert "maybe" not in item_text(pqa).split("\n")  # labels are not item content
