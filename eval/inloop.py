"""In-loop benchmarks: the hook `kfm train` calls at every evaluation when eval.tasks is set.

kfm/train never imports eval/: kfm_cli builds the hook here (`build_hook`) and passes it to
``kfm.train.trainer.train(cfg, benchmark_hook=...)``, whose Evaluator calls ``hook(model, step)``
on every rank after the validation bits per byte, with the model in eval mode.

The hook wraps the live model (single-device or FSDP2/TP-sharded) in `eval.lm.KfmLM`, which
deals each batch of requests out over the data-parallel ranks in lockstep, and runs lm-eval on a
fixed subset: the first ``eval.task_limit`` items of each task, ``eval.task_fewshot`` shots from
a fixed-seed sample, so the numbers of two evaluations differ only by the weights. The tasks
are resolved and their data read once, when the hook is built (a bad name stops ``kfm train``
before the first step; a task whose data is absent is left out with a warning). Each
evaluation runs lm-eval's ``evaluate`` on them, not ``simple_evaluate``, which would reseed the
global RNGs (the training's streams) and collect the environment each time.

Metrics: ``bench/<task>/<metric>`` for every numeric metric lm-eval reports per task and group
(acc, acc_norm and their ``_stderr``...; a metric under a filter other than "none" is named
``<metric>_<filter>``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from kfm.config import Config, ConfigError
from kfm.train.callbacks import BenchmarkHook

FEWSHOT_SEED = 1234
"""Seed of the few-shot sample (lm-eval's default): the same shots at every evaluation."""


def bench_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` dict (per task or group: "acc,none", "acc_stderr,none"...) as
    ``{"bench/<task>/<metric>": value}``; non-numeric and non-finite entries are left out.
    ``bench/<task>/n`` is the number of items scored (lm-eval's effective n-samples), from which
    `kfm report` draws a Wilson interval."""
    out: dict[str, float] = {}
    for task, counts in results.get("n-samples", {}).items():
        if isinstance(counts, dict) and isinstance(counts.get("effective"), int):
            out[f"bench/{task}/n"] = counts["effective"]
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            out[f"bench/{task}/{name}"] = float(value)
    return out


def build_hook(cfg: Config, tokenizer: Any) -> BenchmarkHook | None:
    """The benchmark hook of ``cfg.eval``: None when eval.tasks is empty, eval.interval is 0 or
    no task's data can be read. A task whose data cannot be read (its eval set is not on this
    machine) is left out with a warning naming it.

    ``tokenizer``: the run's (kfm.tokenizer.load_tokenizer of tokenizer.path). The hook scores
    with ``train.micro_batch_size`` rows per forward per data-parallel rank and windows of up to
    ``model.max_seq_len`` tokens. Every rank must build it and call it at the same steps.

    Raises:
        ConfigError: an unknown task name (naming eval.tasks and close names).
        ImportError: lm-eval is not installed (kfm_cli names the kfm[eval] extra).
    """
    ec = cfg.eval
    if not ec.tasks or ec.interval == 0:
        return None
    from lm_eval.evaluator import evaluate

    from eval.bench import BOOTSTRAP_ITERS, BenchmarkError, load_tasks, task_manager
    from eval.lm import KfmLM
    from eval.registry import EvalSetUnavailable

    try:
        manager = task_manager(ec.tasks)
    except ConfigError as e:
        raise ConfigError(
            f"eval.tasks={ec.tasks}: {str(e).removeprefix('--tasks: ')} (set --eval.tasks)"
        ) from None
    loaded = []
    for name in ec.tasks:
        try:
            loaded.append(load_tasks(manager, name, num_fewshot=ec.task_fewshot))
        except (BenchmarkError, EvalSetUnavailable) as e:
            # Data absent on this machine (a fresh quickstart without the shared eval sets): the
            # run goes on without the task rather than failing for an optional measurement.
            warnings.warn(
                f"eval.tasks: {name} is left out of in-loop evaluation: {e}", stacklevel=2
            )
    if not loaded:
        return None
    # Built once: lm-eval's task dict with the shots set as simple_evaluate would set them.
    # Each evaluation then calls lm-eval's evaluate() only: simple_evaluate would also reseed the
    # global RNGs and collect the environment (pip, nvidia-smi: ~1 s of subprocesses) each time.
    task_dict = manager.load([obj for objects in loaded for obj in objects])
    for task in task_dict["tasks"].values():
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=ec.task_fewshot)
    limit = ec.task_limit or None

    def hook(model: Any, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        lm = KfmLM.from_model(
            model,
            tokenizer,
            device=device,
            batch_size=cfg.train.micro_batch_size,
            max_length=cfg.model.max_seq_len,
            progress=False,
        )
        for task in task_dict["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same shots at every evaluation
        out = evaluate(
            lm=lm,
            task_dict=task_dict,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,  # acc's stderr is closed-form whatever this is
            log_samples=False,
        )
        return bench_metrics(out) if out is not None else {}  # None: not rank 0

    return hook
