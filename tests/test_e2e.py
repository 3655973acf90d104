"""The whole slice through the public CLI on tiny data: train -> eval -> export -> transformers."""

from __future__ import annotations

import json

import pytest
import torch

from kfm.checkpoint import load_model_state
from kfm.config import config_from_dict
from kfm.data import validation_batches
from kfm.model.transformer import Transformer
from kfm_cli import main
from tests.conftest import REPO, tiny_overrides

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained_run(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", TINY, *tiny_overrides(tiny_sources, root, "e2e")]) == 0
    return root / "e2e"


def test_run_directory_records_provenance(trained_run):
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["git_commit"] and len(info["git_commit"]) == 40
    assert isinstance(info["git_dirty"], bool)
    assert info["packages"]["torch"].startswith("2.")
    resolved = (trained_run / "config.yaml").read_text()
    assert "name: e2e" in resolved and "d_model: 64" in resolved
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    steps = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s_global"] > 0 and r["peak_memory_gb"] > 0 for r in steps)


def test_eval_command_reports_bits_per_byte(trained_run, capsys):
    assert main(["eval", str(trained_run)]) == 0
    assert "bits/byte" in capsys.readouterr().out
    result = json.loads((trained_run / "eval" / "step_000020.json").read_text())
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_bpb" in r][-1]
    assert result["val_bpb"] == pytest.approx(last["val_bpb"], rel=1e-6)


def test_export_loads_in_transformers_with_matching_logits(trained_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert ": ok" in capsys.readouterr().out
    state, config = load_model_state(trained_run / "checkpoints" / "step_000020")
    cfg = config_from_dict(config)
    model = Transformer(cfg.model)
    model.load_state_dict(state)
    batch = validation_batches(cfg.data.sources, seq_len=cfg.data.seq_len,
                               micro_batch_size=2, n_batches=1)[0]  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(batch.tokens) - hf(input_ids=batch.tokens).logits).abs().max().item()
    assert diff <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("Insulin lowers blood glucose.", "당뇨병은 혈당이 높은 상태입니다."):
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_model_vocab_mismatch_is_a_clear_error(tiny_sources, tmp_path, capsys):
    args = [*tiny_overrides(tiny_sources, tmp_path, "small_vocab"), "--model.vocab_size=512"]
    assert main(["train", TINY, *args]) == 2
    err = capsys.readouterr().err
    assert "has 1024 tokens but model.vocab_size=512" in err and "--model.vocab_size" in err


def test_checkpoint_from_another_config_is_refused(trained_run, capsys):
    config = (trained_run / "config.yaml").read_text()
    assert main(["train", str(trained_run / "config.yaml"), "--train.steps=30",
                 "--model.d_model=96", "--model.n_heads=4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "model.d_model: 64 -> 96 (cannot change mid-run" in err
    assert "--checkpoint.force_resume=true" in err
    assert (trained_run / "config.yaml").read_text() == config  # the refused config is not recorded


def test_bf16_and_loggers(tiny_sources, tmp_path):
    args = tiny_overrides(tiny_sources, tmp_path, "bf16")
    assert main(["train", TINY, *args, "--train.dtype=bf16", "--train.steps=4",
                 "--logging.tensorboard=true", "--logging.wandb=true", "--optim.z_loss=1e-4",
                 "--eval.interval=2"]) == 0  # fmt: skip
    run = tmp_path / "bf16"
    losses = [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(x is None or x == x for x in losses)  # no NaN
    assert list((run / "tb").glob("events.out.tfevents.*"))
    first = list((run / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    # A restart (resume, Slurm requeue) logs into the same wandb run, not a new one.
    assert main(["train", TINY, *args, "--train.dtype=bf16", "--train.steps=6",
                 "--logging.wandb=true", "--eval.interval=0"]) == 0  # fmt: skip
    runs = sorted((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_id").read_text().strip()
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)
