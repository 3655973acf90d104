"""In-loop benchmarks: the hook `kfm train` calls at every evaluation when eval.tasks is set.

kfm/train never imports eval/: kfm_cli builds the hook here (`build_hook`) and passes it to
``kfm.train.trainer.train(cfg, benchmark_hook=...)``, whose Evaluator calls ``hook(model, step)``
on every rank after the validation bits per byte, with the model in eval mode.

The hook wraps the live model (single-device or FSDP2/TP-sharded) in `eval.lm.KfmLM`, which
deals each batch of requests out over the data-parallel ranks in lockstep, and runs lm-eval on a
fixed subset: the first ``eval.task_limit`` items of each task, ``eval.task_fewshot`` shots from
a fixed-seed sample, so the numbers of two evaluations differ only by the weights. The tasks
are resolved and their data read once, when the hook is built (a bad name or missing data stops
``kfm train`` before the first step); lm-eval's global RNG seeding is switched off, so
evaluating leaves the training RNG streams as they were.

Metrics: ``bench/<task>/<metric>`` for every numeric metric lm-eval reports per task and group
(acc, acc_norm and their ``_stderr``...; a metric under a filter other than "none" is named
``<metric>_<filter>``).
"""

from __future__ import annotations

import math
from typing import Any

from kfm.config import Config, ConfigError
from kfm.train.callbacks import BenchmarkHook

FEWSHOT_SEED = 1234
"""Seed of the few-shot sample (lm-eval's default): the same shots at every evaluation."""


def bench_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` dict (per task or group: "acc,none", "acc_stderr,none"...) as
    ``{"bench/<task>/<metric>": value}``; non-numeric and non-finite entries are left out."""
    out: dict[str, float] = {}
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
    """The benchmark hook of ``cfg.eval`` (None when eval.tasks is empty or eval.interval is 0).

    ``tokenizer``: the run's (kfm.tokenizer.load_tokenizer of tokenizer.path). The hook scores
    with ``train.micro_batch_size`` rows per forward per data-parallel rank and windows of up to
    ``model.max_seq_len`` tokens. Every rank must build it and call it at the same steps.

    Raises:
        ConfigError: an unknown task name, or a task whose data cannot be read (naming
            eval.tasks).
        ImportError: lm-eval is not installed (kfm_cli names the kfm[eval] extra).
    """
    ec = cfg.eval
    if not ec.tasks or ec.interval == 0:
        return None
    import lm_eval

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
            raise ConfigError(
                f"eval.tasks: {e} (drop {name} from --eval.tasks, or make its data available)"
            ) from None
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
        metrics: dict[str, float] = {}
        for objects in loaded:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=ec.task_fewshot,
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,  # acc's stderr is closed-form whatever this is
                log_samples=False,
                task_manager=manager,
                random_seed=None,  # leave the training RNG streams alone
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=FEWSHOT_SEED,
            )
            if out is not None:  # rank 0; the others log nothing
                metrics |= bench_metrics(out)
        return metrics

    return hook
