"""The one registry of evaluation sets, shared by `eval/` and the pipeline's decontamination step.

Add a benchmark here (an `EvalSet` with a loader) and both the evaluator and decontamination pick
it up: the training corpus is then checked against it without further changes.

Paths are relative to the shared data root (`data_root()`): `$KFM_SHARED_DATA` when set, else the
`shared/data` folder beside the repository checkout. KorMedMCQA is not in the shared data (CC BY-NC,
Hugging Face only): its sets are read from `$KFM_KORMEDMCQA_DIR/<subset>/{dev,test}.jsonl`, else
`<data root>/kormedmcqa/<subset>/`, else the Hugging Face dataset `sean0042/KorMedMCQA` (hub or the
local datasets cache). A set none of these provide raises `EvalSetUnavailable`; `eval_texts` (what
decontamination reads) skips such a set with a logged note naming how to provide it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_ROOT_ENV = "KFM_SHARED_DATA"
"""Environment variable naming the shared data folder (overrides ../shared/data)."""
KORMEDMCQA_ENV = "KFM_KORMEDMCQA_DIR"
"""Environment variable naming a folder of KorMedMCQA subsets (<subset>/{dev,test}.jsonl)."""
KORMEDMCQA_HUB = "sean0042/KorMedMCQA"
"""Hugging Face dataset id of KorMedMCQA (configs doctor, nurse, pharm, dentist)."""
KORMEDMCQA_SAMPLE = Path(__file__).resolve().parent / "data" / "kormedmcqa_sample"
"""Hand-written rows in KorMedMCQA's schema (not the real set): offline demos and tests."""

log = logging.getLogger(__name__)


class EvalSetUnavailable(FileNotFoundError):
    """An optional eval set (KorMedMCQA) is in none of the places it can be read from."""


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
    language: str = "en"
    """ISO 639-1 code of the set's text."""
    exclusive_folder: bool = True
    """False when the set's folder also holds pretraining text (KLUE's dev folder: NLI is an eval
    set, STS/NER/DP are pretraining input), so the pipeline may read that folder; decontamination
    still checks the set's items."""
    folder_env: str | None = None
    """Environment variable naming a folder read instead of the first folder of path."""
    hub: Callable[[], list[EvalItem]] | None = None
    """Reads the set from the Hugging Face Hub (or the datasets cache) when its local files are
    absent; None for sets that are local only."""
    how_to_get: str = ""
    """How to provide the set when it is absent (named in EvalSetUnavailable's message)."""


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


NLI_CHOICES = ("entailment", "neutral", "contradiction")
"""Labels of the NLI sets, in choice order (KLUE-NLI and XNLI use the same three)."""


def load_klue_nli(path: Path) -> Iterator[EvalItem]:
    """Read KLUE-NLI v1.1 dev (a JSON list: guid, premise, hypothesis, gold_label).

    KLUE's test labels are not public, so the dev set is the scored set (split "test"); there are
    no dev items for few-shot prompts. question is the hypothesis, context the premise.
    """
    for r in json.loads(path.read_text(encoding="utf-8")):
        yield EvalItem(
            id=r["guid"],
            question=r["hypothesis"],
            choices=NLI_CHOICES,
            answer=NLI_CHOICES.index(r["gold_label"]),
            context=r["premise"],
        )


def load_xnli_ko(folder: Path) -> Iterator[EvalItem]:
    """Read KorNLI's XNLI-ko: xnli.dev.ko.tsv (2,490, split "dev") and xnli.test.ko.tsv (5,010).

    Columns sentence1 (premise), sentence2 (hypothesis), gold_label; ids are "<split>-<row>" with
    rows counted from 0 after the header. Quotes are text, not CSV quoting (QUOTE_NONE).
    """
    for split in ("dev", "test"):
        path = folder / f"xnli.{split}.ko.tsv"
        with path.open(encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows)
            if header[:3] != ["sentence1", "sentence2", "gold_label"]:
                raise ValueError(f"{path}: header {header} is not sentence1, sentence2, gold_label")
            for row_no, (premise, hypothesis, label) in enumerate(rows):
                yield EvalItem(
                    id=f"{split}-{row_no}",
                    question=hypothesis,
                    choices=NLI_CHOICES,
                    answer=NLI_CHOICES.index(label),
                    context=premise,
                    split=split,
                )


KORMEDMCQA_SUBSETS = ("doctor", "nurse", "pharm", "dentist")
"""KorMedMCQA's exams (Hugging Face configs): doctor, nurse, pharmacist, dentist licensing."""


def _kormedmcqa_item(record: dict, item_id: str, split: str, where: str) -> EvalItem:
    # KorMedMCQA's schema: question, options in columns A..E, answer 1..5 (1 is A).
    choices = tuple(str(record[k]) for k in "ABCDE")
    answer = int(record["answer"])
    if not 1 <= answer <= 5:
        raise ValueError(f"{where}: answer {record['answer']!r} must be 1..5 (1 is option A)")
    return EvalItem(
        id=item_id, question=record["question"], choices=choices, answer=answer - 1, split=split
    )


def load_kormedmcqa(folder: Path) -> Iterator[EvalItem]:
    """Read one KorMedMCQA subset from local files: folder/test.jsonl (scored) and, if present,
    folder/dev.jsonl (few-shot pool); rows in the Hugging Face schema (question, A..E, answer 1..5,
    other columns ignored). Ids are "<split>-<line>" (line from 0)."""
    for split in ("dev", "test"):
        path = folder / f"{split}.jsonl"
        if split == "dev" and not path.exists():
            continue
        for line_no, record in _read_jsonl(path):
            yield _kormedmcqa_item(record, f"{split}-{line_no}", split, f"{path}:{line_no + 1}")


def kormedmcqa_hub_loader(subset: str) -> Callable[[], list[EvalItem]]:
    """A reader of subset's dev and test splits from the Hugging Face dataset (or its cache)."""

    def load() -> list[EvalItem]:
        import datasets

        splits = datasets.load_dataset(KORMEDMCQA_HUB, subset)
        return [
            _kormedmcqa_item(
                record, f"{split}-{row}", split, f"{KORMEDMCQA_HUB}/{subset} {split} row {row}"
            )
            for split in ("dev", "test")
            for row, record in enumerate(splits[split])
        ]

    return load


def kormedmcqa_how(subset: str) -> str:
    """How to provide KorMedMCQA's subset, for error messages and logged notes."""
    return (
        f"put {subset}/test.jsonl (and {subset}/dev.jsonl for few-shot) in ${KORMEDMCQA_ENV} or "
        f"<data root>/kormedmcqa/, or cache the Hugging Face dataset once online "
        f"(datasets.load_dataset({KORMEDMCQA_HUB!r}, {subset!r})); "
        f"{KORMEDMCQA_ENV}={_display(KORMEDMCQA_SAMPLE)} runs the hand-written sample rows "
        "(not the real set)"
    )


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
        # KLUE's and KorNLI's folders also hold STS/NER/DP text read as Korean pretraining input.
        EvalSet(
            "klue_nli",
            "klue_dev/klue-nli-v1.1_dev.json",
            "CC-BY-SA-4.0",
            load_klue_nli,
            language="ko",
            exclusive_folder=False,
        ),
        EvalSet(
            "xnli_ko", "kornlu", "CC-BY-SA-4.0", load_xnli_ko, language="ko", exclusive_folder=False
        ),
        *(
            EvalSet(
                f"kormedmcqa_{subset}",
                f"kormedmcqa/{subset}",
                "CC-BY-NC-2.0 (evaluation only)",
                load_kormedmcqa,
                language="ko",
                folder_env=KORMEDMCQA_ENV,
                hub=kormedmcqa_hub_loader(subset),
                how_to_get=kormedmcqa_how(subset),
            )
            for subset in KORMEDMCQA_SUBSETS
        ),
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


def local_path(eval_set: EvalSet, *, root: Path | None = None) -> Path:
    """Where eval_set's local files are: under root (default `data_root()`), or, when its
    folder_env is set, under that folder in place of path's first folder."""
    folder = os.environ.get(eval_set.folder_env) if eval_set.folder_env else None
    if folder:
        return Path(folder).joinpath(*Path(eval_set.path).parts[1:])
    return (root or data_root()) / eval_set.path


def iter_items(name: str, *, root: Path | None = None) -> Iterator[EvalItem]:
    """Yield the items of eval set name, read from root (default `data_root()`).

    A set with a hub reader (KorMedMCQA) whose local files are absent is read from the Hugging
    Face dataset instead. Raises EvalSetUnavailable when neither provides it.
    """
    eval_set = get_eval_set(name)
    if eval_set.hub is None:
        yield from eval_set.loader(local_path(eval_set, root=root))
        return
    try:
        path = local_path(eval_set, root=root)
    except FileNotFoundError:  # no shared data folder: the hub may still have the set
        path = None
    if path is not None and path.exists():
        yield from eval_set.loader(path)
        return
    try:
        items = eval_set.hub()
    except Exception as exc:  # offline without a cache, no network, gated, renamed...
        local = f"no {path}" if path is not None else "no shared data folder"
        raise EvalSetUnavailable(
            f"eval set {name} not found: {local}, and its Hugging Face dataset could not be "
            f"loaded ({type(exc).__name__}: {exc}); {eval_set.how_to_get}"
        ) from None
    yield from items


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
    Unknown names raise KeyError before anything is read. An optional set that is not available
    (KorMedMCQA without local files or a cached dataset) is skipped with a logged warning naming
    how to provide it, so that decontamination runs without it.
    """
    selected = [get_eval_set(n).name for n in (EVAL_SETS if names is None else names)]
    unavailable: list[str] = []
    for name in selected:
        try:
            items = list(iter_items(name, root=root))
        except EvalSetUnavailable as exc:
            unavailable.append(name)
            log.debug("eval set %s unavailable: %s", name, exc)
            continue
        for item in items:
            yield name, item.id, item_text(item)
    if unavailable:  # one line for all of them; the reasons are on the debug log
        envs = sorted({e for n in unavailable if (e := EVAL_SETS[n].folder_env)})
        how = f"set {' or '.join('$' + e for e in envs)} to their files; " if envs else ""
        log.warning(
            "eval sets not available here, so not checked: %s (%ssee eval/README.md)",
            ", ".join(unavailable),
            how,
        )
