"""Decontamination: planted eval items are found, clean corpus text is not, the step counts right."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.decontaminate import (
    NgramIndex,
    contaminating,
    contamination_reason,
    decontaminate,
    normalize_tokens,
)
from eval.registry import (
    EVAL_SETS,
    EvalItem,
    EvalSetUnavailable,
    data_root,
    eval_texts,
    item_text,
    iter_items,
)

REPO = Path(__file__).resolve().parents[2]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november"


# ---- normalisation and index mechanics (no shared data needed) ----


def test_normalisation_is_for_matching_only() -> None:
    assert normalize_tokens("Cell-death,   in ＰＣＤ cells!") == [
        "cell",
        "death",
        "in",
        "pcd",
        "cells",
    ]
    # One-character tokens (option labels, the article "a") are dropped on both sides.
    assert normalize_tokens("(A) a dose of 5 mg\nB) 10 ㎎") == ["dose", "of", "mg", "10", "mg"]
    assert normalize_tokens("환자는 두통을 호소했다. 및 열") == ["환자는", "두통을", "호소했다"]
    text = "Ｔｈｅ  ORIGINAL, text."
    (verdict,) = decontaminate([text], NgramIndex.build([("s", "1", WORDS)], n=5))
    assert verdict.text is text


def test_ngram_hits_and_min_matches() -> None:
    index = NgramIndex.build([("s", "1", WORDS)], n=5)
    assert index.stats["shingles"] == 14 - 5 + 1
    assert index.bytes_per_shingle == 12
    five = " ".join(WORDS.split()[2:7])  # exactly one shared 5-gram
    assert [(m.set_name, m.item_id, m.n_overlapping) for m in index.matches(five)] == [
        ("s", "1", 1)
    ]
    assert contaminating(index.matches(five), min_matches=1)
    assert not contaminating(index.matches(five), min_matches=2)
    assert not index.matches(" ".join(WORDS.split()[2:6]))  # 4 tokens < n
    assert not index.matches(" ".join(reversed(WORDS.split())))  # order matters
    assert index.matches(WORDS)[0].n_overlapping == 10


def test_short_item_is_one_whole_shingle() -> None:
    index = NgramIndex.build([("s", "short", "Tumor marker for seminoma: PLAP")], n=13)
    assert index.short_widths == (5,) and index.stats["short_items"] == 1
    doc = "Revision notes. TUMOR MARKER FOR SEMINOMA -- (a) plap. Next topic follows here."
    (match,) = contaminating(index.matches(doc), min_matches=3)  # capped at the item's 1 shingle
    assert (match.item_id, match.n_overlapping, match.n_item) == ("short", 1, 1)
    assert not index.matches("Tumor marker for seminoma is discussed below.")


def test_decontaminate_modes_and_reason() -> None:
    index = NgramIndex.build(
        [("s1", "1", WORDS), ("s2", "9", "zulu yankee xray whiskey victor")], 5
    )
    docs = ["clean text only", f"intro {WORDS} outro", "ZULU, yankee; xray whiskey victor"]
    removed = list(decontaminate(docs, index, mode="remove"))
    assert [v.keep for v in removed] == [True, False, False]
    assert [v.reason for v in removed] == [None, "contaminated_s1", "contaminated_s2"]
    flagged = list(decontaminate(docs, index, mode="flag"))
    assert all(v.keep for v in flagged) and flagged[1].reason == "contaminated_s1"
    assert contamination_reason([]) is None
    with pytest.raises(ValueError, match="mode"):
        list(decontaminate(docs, index, mode="drop"))  # type: ignore[arg-type]


# ---- against the registered eval sets ----


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared eval data not available: {exc}")


@pytest.fixture(scope="module")
def index(root: Path) -> NgramIndex:
    return NgramIndex.build(eval_texts(root=root))


@pytest.fixture(scope="module")
def clean_docs(root: Path) -> list[str]:
    """Training-like text: 300 answered MedQuAD pairs and the first 20 PLOS articles."""
    docs = []
    with gzip.open(root / "medquad" / "medquad.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["answer"]:
                docs.append(f"{r['question']}\n{r['answer']}")
            if len(docs) == 300:
                break
    with gzip.open(root / "plos_starter_corpus" / "plos_starter_corpus.jsonl.gz", "rt") as f:
        for line, _ in zip(f, range(20), strict=False):
            docs.append(json.loads(line)["text"])
    return docs


def planted_items(root: Path) -> list[tuple[str, EvalItem]]:
    """From each set: every 97th item plus the three with the shortest text."""
    chosen = []
    for name in EVAL_SETS:
        try:
            items = list(iter_items(name, root=root))
        except EvalSetUnavailable:  # an optional set (KorMedMCQA) not provided here
            continue
        shortest = sorted(items, key=lambda i: len(normalize_tokens(item_text(i))))[:3]
        chosen += [(name, i) for i in items[::97] + shortest]
    return chosen


def disguise(item: EvalItem) -> str:
    """The item as a web page might show it: new case, labels, punctuation and spacing."""
    body = item.question.upper().replace(",", " ;").replace("?", " ?!")
    if item.context is None:
        body += "\n" + "\n\n".join(f"  ({'abcde'[k]})  {c}." for k, c in enumerate(item.choices))
    else:
        body += "\t\n" + item.context.replace(". ", ".\n")
        body += f"\nCONCLUSION: {item.long_answer}" if item.long_answer else ""
    return f"Practice question:\n{body}\nAnswer: {item.answer_text}"


def found(index: NgramIndex, doc: str, name: str, item: EvalItem) -> bool:
    return (name, item.id) in {(m.set_name, m.item_id) for m in contaminating(index.matches(doc))}


def test_planted_eval_items_are_found(root: Path, index: NgramIndex, clean_docs: list[str]) -> None:
    planted = planted_items(root)
    assert len(planted) >= 5 * 13
    missed = []
    for k, (name, item) in enumerate(planted):
        before, after = clean_docs[k % 300], clean_docs[(k * 7 + 1) % 300]
        variants = {
            "verbatim": item_text(item),
            "disguised": disguise(item),
            "embedded": f"{before}\n\n{disguise(item)}\n\n{after}",
        }
        missed += [
            (name, item.id, v) for v, doc in variants.items() if not found(index, doc, name, item)
        ]
    assert not missed


def test_long_question_alone_is_found(root: Path, index: NgramIndex) -> None:
    for item in list(iter_items("medqa_usmle", root=root))[::50]:
        doc = f"Forum post: has anyone seen this one? {item.question.lower()} Thanks!"
        assert found(index, doc, "medqa_usmle", item)


def test_clean_corpus_mostly_not_flagged(index: NgramIndex, clean_docs: list[str]) -> None:
    flagged = [d[:80] for d in clean_docs if contaminating(index.matches(d))]
    # Measured: 0 of these 320 (and 0 of all 16,528 MedQuAD answers + PLOS articles).
    assert len(flagged) <= len(clean_docs) // 100, flagged


# ---- the datatrove step ----


def test_step_removes_and_flags_with_stats(root: Path, clean_docs: list[str]) -> None:
    pytest.importorskip("datatrove")
    from datatrove.data import Document

    from data_pipeline.steps.decontaminate import DecontaminateConfig, Decontaminator

    sets = ["medmcqa", "mmlu_medical"]
    plants = [(s, i) for s in sets for i in list(iter_items(s, root=root))[::300]]
    texts = clean_docs[:40] + [f"{clean_docs[k]}\n{disguise(i)}" for k, (_, i) in enumerate(plants)]

    def documents() -> list[Document]:
        return [Document(text=t, id=str(k), metadata={"source": "t"}) for k, t in enumerate(texts)]

    step = Decontaminator(DecontaminateConfig(sets=sets))
    kept = list(step.run(documents()))
    assert [d.text for d in kept] == clean_docs[:40]
    stats = {k: v.total for k, v in step.stats.stats.items()}
    expected = Counter(f"dropped_contaminated_{s}" for s, _ in plants)
    assert {k: v for k, v in stats.items() if k.startswith("dropped_contaminated_")} == expected
    assert stats["total"] == len(texts) == stats["forwarded"] + stats["dropped"]

    flagger = Decontaminator(DecontaminateConfig(sets=sets, mode="flag"))
    out = list(flagger.run(documents()))
    assert len(out) == len(texts)
    marked = [d for d in out if "contaminated" in d.metadata]
    assert [d.metadata["contaminated"] for d in marked] == [s for s, _ in plants]
    assert all(
        f"{s}/{i.id}" in d.metadata["contamination_items"]
        for d, (s, i) in zip(marked, plants, strict=True)
    )


def test_config_validation() -> None:
    pytest.importorskip("datatrove")
    from data_pipeline.steps.decontaminate import DecontaminateConfig

    assert DecontaminateConfig().set_names == list(EVAL_SETS)
    with pytest.raises(KeyError, match="registered sets"):
        DecontaminateConfig(sets=["medqa"])
    with pytest.raises(ValueError, match="decontaminate.mode"):
        DecontaminateConfig(mode="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_matches"):
        DecontaminateConfig(min_matches=0)


def test_step_without_datatrove_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['datatrove'] = None\n"
        "from data_pipeline.steps.decontaminate import Decontaminator\n"
        "try:\n    Decontaminator()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "pip install 'kfm[data]'" in out.stdout
