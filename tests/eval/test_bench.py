"""Real lm-eval runs on a tiny model: every kfm task, a user's YAML task, results.json and the
table, and `kfm eval --tasks` end to end on an HF folder and on a native checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.bench import STAND_IN_NOTE, markdown_table, run_benchmarks, write_results
from eval.registry import KORMEDMCQA_ENV, KORMEDMCQA_SAMPLE
from eval.run import EvalResultExistsError
from kfm_cli import main
from tests.conftest import TOKENIZER

pytest.importorskip("lm_eval")

KFM_TASKS = [
    "kfm_pubmedqa",
    "kfm_medqa_4opt",
    "kfm_medqa_5opt",
    "kfm_medmcqa",
    "kfm_mmlu_medical",
    "kfm_klue_nli",
    "kfm_xnli_ko",
    *(f"kfm_kormedmcqa_{s}" for s in ("doctor", "nurse", "pharm", "dentist")),
]


pytestmark = pytest.mark.usefixtures("sample_kormedmcqa")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the test tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_hf")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(hf_dir: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def results(lm) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setenv(KORMEDMCQA_ENV, str(KORMEDMCQA_SAMPLE))
    try:
        return run_benchmarks(lm, ["kfm_all"], limit=4)
    finally:
        mp.undo()


def test_every_kfm_task_runs_with_acc_acc_norm_and_stderr(results: dict) -> None:
    assert set(results["results"]) >= set(KFM_TASKS)
    for task in KFM_TASKS:
        metrics = results["results"][task]
        for m in ("acc", "acc_norm"):
            assert 0 <= metrics[f"{m},none"] <= 1
            assert isinstance(metrics[f"{m}_stderr,none"], float)
        assert results["n-samples"][task]["effective"] == 4
    assert "kfm_kormedmcqa" in results["groups"]  # size-weighted aggregate
    kfm = results["kfm"]
    assert kfm["tasks"] == ["kfm_all"] and kfm["limit"] == 4 and kfm["seconds"]["kfm_all"] > 0
    assert kfm["chance"]["kfm_pubmedqa"] == pytest.approx(1 / 3)
    assert kfm["chance"]["kfm_medqa_5opt"] == pytest.approx(1 / 5)
    assert kfm["chance"]["kfm_kormedmcqa"] == pytest.approx(1 / 5)
    assert "samples" not in results and set(results) >= {"configs", "versions", "n-shot"}


def test_table_and_results_file(results: dict, tmp_path: Path) -> None:
    table = markdown_table(results).splitlines()
    assert table[0] == "| task | metric | value ± stderr | chance | n |"
    pqa = results["results"]["kfm_pubmedqa"]
    row = (
        f"| kfm_pubmedqa | acc | {pqa['acc,none']:.4f} ± {pqa['acc_stderr,none']:.4f} "
        "| 0.3333 | 4 |"
    )
    assert row in table
    # acc, acc_norm per task + the group, then a blank line and the note on the sample rows
    assert len(table) == 2 + 2 * (len(KFM_TASKS) + 1) + 2
    assert table[-2:] == ["", STAND_IN_NOTE]

    path, replaced = write_results(tmp_path, "step_000010", results)
    assert path == tmp_path / "eval" / "step_000010" / "results.json" and not replaced
    assert json.loads(path.read_text())["results"] == json.loads(json.dumps(results["results"]))
    assert write_results(tmp_path, "step_000010", results) == (path, True)  # same settings
    other = {**results, "kfm": {**results["kfm"], "limit": 8}}
    hashed, _ = write_results(tmp_path, "step_000010", other)
    assert hashed.name.startswith("results-") and json.loads(path.read_text())["kfm"]["limit"] == 4
    with pytest.raises(EvalResultExistsError, match="other or unrecorded settings"):
        write_results(tmp_path, "x", other, out=path)


def test_user_yaml_task_on_a_local_json_file(lm, tmp_path: Path) -> None:
    rows = [{"q": f"Is {k} even?", "label": k % 2} for k in range(6)]
    (tmp_path / "data.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "my_task.yaml").write_text(
        "task: my_even\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {tmp_path / 'data.json'}}}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{q}}\\nAnswer:"\n'
        'doc_to_choice: ["yes", "no"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = run_benchmarks(lm, ["my_even"], include_path=[tmp_path])
    assert out["n-samples"]["my_even"]["effective"] == 6
    assert out["kfm"]["chance"]["my_even"] == 0.5


def test_cli_on_an_hf_folder(hf_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(hf_dir), "--tasks", "kfm_klue_nli", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "| kfm_klue_nli | acc |" in out
    saved = json.loads((hf_dir / "eval" / "results.json").read_text())
    assert saved["kfm"]["model"] == "hf" and saved["kfm"]["tasks"] == ["kfm_klue_nli"]
    assert main(["eval", str(hf_dir), "--limit", "2"]) == 2  # benchmark flag without --tasks


def test_cli_on_a_native_checkpoint(tiny_sources, tmp_path_factory, capsys) -> None:
    from tests.eval.checks import STEP, tiny_run

    run_dir = tiny_run(tiny_sources, tmp_path_factory).run_dir
    args = ["eval", str(run_dir), "--tasks", "kfm_pubmedqa,kfm_kormedmcqa", "--limit", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # the hand-written KorMedMCQA rows are marked as stand-ins, in the table and in results.json
    assert "| kfm_kormedmcqa_doctor † | acc |" in out and "| kfm_pubmedqa | acc |" in out
    assert "| kfm_kormedmcqa † | acc |" in out and STAND_IN_NOTE in out
    saved = json.loads((run_dir / "eval" / STEP / "results.json").read_text())
    kfm = saved["kfm"]
    assert (
        kfm["model"] == "native" and kfm["step"] == 2 and kfm["checkpoint"] == f"checkpoints/{STEP}"
    )
    manifest = json.loads((run_dir / "checkpoints" / STEP / "manifest.json").read_text())
    assert kfm["tokenizer_hash"] == manifest["tokenizer_hash"]
    assert set(kfm["seconds"]) == {"kfm_pubmedqa", "kfm_kormedmcqa"}
    assert kfm["stand_ins"] == sorted(
        f"kfm_kormedmcqa_{s}" for s in ("doctor", "nurse", "pharm", "dentist")
    )
    # bits per byte per source and language, as plain `kfm eval` (no --tasks) reports them
    assert main(["eval", str(run_dir)]) == 0
    bpb_file = json.loads((run_dir / "eval" / f"{STEP}.json").read_text())
    assert kfm["bpb"]["all"] == pytest.approx(bpb_file["val_bpb"], rel=1e-9)
    for key, value in bpb_file.items():
        if key.startswith("val_bpb/"):
            assert kfm["bpb"][key.removeprefix("val_bpb/")] == pytest.approx(value, rel=1e-9)
    assert {"medquad", "ko_chatbot", "all"} <= set(kfm["bpb"]), kfm["bpb"]


@pytest.mark.distributed
def test_cli_under_torchrun_shards_the_model_and_matches_one_process(
    tiny_sources, tmp_path_factory, tmp_path
) -> None:
    """`torchrun --nproc-per-node 2 kfm eval --tasks`: the model FSDP2-sharded over both gloo
    ranks, rank 0 writes the same scores and bits per byte as a single-process run."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.eval.checks import tiny_run

    run_dir = tiny_run(tiny_sources, tmp_path_factory).run_dir
    flags = ["--tasks", "kfm_pubmedqa,kfm_medqa_4opt", "--limit", "6", "--batch-size", "4"]
    assert main(["eval", str(run_dir), *flags, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [
        *torchrun,
        "-m",
        "kfm_cli",
        "eval",
        str(run_dir),
        *flags,
        "--out",
        str(tmp_path / "two.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| kfm_pubmedqa | acc |") == 1  # rank 0 alone prints the table
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["kfm"]["world_size"] == 2 and "world_size" not in one["kfm"]
    for task in ("kfm_pubmedqa", "kfm_medqa_4opt"):
        for metric in ("acc,none", "acc_norm,none"):
            assert two["results"][task][metric] == one["results"][task][metric], (task, metric)
    for key, value in one["kfm"]["bpb"].items():
        assert two["kfm"]["bpb"][key] == pytest.approx(value, rel=1e-5), key
