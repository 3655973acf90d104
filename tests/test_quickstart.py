"""The README's first command, end to end (slow: ~4 minutes on 2 cores).

Runs scripts/quickstart.sh with fewer training steps in this checkout; it writes
runs/quickstart/ (git-ignored), replacing a previous quickstart run there.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_script_end_to_end():
    out = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--train.steps=120", "--eval.interval=60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    before, after = map(
        float, re.search(r"validation bits/byte: ([\d.]+) .*-> ([\d.]+)", log).groups()
    )
    assert after < before - 0.5, (before, after)  # bits per byte falls clearly
    assert re.search(r"fertility \(characters per token\) (ko|en) [\d.]+, (ko|en) [\d.]+", log)
    assert re.search(r"export check: max \|logits_kfm - logits_hf\| = \S+ .*: ok", log)
    samples = re.findall(r"^\[greedy\] .+ -> .+$", log, flags=re.M)
    assert len(samples) == 2

    run = REPO / "runs" / "quickstart"
    # in-loop evaluation: bits/byte per source and language, and the benchmark subset, at every
    # eval step (0, 60, 120) in metrics.jsonl and TensorBoard
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 60, 120]
    for r in evals:
        assert {"val_bpb/lang/en", "val_bpb/lang/ko"} <= set(r)
        assert {"bench/kfm_pubmedqa/acc", "bench/kfm_klue_nli/acc"} <= set(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"val_bpb/lang/ko", "bench/kfm_klue_nli/acc"} <= set(acc.Tags()["scalars"])
    # every kfm task in the benchmark table, then results.json; the console ends with the
    # report's path
    table = {m.group(1) for m in re.finditer(r"^\| (kfm_\w+)(?: †)? \| acc \|", log, flags=re.M)}
    expected = {
        "kfm_pubmedqa", "kfm_medqa_4opt", "kfm_medqa_5opt", "kfm_medmcqa", "kfm_mmlu_medical",
        "kfm_klue_nli", "kfm_xnli_ko", "kfm_kormedmcqa_doctor", "kfm_kormedmcqa_nurse",
        "kfm_kormedmcqa_pharm", "kfm_kormedmcqa_dentist",
    }  # fmt: skip
    assert expected <= table, table
    results = json.loads((run / "eval" / "step_000120" / "results.json").read_text())
    assert expected <= set(results["results"])
    report = run / "report" / "report.md"
    assert "benchmarks.png" in report.read_text() and (run / "report" / "loss.png").is_file()
    assert log.rstrip().splitlines()[-1].endswith("report: runs/quickstart/report/report.md)")
