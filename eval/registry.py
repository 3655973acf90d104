"""The one registry of evaluation sets, shared by `eval/` and the pipeline's decontamination step.

Add a benchmark here (an `EvalSet` with a loader) and both the evaluator and decontamination pick
it up: the training corpus is then checked against it without further changes.

Paths are relative to the shared data root (`data_root()`): `$KFM_SHARED_DATA` when set, else the
`shared/data` folder beside the repository checkout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_ROOT_ENV = "KFM_SHARED_DATA"
"""Environment variable naming the shared data folder (overrides ../shared/data)."""


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One evaluation question.

    answer is the index into choices of the gold choice. context is text shown with the question
    (PubMedQA's abstract sections), long_answer the gold free-text rationale (PubMedQA's
    conclusion); both None for plain multiple-choice sets. split is "test" for items that are
    scored and "dev" for items kept apart for few-shot prompts (PubMedQA's non-test half).
    """

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    context: str | None = None
    long_answer: str | None = None
    split: str = "test"

    @property
    def answer_text(self) -> str:
        """The gold choice's text."""
        return self.choices[self.answer]


@dataclass(frozen=True, slots=True)
class EvalSet:
    """A registered evaluation set: where it lives and how to read it.

    path is relative to the shared data root (a file or a folder, as the loader expects); loader
    receives the absolute path and yields the set's items in file order.
    """

    name: str
    path: str
    license: str
    loader: Callable[[Path], Iterator[EvalItem]]


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if line.strip():
                yield line_no, json.loads(line)


def _mcq_item(record: dict, item_id: str, where: str) -> EvalItem:
    # Options are dicts keyed "A".."E" in file order; answer_idx names the gold key.
    labels = sorted(record["options"])
    choices = tuple(record["options"][k] for k in labels)
    gold = labels.index(record["answer_idx"])
    if choices[gold] != record["answer"]:
        raise ValueError(
            f"{where}: answer {record['answer']!r} is not option {record['answer_idx']}"
        )
    return EvalItem(id=item_id, question=record["question"], choices=choices, answer=gold)


def load_mcq_jsonl(path: Path) -> Iterator[EvalItem]:
    """Read a MedAgentsBench-style MCQ JSONL file (question, options{A..}, answer_idx, answer).

    The item id is the record's realidx when present (MedQA 4-option, MedMCQA, MMLU), else the
    0-based line number (MedQA 5-option has no realidx; its lines follow the 4-option file).
    """
    for line_no, record in _read_jsonl(path):
        item_id = str(record.get("realidx", line_no))
        yield _mcq_item(record, item_id, f"{path}:{line_no + 1}")


PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def load_pubmedqa(folder: Path) -> Iterator[EvalItem]:
    """Read PubMedQA PQA-L: ori_pqal.json (1,000 items keyed by PMID) + test_ground_truth.json.

    The 500 PMIDs of test_ground_truth.json get split "test", the other 500 split "dev". context
    joins the abstract sections (CONTEXTS) with newlines; long_answer is LONG_ANSWER.
    """
    records = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8"))
    for pmid, r in records.items():
        yield EvalItem(
            id=pmid,
            question=r["QUESTION"],
            choices=PUBMEDQA_CHOICES,
            answer=PUBMEDQA_CHOICES.index(r["final_decision"]),
            context="\n".join(r["CONTEXTS"]),
            long_answer=r["LONG_ANSWER"],
            split="test" if pmid in test_ids else "dev",
        )


EVAL_SETS: dict[str, EvalSet] = {
    s.name: s
    for s in (
        EvalSet("pubmedqa", "pubmedqa", "MIT", load_pubmedqa),
        # Same 1,273 questions in both MedQA files; the 5-option file has a fifth distractor and
        # reworded options, so both are registered and both are kept out of training.
        EvalSet("medqa_usmle", "medqa_usmle/medqa_us_4options_test.jsonl", "MIT", load_mcq_jsonl),
        EvalSet(
            "medqa_usmle_5opt", "medqa_usmle/medqa_us_5options_test.jsonl", "MIT", load_mcq_jsonl
        ),
        EvalSet(
            "medmcqa", "medmcqa/medmcqa_dev_single_answer.jsonl", "MIT / Apache-2.0", load_mcq_jsonl
        ),
        EvalSet("mmlu_medical", "mmlu_medical/mmlu_medical_test.jsonl", "MIT", load_mcq_jsonl),
    )
}


def data_root() -> Path:
    """The shared data folder: $KFM_SHARED_DATA, else ../shared/data beside the repository.

    Raises FileNotFoundError naming the environment variable when the folder does not exist.
    """
    env = os.environ.get(DATA_ROOT_ENV)
    # eval/registry.py -> repo root is two levels up; the shared folder sits beside the checkout.
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        how = f"{DATA_ROOT_ENV}={env}" if env else f"{DATA_ROOT_ENV} is unset and the default"
        raise FileNotFoundError(
            f"shared data folder not found: {how} {root} does not exist "
            f"(set {DATA_ROOT_ENV} to the folder holding pubmedqa/, medqa_usmle/, ...)"
        )
    return root


def get_eval_set(name: str) -> EvalSet:
    """The registered set called name; KeyError listing the valid names otherwise."""
    try:
        return EVAL_SETS[name]
    except KeyError:
        raise KeyError(
            f"unknown eval set {name!r}; registered sets: {', '.join(sorted(EVAL_SETS))}"
        ) from None


def iter_items(name: str, *, root: Path | None = None) -> Iterator[EvalItem]:
    """Yield the items of eval set name, read from root (default `data_root()`)."""
    eval_set = get_eval_set(name)
    yield from eval_set.loader((root or data_root()) / eval_set.path)


def item_text(item: EvalItem) -> str:
    """The text of item that must not appear in training data, laid out as a leak would show it.

    Question, then the choices one per line, then the context and the long answer. PubMedQA's
    choices (yes/no/maybe) are labels, not item content, so they are left out.
    """
    parts = [item.question]
    if item.context is None:
        parts.extend(item.choices)
    else:
        parts.append(item.context)
    if item.long_answer:
        parts.append(item.long_answer)
    return "\n".join(parts)


def eval_texts(
    names: Iterable[str] | None = None, *, root: Path | None = None
) -> Iterator[tuple[str, str, str]]:
    """Yield (set_name, item_id, text) for every item of the named sets (default: all registered).

    text is `item_text(item)`: one string per item holding everything of it that must not leak
    into training (question + choices for multiple-choice sets; question + abstract sections +
    conclusion for PubMedQA, whose abstracts are PubMed text that a corpus may well contain).
    Unknown names raise KeyError before anything is read.
    """
    selected = [get_eval_set(n).name for n in (EVAL_SETS if names is None else names)]
    for name in selected:
        for item in iter_items(name, root=root):
            yield name, item.id, item_text(item)
