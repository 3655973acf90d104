"""In-loop evaluation: bits per byte per source/language and benchmark hooks at every evaluation,
in metrics.jsonl, TensorBoard and the console; the real lm-eval hook (eval/inloop.py) on one
process and on two gloo ranks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kfm.config import ConfigError, load_config
from kfm.model.transformer import Transformer
from kfm.train.trainer import train
from tests.conftest import REPO, TOKENIZER, tiny_overrides
from tests.parallel.harness import run_train, shared_root

LANGS = {"medquad": "en", "ko_chatbot": "ko"}
TASKS = ("kfm_pubmedqa", "kfm_klue_nli")  # one English, one Korean; data under shared/data
BREAKDOWN = {"val_bpb/medquad", "val_bpb/ko_chatbot", "val_bpb/lang/en", "val_bpb/lang/ko"}


def _sources_flag(tiny_sources: list[dict]) -> str:
    entries = ", ".join(
        f"{{name: {s['name']}, path: '{s['path']}', weight: {s['weight']}, "
        f"language: {LANGS[s['name']]}}}"
        for s in tiny_sources
    )
    return f"--data.sources=[{entries}]"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tb_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_hook_runs_at_every_evaluation(tiny_sources, tmp_path, capsys) -> None:
    """A benchmark hook given to train() runs after the bpb breakdown at steps 0, interval and
    the last, on the model in eval mode; its metrics, the breakdown, tokens seen and the eval
    times land in metrics.jsonl, TensorBoard and one console line per evaluation."""
    overrides = tiny_overrides(tiny_sources, tmp_path, "hooked")
    overrides[0] = _sources_flag(tiny_sources)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*overrides, "--train.steps=3", "--eval.interval=2", "--logging.tensorboard=true"],
    )
    probe = torch.randint(
        0, cfg.model.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0)
    )
    calls: list[tuple[int, bool, float]] = []

    def hook(model: torch.nn.Module, step: int) -> dict[str, float]:
        # A real measurement of the live weights: next-token accuracy on a fixed random row.
        logits = model(probe[:, :-1])
        acc = (logits.argmax(-1) == probe[:, 1:]).float().mean().item()
        calls.append((step, model.training, acc))
        return {"bench/probe/acc": acc, "bench/probe/acc_stderr": 0.0, "bench/probe/n": 7}

    summary = train(cfg, benchmark_hook=hook)
    assert [(s, training) for s, training, _ in calls] == [(0, False), (2, False), (3, False)]
    evals = {r["step"]: r for r in _records(tmp_path / "hooked") if "val_bpb" in r}
    assert sorted(evals) == [0, 2, 3]
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    for step, _, acc in calls:
        record = evals[step]
        assert record.keys() >= BREAKDOWN
        assert record["bench/probe/acc"] == acc
        assert record["tokens"] == step * tokens_per_step
        assert record["val_time_s"] > 0 and record["bench_time_s"] > 0
    assert summary["last_eval"]["bench/probe/acc"] == calls[-1][2]
    assert BREAKDOWN | {"bench/probe/acc", "tokens", "val_bpb"} <= _tb_tags(tmp_path / "hooked")
    out = capsys.readouterr().out
    assert "validation bits/byte per language: en = medquad; ko = ko_chatbot" in out
    line = next(x for x in out.splitlines() if x.startswith("step 2/3 | val_loss"))
    assert f"lang en {evals[2]['val_bpb/lang/en']:.4f} ko {evals[2]['val_bpb/lang/ko']:.4f}" in line
    assert f"probe acc {calls[1][2]:.4f} |" in line and "acc_stderr" not in line
    assert "n 7" not in line  # item counts stay in metrics.jsonl


@pytest.fixture(scope="module")
def tiny_model_and_cfg(tiny_sources, tmp_path_factory):
    overrides = tiny_overrides(tiny_sources, tmp_path_factory.mktemp("inloop"), "x")
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*overrides, f"--eval.tasks=[{','.join(TASKS)}]", "--eval.task_limit=4"],
    )
    torch.manual_seed(0)
    return Transformer(cfg.model), cfg


def test_lm_eval_hook_is_repeatable_and_leaves_rng_alone(tiny_model_and_cfg) -> None:
    """eval.inloop's hook scores the first task_limit items: the same numbers twice on the same
    weights, one bench/<task>/acc per task, and the global RNG streams untouched."""
    pytest.importorskip("lm_eval")
    from eval.inloop import build_hook
    from kfm.tokenizer import load_tokenizer

    model, cfg = tiny_model_and_cfg
    hook = build_hook(cfg, load_tokenizer(TOKENIZER))
    assert hook is not None
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = hook(model, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == hook(model, 1)
    for task in TASKS:
        assert 0 <= first[f"bench/{task}/acc"] <= 1 and f"bench/{task}/acc_stderr" in first
        assert first[f"bench/{task}/n"] == cfg.eval.task_limit  # the items scored


@pytest.mark.slow  # an unknown name makes lm-eval index its ~15k task configs
def test_unknown_task_is_a_config_error(tiny_model_and_cfg) -> None:
    """build_hook refuses a task name lm-eval does not know, naming eval.tasks and the close
    names (kfm_cli builds the hook before training starts)."""
    pytest.importorskip("lm_eval")
    from eval.inloop import build_hook

    cfg = copy.deepcopy(tiny_model_and_cfg[1])
    cfg.eval.tasks = ["kfm_pubmedqaa"]
    with pytest.raises(ConfigError, match=r"eval.tasks=\['kfm_pubmedqaa'\].*kfm_pubmedqa.*--eval"):
        build_hook(cfg, None)
    cfg.eval.interval = 0  # no evaluation, no hook, nothing resolved
    assert build_hook(cfg, None) is None


def test_task_without_data_is_left_out(tiny_model_and_cfg, tmp_path, monkeypatch) -> None:
    """A task whose eval set is not on this machine (a fresh quickstart without the shared data)
    is left out with a warning naming it; with no task left there is no hook."""
    pytest.importorskip("lm_eval")
    from eval.inloop import build_hook
    from eval.registry import DATA_ROOT_ENV

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))  # an empty shared-data folder
    cfg = copy.deepcopy(tiny_model_and_cfg[1])
    cfg.eval.tasks = ["kfm_pubmedqa"]
    with pytest.warns(UserWarning, match="eval.tasks: kfm_pubmedqa is left out of in-loop"):
        assert build_hook(cfg, None) is None


def _bench_run(tiny_sources, tmp_path_factory, nproc: int):
    args = (
        _sources_flag(tiny_sources),
        "--train.steps=1",
        "--train.micro_batch_size=2",
        "--checkpoint.interval=0",
        f"--eval.tasks=[{','.join(TASKS)}]",
        "--eval.task_limit=6",
        "--logging.tensorboard=true",
    )
    return run_train(
        tiny_sources, shared_root(tmp_path_factory), f"inloop{nproc}", nproc=nproc, args=args
    )


@pytest.mark.distributed
def test_kfm_train_with_eval_tasks_one_and_two_ranks(tiny_sources, tmp_path_factory) -> None:
    """`kfm train --eval.tasks=[...]` logs bench/<task>/acc with the bpb breakdown at each
    evaluation (metrics.jsonl and TensorBoard). On two gloo ranks (each scores half of the
    requests) both ranks finish and the step-0 numbers (the same initial weights) equal the
    one-process run's."""
    pytest.importorskip("lm_eval")
    one = _bench_run(tiny_sources, tmp_path_factory, 0)
    two = _bench_run(tiny_sources, tmp_path_factory, 2)
    wanted = BREAKDOWN | {f"bench/{t}/{m}" for t in TASKS for m in ("acc", "acc_norm")}
    evals = {}
    for run in (one, two):
        evals[run] = {r["step"]: r for r in run.records() if "val_bpb" in r}
        assert sorted(evals[run]) == [0, 1]
        for record in evals[run].values():
            assert wanted <= record.keys(), sorted(record)
        assert wanted <= _tb_tags(run.run_dir)
    a, b = evals[one][0], evals[two][0]
    for key in sorted(wanted):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
