"""Validation bits per byte per source and per language (kfm.train.validation), in `kfm eval`
(eval/run.py) and in the data pipeline's train.yaml (data.sources[].language)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.run import bpb_breakdown, checkpoint_bpb, validation_metrics
from kfm.config import ConfigError, DataSourceConfig, load_config
from kfm.data import validation_batches
from kfm.model.transformer import Transformer
from kfm.tokenizer import load_tokenizer, token_byte_lengths
from kfm.train.resume import classify
from kfm.train.validation import (
    bpb_metrics,
    describe_groups,
    evaluate,
    validation_sums,
)
from tests.conftest import REPO, TOKENIZER, tiny_overrides
from tests.eval.checks import STEP, tiny_run

BATCHES = 3  # micro_batch_size 4: 12 rows, round-robin over the two sources
CPU = torch.device("cpu")


def _cfg(tiny_sources: list[dict], tmp_path: Path, languages: dict[str, str]):
    sources = [{**s, "language": languages.get(s["name"])} for s in tiny_sources]
    flow = ", ".join(
        f"{{name: {s['name']}, path: '{s['path']}', weight: {s['weight']}"
        + (f", language: {s['language']}}}" if s["language"] else "}")
        for s in sources
    )
    overrides = tiny_overrides(tiny_sources, tmp_path, "bpb")
    overrides[0] = f"--data.sources=[{flow}]"
    return load_config(REPO / "configs" / "tiny.yaml", [*overrides, f"--eval.batches={BATCHES}"])


@pytest.fixture(scope="module")
def model_and_tok():
    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    torch.manual_seed(0)
    return Transformer(cfg.model), load_tokenizer(TOKENIZER)


def _metrics(model, tok, sources, batches, **kw) -> dict[str, float]:
    return evaluate(
        model,
        batches,
        token_bytes=token_byte_lengths(tok),
        bos_id=tok.bos_token_id,
        device=CPU,
        sources=sources,
        **kw,
    )


def test_per_source_equals_that_source_alone(tiny_sources, tmp_path, model_and_tok) -> None:
    """val_bpb/<source> is the bits per byte of exactly that source's rows of the validation set:
    evaluating the same windows of the source on their own gives the same number."""
    model, tok = model_and_tok
    cfg = _cfg(tiny_sources, tmp_path, {"medquad": "en", "ko_chatbot": "ko"})
    val = validation_batches(cfg.data.sources, seq_len=64, micro_batch_size=4, n_batches=BATCHES)
    rows = torch.cat([b.source_ids for b in val]).tolist()
    got = _metrics(model, tok, cfg.data.sources, val)
    for i, src in enumerate(cfg.data.sources):
        alone = validation_batches([src], seq_len=64, micro_batch_size=1, n_batches=rows.count(i))
        ref = _metrics(model, tok, [], alone)
        assert got[f"val_bpb/{src.name}"] == pytest.approx(ref["val_bpb"], rel=1e-12)
        assert got[f"val_bpb/lang/{src.language}"] == got[f"val_bpb/{src.name}"]
    # The overall figure is what evaluate() gave before sources were told apart.
    assert got["val_bpb"] == pytest.approx(_metrics(model, tok, [], val)["val_bpb"], rel=1e-12)
    assert got["val_tokens"] == sum(b.labels.numel() for b in val) - sum(
        int((b.labels == tok.bos_token_id).sum()) for b in val
    )


def test_group_sums_nats_and_bytes(tiny_sources, tmp_path, model_and_tok) -> None:
    """A language of two sources sums their nats and bytes: its figure is the overall one here,
    not the mean of the two sources' figures."""
    model, tok = model_and_tok
    cfg = _cfg(tiny_sources, tmp_path, {"medquad": "mul", "ko_chatbot": "mul"})
    val = validation_batches(cfg.data.sources, seq_len=64, micro_batch_size=4, n_batches=BATCHES)
    got = _metrics(model, tok, cfg.data.sources, val)
    assert got["val_bpb/lang/mul"] == pytest.approx(got["val_bpb"], rel=1e-12)
    mean = (got["val_bpb/medquad"] + got["val_bpb/ko_chatbot"]) / 2
    assert not math.isclose(got["val_bpb/lang/mul"], mean, rel_tol=1e-6)


def test_unknown_language_is_per_source_only(tiny_sources, tmp_path, model_and_tok) -> None:
    model, tok = model_and_tok
    cfg = _cfg(tiny_sources, tmp_path, {"medquad": "en"})
    val = validation_batches(cfg.data.sources, seq_len=64, micro_batch_size=4, n_batches=BATCHES)
    got = _metrics(model, tok, cfg.data.sources, val)
    assert {k for k in got if k.startswith("val_bpb/")} == {
        "val_bpb/medquad",
        "val_bpb/ko_chatbot",
        "val_bpb/lang/en",
    }
    assert describe_groups(cfg.data.sources) == (
        "validation bits/byte per language: en = medquad; "
        "per source only (no data.sources[].language): ko_chatbot"
    )


@pytest.mark.parametrize("dp_size", [2, 4, 5])
def test_data_parallel_shares_add_up(tiny_sources, tmp_path, model_and_tok, dp_size) -> None:
    """Each data-parallel rank sums every dp_size-th batch; a rank short of a batch runs a padding
    forward that counts for nothing. The ranks' sums add up to the single-rank sums."""
    model, tok = model_and_tok
    cfg = _cfg(tiny_sources, tmp_path, {})
    val = validation_batches(cfg.data.sources, seq_len=64, micro_batch_size=2, n_batches=5)
    kw = dict(n_sources=2, token_bytes=token_byte_lengths(tok), bos_id=tok.bos_token_id, device=CPU)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        whole = validation_sums(model, val, **kw)
        calls.clear()
        shares = [
            validation_sums(model, val, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)
        ]
    finally:
        hook.remove()
    assert len(calls) == dp_size * -(-len(val) // dp_size)  # same forwards on every rank
    torch.testing.assert_close(sum(shares), whole, rtol=1e-12, atol=0)
    assert bpb_metrics(sum(shares), cfg.data.sources)["val_bpb"] == pytest.approx(
        bpb_metrics(whole, cfg.data.sources)["val_bpb"], rel=1e-12
    )


def test_kfm_eval_reports_the_breakdown(tiny_sources, tmp_path_factory) -> None:
    """`kfm eval` (no --tasks) prints and records val_bpb per source; checkpoint_bpb gives the
    same figures as results.json's kfm.bpb, with "all" the overall one."""
    run = tiny_run(tiny_sources, tmp_path_factory)
    ckpt = run.checkpoint(2)
    proc = subprocess.run(
        [sys.executable, "-m", "kfm_cli", "eval", str(ckpt)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run.run_dir / "eval" / f"{STEP}.json").read_text())
    assert {"val_bpb/medquad", "val_bpb/ko_chatbot"} <= result.keys()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("bits/byte per source"))
    assert f"medquad {result['val_bpb/medquad']:.4f}" in line
    assert "no data.sources[].language: medquad, ko_chatbot" in proc.stdout
    kfm_bpb = checkpoint_bpb(ckpt)
    assert kfm_bpb == bpb_breakdown(result)
    assert kfm_bpb["all"] == result["val_bpb"] and kfm_bpb["medquad"] == result["val_bpb/medquad"]


def test_eval_data_dirs_keep_the_run_languages(tiny_sources, tmp_path, model_and_tok) -> None:
    """validation_metrics on the run's sources by default; `kfm eval --data DIR` sources take
    the language of the run's source at that path (eval.run.eval_sources)."""
    from eval.run import eval_sources

    model, tok = model_and_tok
    cfg = _cfg(tiny_sources, tmp_path, {"medquad": "en", "ko_chatbot": "ko"})
    got = validation_metrics(model, cfg, tok)
    assert {"val_bpb/lang/en", "val_bpb/lang/ko"} <= got.keys()
    given = eval_sources(cfg, [tiny_sources[1]["path"], str(tmp_path)])
    assert [s.language for s in given] == ["ko", None]


def test_language_config(tiny_sources, tmp_path) -> None:
    """data.sources[].language is a language code (it names a metric); changing it on resume
    applies (it only labels metrics)."""
    assert (
        _cfg(tiny_sources, tmp_path, {"medquad": "zh-hant"}).data.sources[0].language == "zh-hant"
    )
    with pytest.raises(ConfigError, match=r"data.sources\[0\].language='en/us'.*medquad"):
        _cfg(tiny_sources, tmp_path, {"medquad": "'en/us'"})
    assert classify("data.sources.medquad.language", backend="fsdp") == ("applies", "")
    assert classify("data.sources.medquad.weight", backend="fsdp")[0] == "refused"


def test_pipeline_train_yaml_languages(tmp_path) -> None:
    """The data pipeline's train.yaml gives a source the language of >= 95% of its curated
    documents, none when mixed (data_pipeline.steps.report)."""
    from data_pipeline.steps.report import source_language, train_config

    assert source_language({"languages": {"ko": 96, "en": 4}}) == "ko"
    assert source_language({"languages": {"ko": 90, "en": 10}}) is None
    assert source_language({"languages": {"unknown": 5}}) is None
    assert source_language({}) is None
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"vocab_size": 1024}))
    cfg = train_config(
        REPO / "configs" / "tiny.yaml",
        name="x",
        shards_dir=tmp_path,
        sources=[("a", 1.0), ("b", 2.0)],
        tokenizer=str(TOKENIZER),
        languages={"a": "en", "b": None},
    )
    assert cfg["data"]["sources"] == [
        {"name": "a", "path": str(tmp_path / "a"), "weight": 1.0, "language": "en"},
        {"name": "b", "path": str(tmp_path / "b"), "weight": 2.0},
    ]
    assert DataSourceConfig(**cfg["data"]["sources"][0]).language == "en"
