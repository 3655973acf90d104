"""Benchmarks through lm-evaluation-harness: kfm's tasks (eval/tasks), lm-eval's own and a user's.

`run_benchmarks` runs lm-eval's `simple_evaluate` once per requested task or group (so each gets
its wall time), after three checks lm-eval does not make:

- every name exists (else a config error listing close names);
- its data can be read (else an error naming the task and what it needs, no traceback);
- few-shot examples never come from the scored split: a task with no separate few-shot split
  (training, validation or fewshot) refuses ``num_fewshot > 0`` instead of lm-eval's fallback of
  sampling other test items.

kfm's tasks are indexed alone (~1 s); lm-eval's ~15k task configs are indexed (~6 s) only when a
name is not one of ours or the user's (--include-path).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.registry import EvalSetUnavailable
from eval.run import EvalResultExistsError
from eval.tasks import TASKS_DIR
from kfm.config import ConfigError
from kfm.fs import atomic_write_text

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

LM_EVAL_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)
"""Keys of lm-eval's result dict kept in results.json (samples and environment dumps dropped)."""
BOOTSTRAP_ITERS = 100
"""lm-eval's bootstrap draws: acc and acc_norm get closed-form stderr whatever this is; only
metrics without one (F1, BLEU...) are bootstrapped, and 100 draws keep that cheap on CPU."""
SETTINGS_KEYS = ("tasks", "limit", "num_fewshot", "model", "tokenizer_hash")
"""The "kfm" entries that make two results comparable (see `write_results`)."""


class BenchmarkError(RuntimeError):
    """A benchmark cannot run: its data is missing or its few-shot pool is the test split."""


def task_manager(names: Sequence[str], include_path: Sequence[str | Path] = ()) -> TaskManager:
    """An lm-eval TaskManager that knows every name in names: kfm's tasks and include_path first,
    lm-eval's own tasks added only when needed.

    Raises:
        ConfigError: a name is unknown (the message lists close names) or an include path is not
            a folder.
    """
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path {p}: not a folder of lm-eval task YAML files")
    paths = [str(TASKS_DIR), *map(str, include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = [
            f"{n!r} (close: {', '.join(difflib.get_close_matches(n, manager.all_tasks, n=5)) or 'none'})"
            for n in unknown
        ]
        raise ConfigError(
            f"--tasks: unknown task or group {'; '.join(hints)}; kfm's are "
            f"{', '.join(n for n in manager.all_tasks if n.startswith('kfm_'))} (eval/README.md)"
        )
    return manager


def load_tasks(manager: TaskManager, name: str, *, num_fewshot: int | None) -> list[Any]:
    """The Task/Group objects of name, built (data read) and checked for a safe few-shot pool.

    Raises:
        BenchmarkError: the data of name cannot be read, or num_fewshot > 0 would sample
            few-shot examples from the scored split.
        EvalSetUnavailable: a kfm task's registry set is absent (KorMedMCQA without files).
    """
    try:
        loaded = manager.load([name])
    except EvalSetUnavailable:
        raise
    except OSError as exc:  # datasets: offline without a cache, no network, missing data files
        raise BenchmarkError(
            f"task {name}: its data could not be loaded ({type(exc).__name__}: {exc}); lm-eval "
            "tasks read Hugging Face datasets: run once with network access (HF_DATASETS_OFFLINE "
            "unset) to fill the datasets cache, or give a task YAML reading local files with "
            "--include-path"
        ) from None
    for task_name, task in loaded["tasks"].items():
        shots = _shots(task, num_fewshot)
        if shots > 0 and fewshot_split(task) == scored_split(task):
            raise BenchmarkError(
                f"task {task_name}: --num-fewshot {shots} would take few-shot examples from "
                f"{scored_split(task)!r}, the split it scores (lm-eval's fallback); it has no dev "
                "split here: use --num-fewshot 0, or give it a separate few-shot split"
            )
    groups = loaded.get("groups", {})
    return [groups[name]] if name in groups else list(loaded["tasks"].values())


def _shots(task: Task, num_fewshot: int | None) -> int:
    # simple_evaluate's rule: --num-fewshot overrides the config unless the config pins 0.
    configured = task.get_config("num_fewshot")
    if num_fewshot is not None and configured != 0:
        return num_fewshot
    return configured or 0


def scored_split(task: Task) -> str | None:
    """The split lm-eval scores: test_split, else validation_split."""
    return task.config.test_split or task.config.validation_split


def fewshot_split(task: Task) -> str | None:
    """The split lm-eval samples few-shot examples from (None: listed samples in the config)."""
    cfg = task.config
    if cfg.fewshot_split:
        return cfg.fewshot_split
    if isinstance(cfg.fewshot_config, dict) and cfg.fewshot_config.get("samples") is not None:
        return None
    return cfg.training_split or cfg.validation_split or cfg.test_split


def chance_level(task: Task, n_docs: int | None = None) -> float | None:
    """Expected accuracy of a uniform random guess over the first n_docs scored documents
    (default all): the mean of 1/len(choices). None for tasks that are not multiple choice."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    docs = task.eval_docs
    count = len(docs) if n_docs is None else min(n_docs, len(docs))
    if count == 0:
        return None
    return sum(1 / len(task.doc_to_choice(docs[i])) for i in range(count)) / count


def run_benchmarks(
    lm: LM,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: Sequence[str | Path] = (),
    batch_size: int | None = None,
) -> dict[str, Any] | None:
    """Run lm-eval tasks or groups on lm and return lm-eval's results plus a "kfm" entry.

    limit: first N documents per task (lm-eval's --limit; for tests and smoke runs).
    num_fewshot: shots per prompt, drawn from the task's few-shot split (never the scored one).
    include_path: folders of the user's own lm-eval task YAML files.
    batch_size: recorded in lm-eval's config; the LM was built with its own batch size.

    The "kfm" entry holds tasks, limit, num_fewshot, chance ({task: chance accuracy}) and seconds
    ({requested name: wall seconds}); a group with an aggregate score gets the size-weighted
    chance of its tasks and its total n in "n-samples". Every rank of a sharded model must call this in lockstep;
    ranks other than 0 get None (as from lm-eval's simple_evaluate).

    Raises:
        ConfigError: unknown task name, no tasks, or num_fewshot/limit < 0.
        BenchmarkError, EvalSetUnavailable: data missing, or a few-shot pool that is the test set.
    """
    import lm_eval

    if not tasks:
        raise ConfigError("--tasks: give at least one task or group, e.g. --tasks kfm_all")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be >= 0")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1 (documents per task)")
    manager = task_manager(tasks, include_path)
    merged: dict[str, Any] = {}
    chance: dict[str, float] = {}
    seconds: dict[str, float] = {}
    stand_ins: list[str] = []
    for name in tasks:
        objects = load_tasks(manager, name, num_fewshot=num_fewshot)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=objects,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            task_manager=manager,
        )
        seconds[name] = round(time.perf_counter() - start, 3)
        if out is None:  # not rank 0
            continue
        for key in LM_EVAL_KEYS:
            merged.setdefault(key, {}).update(out.get(key) or {})
        for task in _leaves(objects):
            n = out["n-samples"].get(task.task_name, {}).get("effective")
            level = chance_level(task, n)
            if level is not None:
                chance[task.task_name] = level
            if _reads_stand_in(task):
                stand_ins.append(task.task_name)
    if not merged:
        return None
    for group in merged.get("groups", {}):
        leaves = _group_leaves(merged.get("group_subtasks", {}), group)
        sizes = {t: merged["n-samples"].get(t, {}).get("effective", 0) for t in leaves}
        if leaves and all(t in chance for t in leaves) and sum(sizes.values()):
            total = sum(sizes.values())
            chance[group] = sum(chance[t] * sizes[t] for t in leaves) / total
            merged["n-samples"][group] = {"effective": total}
    merged["kfm"] = {
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "chance": chance,
        "seconds": seconds,
        "stand_ins": sorted(stand_ins),
    }
    return merged


def _reads_stand_in(task: Task) -> bool:
    """The task reads the hand-written KorMedMCQA sample rows (eval/data/kormedmcqa_sample), which
    stand in for the real set (CC BY-NC, not bundled): its score says nothing of a model."""
    from eval.registry import KORMEDMCQA_SAMPLE, get_eval_set, local_path

    name = (task.config.dataset_kwargs or {}).get("eval_set")
    if not name:
        return False
    try:
        path = local_path(get_eval_set(name)).resolve()
    except (KeyError, FileNotFoundError):
        return False
    return path.is_relative_to(KORMEDMCQA_SAMPLE.resolve()) and path.exists()


def _group_leaves(subtasks: dict[str, list[str]], group: str) -> list[str]:
    leaves: list[str] = []
    for child in subtasks.get(group, []):
        leaves += _group_leaves(subtasks, child) if child in subtasks else [child]
    return leaves


def _leaves(objects: list[Any]) -> list[Task]:
    from lm_eval.api.group import Group

    tasks: list[Task] = []
    for obj in objects:
        tasks.extend(obj.get_all_tasks() if isinstance(obj, Group) else [obj])
    return tasks


def completeness(path: Path, results: dict[str, Any]) -> tuple[bool, int, bool]:
    """Sort key of a step's results files, most complete last: a result of whole sets (no
    --limit) over a limited one, a larger limit over a smaller one, then ``results.json`` (the
    default settings) over ``results-<hash>.json``."""
    limit = results.get("kfm", {}).get("limit")
    return (limit is None, limit if isinstance(limit, int) else 0, path.name == "results.json")


def most_complete_results(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The most complete (`completeness`) of ``folder/results*.json`` and its contents; None if
    there is none. Files that are not JSON objects are passed over."""
    found = []
    for path in sorted(folder.glob("results*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append((completeness(path, data), path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda item: item[0])
    return path, data


def settings_of(results: dict[str, Any]) -> dict[str, Any]:
    """What must match for two results to be the same computation: tasks, limit, num_fewshot,
    model and tokenizer_hash of the "kfm" entry."""
    kfm = results.get("kfm", {})
    return {k: kfm.get(k) for k in SETTINGS_KEYS}


def result_path(folder: Path, results: dict[str, Any]) -> Path:
    """``folder/results.json`` if absent or holding the same settings, else
    ``folder/results-<8 hex of sha256(settings)>.json`` (an earlier result is never replaced)."""
    default = folder / "results.json"
    if not default.exists() or _settings_in(default) == settings_of(results):
        return default
    blob = json.dumps(settings_of(results), sort_keys=True).encode()
    return folder / f"results-{hashlib.sha256(blob).hexdigest()[:8]}.json"


def _settings_in(path: Path) -> dict[str, Any] | None:
    try:
        return settings_of(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def write_results(
    run_dir: str | Path,
    step_dir_name: str,
    results: dict[str, Any],
    *,
    out: str | Path | None = None,
) -> tuple[Path, bool]:
    """Write results atomically to ``<run_dir>/eval/<step_dir_name>/`` (`result_path` picks the
    file) or to out; return (path, replaced), replaced when an earlier result of the same settings
    was replaced.

    Raises:
        EvalResultExistsError: out (or a hashed name) holds a result of other or unrecorded
            settings; it is kept.
    """
    path = Path(out) if out else result_path(Path(run_dir) / "eval" / step_dir_name, results)
    replaced = path.exists()
    if replaced and _settings_in(path) != settings_of(results):
        raise EvalResultExistsError(
            f"{path} holds a result of other or unrecorded settings; it is kept, not replaced: "
            "move or delete it, or write elsewhere with --out"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    return path, replaced


def markdown_table(results: dict[str, Any]) -> str:
    """results as a Markdown table: task | metric | value ± stderr | chance | n, one row per
    task (and group) and metric, in lm-eval's order."""
    chance = results.get("kfm", {}).get("chance", {})
    stand_ins = set(results.get("kfm", {}).get("stand_ins", []))
    subtasks = results.get("group_subtasks", {})
    stand_ins |= {g for g in subtasks if set(_group_leaves(subtasks, g)) & stand_ins}
    n_samples = results.get("n-samples", {})
    rows = ["| task | metric | value ± stderr | chance | n |", "|---|---|---|---|---|"]
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            if section == "groups" and task in results.get("results", {}):
                continue  # lm-eval lists a group with an aggregate in both sections
            for key, value in metrics.items():
                metric, _, flt = key.partition(",")
                skip = metric in ("alias", "sample_len") or metric.endswith("_stderr")
                if skip or not _number(value):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{flt}")
                shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if _number(stderr) else "")
                level = chance.get(task)
                n = n_samples.get(task, {}).get("effective", "")
                mark = " †" if task in stand_ins else ""
                rows.append(
                    f"| {task}{mark} | {metric} | {shown} | "
                    f"{'' if level is None else f'{level:.4f}'} | {n} |"
                )
    if stand_ins:
        rows += ["", STAND_IN_NOTE]
    return "\n".join(rows)


STAND_IN_NOTE = (
    "† scored on hand-written sample rows in the set's schema (eval/data/kormedmcqa_sample), "
    "not the real set: a check that the task runs, not a score of the model"
)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
