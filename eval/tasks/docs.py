"""Documents of kfm's lm-eval tasks, read through `eval.registry` (the sets decontamination checks).

Each YAML task in this folder names its registry set in ``dataset_kwargs: {eval_set: NAME}``;
lm-eval calls `registry_docs` (the task's ``custom_dataset``) with those kwargs and the task's
metadata. One document per `EvalItem`: id, split, question, context ("" if none), choices, answer.
"""

from __future__ import annotations

from typing import Any

import datasets

from eval.registry import EvalItem, iter_items

SPLITS = ("test", "dev")
"""Registry splits: "test" items are scored, "dev" items are the only few-shot pool."""


def item_doc(item: EvalItem) -> dict[str, Any]:
    """The lm-eval document of one registry item."""
    return {
        "id": item.id,
        "split": item.split,
        "question": item.question,
        "context": item.context or "",
        "choices": list(item.choices),
        "answer": item.answer,
    }


def registry_docs(*, eval_set: str, **_metadata: Any) -> datasets.DatasetDict:
    """The registry set eval_set as a DatasetDict with a "test" split and, when the set has dev
    items, a "dev" split. Other keyword arguments (the task's metadata) are ignored.

    Raises EvalSetUnavailable (KorMedMCQA without files or cache), FileNotFoundError (shared data
    missing) or KeyError (unknown set) from the registry.
    """
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for item in iter_items(eval_set):
        by_split[item.split].append(item_doc(item))
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_list(docs) for s, docs in by_split.items() if docs}
    )
