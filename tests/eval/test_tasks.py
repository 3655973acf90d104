"""kfm's lm-eval tasks are built from the registry: item counts, request shapes, dev-only few-shot,
KorMedMCQA's local/hub/absent paths, and the errors for unknown names and missing data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from eval.bench import BenchmarkError, chance_level, load_tasks, task_manager
from eval.registry import (
    EVAL_SETS,
    KORMEDMCQA_ENV,
    KORMEDMCQA_HUB,
    KORMEDMCQA_SAMPLE,
    EvalSetUnavailable,
    eval_texts,
    iter_items,
)
from kfm.config import ConfigError

pytest.importorskip("lm_eval")

TASK_SETS = {
    "kfm_pubmedqa": "pubmedqa",
    "kfm_medqa_4opt": "medqa_usmle",
    "kfm_medqa_5opt": "medqa_usmle_5opt",
    "kfm_medmcqa": "medmcqa",
    "kfm_mmlu_medical": "mmlu_medical",
    "kfm_klue_nli": "klue_nli",
    "kfm_xnli_ko": "xnli_ko",
    **{f"kfm_kormedmcqa_{s}": f"kormedmcqa_{s}" for s in ("doctor", "nurse", "pharm", "dentist")},
}
SAMPLE_SUBSETS = ("doctor", "nurse", "pharm", "dentist")


pytestmark = pytest.mark.usefixtures("sample_kormedmcqa")


@pytest.fixture(scope="module")
def loaded() -> dict:
    """Every kfm task built once (the sample KorMedMCQA rows stand in for the real set)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(KORMEDMCQA_ENV, str(KORMEDMCQA_SAMPLE))
    try:
        return task_manager(["kfm_all"]).load(["kfm_all"])
    finally:
        mp.undo()


def test_every_registry_set_has_a_task_with_its_test_items(loaded: dict) -> None:
    assert set(TASK_SETS.values()) == set(EVAL_SETS)
    assert set(loaded["tasks"]) == set(TASK_SETS)
    assert loaded["group_map"]["kfm_all"] == ["kfm_medical_en", "kfm_korean"]
    assert loaded["group_map"]["kfm_korean"] == ["kfm_klue_nli", "kfm_xnli_ko", "kfm_kormedmcqa"]
    for name, task in loaded["tasks"].items():
        items = list(iter_items(TASK_SETS[name]))
        test = [i for i in items if i.split == "test"]
        assert [d["id"] for d in task.eval_docs] == [i.id for i in test], name
        doc, item = task.eval_docs[0], test[0]
        assert task.doc_to_target(doc) == item.answer
        assert len(task.doc_to_choice(doc)) == len(item.choices)
        assert chance_level(task) == pytest.approx(
            sum(1 / len(i.choices) for i in test) / len(test)
        )


def test_requests_are_one_loglikelihood_per_choice(loaded: dict) -> None:
    for task in loaded["tasks"].values():
        task.set_config("num_fewshot", 0)
        task.build_all_requests(limit=2, rank=0, world_size=1)
        by_doc = Counter(inst.doc_id for inst in task.instances)
        assert by_doc == {
            0: len(task.eval_docs[0]["choices"]),
            1: len(task.eval_docs[1]["choices"]),
        }
        for inst in task.instances:
            assert inst.request_type == "loglikelihood"
            context, continuation = inst.args
            assert continuation.startswith(" ") and context == task.doc_to_text(
                task.eval_docs[inst.doc_id]
            )
    pqa = loaded["tasks"]["kfm_pubmedqa"]
    context, _ = pqa.instances[0].args
    assert context.startswith("Abstract: ") and context.endswith("\nAnswer:")
    assert [i.args[1] for i in pqa.instances[:3]] == [" yes", " no", " maybe"]
    nli = loaded["tasks"]["kfm_xnli_ko"]
    doc = nli.eval_docs[0]
    assert nli.doc_to_text(doc) == f"{doc['context']}, 맞죠?"
    assert nli.doc_to_choice(doc) == [f"{w}, {doc['question']}" for w in ("네", "또한", "아니요")]


@pytest.mark.parametrize("name", ["kfm_pubmedqa", "kfm_xnli_ko", "kfm_kormedmcqa_doctor"])
def test_fewshot_examples_come_from_dev_only(name: str) -> None:
    (task,) = load_tasks(task_manager([name]), name, num_fewshot=2)
    task.set_config("num_fewshot", 2)
    task.set_fewshot_seed(1234)
    items = list(iter_items(TASK_SETS[name]))
    dev_ids = {i.id for i in items if i.split == "dev"}
    test_questions = {i.id: i.question for i in items if i.split == "test"}
    assert dev_ids and {d["id"] for d in task.fewshot_docs()} <= dev_ids
    for doc in list(task.eval_docs)[:15]:
        shots = task.sampler.sample(n=2)
        assert len(shots) == 2 and all(s["id"] in dev_ids for s in shots)
        prompt = task.fewshot_context(doc, 2)
        others = [i for i, q in test_questions.items() if i != doc["id"] and q in prompt]
        # A different test item may share the question's wording (XNLI repeats hypotheses
        # across premises); what must never appear is another test item's own pair.
        assert all(test_questions[i] == doc["question"] for i in others), others


def test_fewshot_without_dev_split_is_refused() -> None:
    for name in ("kfm_medqa_4opt", "kfm_klue_nli", "kfm_medical_en"):
        with pytest.raises(BenchmarkError, match="no dev split"):
            load_tasks(task_manager([name]), name, num_fewshot=1)
    assert load_tasks(task_manager(["kfm_klue_nli"]), "kfm_klue_nli", num_fewshot=0)


def test_unknown_task_lists_close_names() -> None:
    with pytest.raises(ConfigError, match="kfm_medqa_4opt"):
        task_manager(["kfm_medqa"])
    with pytest.raises(ConfigError, match="not a folder"):
        task_manager(["kfm_all"], ["/nonexistent/tasks"])


def test_lm_eval_task_without_cached_data_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(BenchmarkError, match="task pubmedqa: .*bigbio/pubmed_qa.*--include-path"):
        load_tasks(task_manager(["pubmedqa"]), "pubmedqa", num_fewshot=None)


# ---- KorMedMCQA: local files, the hub reader, absent ----


def test_kormedmcqa_sample_rows_read_in_the_hub_schema() -> None:
    for subset in SAMPLE_SUBSETS:
        items = list(iter_items(f"kormedmcqa_{subset}"))
        assert Counter(i.split for i in items) == {"test": 5, "dev": 2}
        rows = [
            json.loads(line)
            for split in ("dev", "test")
            for line in (KORMEDMCQA_SAMPLE / subset / f"{split}.jsonl").read_text().splitlines()
        ]
        assert all(r["hand_written"] for r in rows)
        assert [i.answer_text for i in items] == [r["ABCDE"[r["answer"] - 1]] for r in rows]
    assert "NOT the real benchmark" in (KORMEDMCQA_SAMPLE / "README.md").read_text()


def test_kormedmcqa_hub_reader_calls_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setenv(KORMEDMCQA_ENV, str(tmp_path / "none"))
    rows = [
        json.loads(x) for x in (KORMEDMCQA_SAMPLE / "nurse/test.jsonl").read_text().split("\n") if x
    ]
    calls = []

    def fake_load_dataset(path: str, name: str) -> datasets.DatasetDict:
        calls.append((path, name))
        return datasets.DatasetDict(
            {
                "dev": datasets.Dataset.from_list(rows[:1]),
                "test": datasets.Dataset.from_list(rows),
                "fewshot": datasets.Dataset.from_list(rows[:1]),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = list(iter_items("kormedmcqa_nurse"))
    assert calls == [(KORMEDMCQA_HUB, "nurse")]
    assert [(i.id, i.split) for i in items] == [("dev-0", "dev")] + [
        (f"test-{k}", "test") for k in range(5)
    ]
    assert items[1].question == rows[0]["question"] and len(items[1].choices) == 5


def test_kormedmcqa_absent_is_a_clear_error_and_skipped_by_decontamination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KORMEDMCQA_ENV, str(tmp_path / "none"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(EvalSetUnavailable, match=f"kormedmcqa_pharm not found.*{KORMEDMCQA_HUB}"):
        list(iter_items("kormedmcqa_pharm"))
    with pytest.raises(EvalSetUnavailable, match=KORMEDMCQA_ENV):
        load_tasks(task_manager(["kfm_kormedmcqa_pharm"]), "kfm_kormedmcqa_pharm", num_fewshot=0)
    with caplog.at_level(logging.WARNING, logger="eval.registry"):
        names = {s for s, _, _ in eval_texts(["klue_nli", "kormedmcqa_pharm"])}
    assert names == {"klue_nli"}
    assert "not checked: kormedmcqa_pharm (" in caplog.text and KORMEDMCQA_ENV in caplog.text
