"""`kfm report`: plots and report.md of two real tiny runs that differ in optim.lr, a hand-built
run (resume, NaN, a cut-off line, two world sizes, in-loop benchmarks), the 95% intervals of a
hand-built results file, and the input/output checks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from eval.report import load_run, write_report
from eval.report.scores import Z95, wilson_interval
from kfm.config import dump_yaml, load_config
from kfm.model.flops import flops_per_token
from kfm_cli import main
from tests.conftest import REPO
from tests.parallel.harness import run_train

ARGS = ("--train.steps=6", "--eval.interval=3", "--checkpoint.interval=6")
TOKENS_PER_STEP = 8 * 64  # configs/tiny.yaml: global_batch_size x seq_len
COLOURS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E)}  # matplotlib's first two
CARD_WARNING = "> **WARNING: non-commercial sources included: ko_chatbot.** (hand-written card)"


def results_file(step: int, *, p: float, n: int, f1: float, f1_stderr: float) -> dict:
    """A results.json in the contract's format (lm-eval's dict + "kfm"), values chosen here."""
    tasks = ["kfm_pubmedqa", "kfm_klue_nli"]
    return {
        "results": {
            "kfm_pubmedqa": {
                "alias": "kfm_pubmedqa",
                "acc,none": p,
                "acc_stderr,none": 0.07,
                "acc_norm,none": p,
                "acc_norm_stderr,none": "N/A",
            },
            "kfm_klue_nli": {"alias": "kfm_klue_nli", "f1,none": f1, "f1_stderr,none": f1_stderr},
        },
        "configs": {t: {"task": t} for t in tasks},
        "versions": {t: 1.0 for t in tasks},
        "n-shot": {t: 0 for t in tasks},
        "higher_is_better": {t: {"acc": True} for t in tasks},
        "n-samples": {t: {"original": 500, "effective": n} for t in tasks},
        "kfm": {
            "step": step,
            "tokens": step * TOKENS_PER_STEP,
            "checkpoint": f"checkpoints/step_{step:06d}",
            "tokenizer_hash": "0" * 64,
            "model": "native",
            "tasks": tasks,
            "limit": n,
            "num_fewshot": 0,
            "chance": {"kfm_pubmedqa": 1 / 3, "kfm_klue_nli": 1 / 3},
            "seconds": {t: 1.0 for t in tasks},
        },
    }


def write_results(run_dir: Path, step: int, data: dict) -> None:
    path = run_dir / "eval" / f"step_{step:06d}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def runs(tiny_sources, tmp_path_factory) -> tuple[Path, Path]:
    """Two 6-step tiny runs, optim.lr 4e-3 (the preset) and 1e-3; the first has a results file
    at step 6 and a data card where the quickstart puts it (RUN/data/DATA_CARD.md)."""
    root = tmp_path_factory.mktemp("report_runs")
    high = run_train(tiny_sources, root, "lr_high", nproc=0, args=ARGS).run_dir
    low = run_train(tiny_sources, root, "lr_low", nproc=0, args=(*ARGS, "--optim.lr=1e-3")).run_dir
    write_results(high, 6, results_file(6, p=0.6, n=50, f1=0.41, f1_stderr=0.05))
    (high / "data").mkdir()
    (high / "data" / "DATA_CARD.md").write_text(f"# corpus\n\n{CARD_WARNING}\n")
    return high, low


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def panels_px(n: int) -> tuple[int, int]:
    """Pixel size of a figure of n panels: 640 x 360 each (6.4 x 3.6 in at 100 dpi), <= 3 wide."""
    cols = min(n, 3)
    return 640 * cols, 360 * math.ceil(n / cols)


def has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    pixels = (image[..., :3] * 255).round()
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 3).any())


def table_rows(md: str, heading: str, table: int = 0) -> list[list[str]]:
    """The cells of the rows (header and rule left out) of the ``table``-th table of a section."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"(?:^\|.*\n)+", section, flags=re.M)
    rows = tables[table].splitlines()[2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_report_of_two_runs(runs, capsys):
    import matplotlib.image

    high, low = runs
    assert main(["report", str(high), str(low), "--labels", "high,low"]) == 0
    out = high / "report"  # the default: FIRST_RUN_DIR/report
    assert f"report: {out / 'report.md'} with 6 plot(s)" in capsys.readouterr().out
    md = (out / "report.md").read_text()

    # Every plot: a PNG of the size its panel count gives, not blank, both runs drawn.
    bpb_keys = {k for d in (high, low) for r in records(d) for k in r if k.startswith("val_bpb")}
    expected = {
        "loss.png": 1,
        "lr.png": 1,
        "grad_norm.png": 1,
        "throughput.png": 2,  # per device, global
        "val_bpb.png": len(bpb_keys),  # all sources, then per source / language as logged
        "benchmarks.png": 2,  # the two tasks of the results file (run "high" only)
    }
    marker = json.loads((out / "kfm_report.json").read_text())
    assert marker["plots"] == list(expected)
    for name, n_panels in expected.items():
        image = matplotlib.image.imread(out / name)
        assert image.shape[1::-1] == panels_px(n_panels), name
        assert image[..., :3].var() > 0, name
        assert has_colour(image, COLOURS["C0"]), f"{name}: run high not drawn"
        if name != "benchmarks.png":
            assert has_colour(image, COLOURS["C1"]), f"{name}: run low not drawn"
        assert f"]({name})" in md

    # Links resolve from the report folder (plots, run paths, data card).
    for target in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / target).exists(), target
    runs_rows = table_rows(md, "Runs and compute")
    assert [(out / r[1].strip("`")).resolve() for r in runs_rows] == [high.resolve(), low.resolve()]

    # Config diff: the differing keys with both values, no equal key.
    diff = {r[0].strip("`"): r[1:] for r in table_rows(md, "Config differences")}
    assert diff["optim.lr"] == ["`0.004`", "`0.001`"]
    assert diff["train.name"] == ["`lr_high`", "`lr_low`"]
    # (the harness traces each run's batches into a folder of its own: debug.trace_batches)
    assert set(diff) == {"optim.lr", "train.name", "debug.trace_batches"}

    # Compute: steps, tokens, FLOPs = flops_per_token x tokens, device-hours from the step times.
    cfg = load_config(REPO / "configs/tiny.yaml")
    row = runs_rows[0]
    assert row[0] == "high" and row[2] == "finished" and row[3] == "6"
    tokens = 6 * TOKENS_PER_STEP
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    assert row[4] == f"{tokens / 1e3:.3g} k"
    assert row[8] == row[9] == f"{flops / 1e9:.3g} G"  # one device: global = per device
    train = sorted((r for r in records(high) if "loss" in r), key=lambda r: r["step"])
    steps = [0] + [r["step"] for r in train]
    seconds = sum(
        r["step_time_s"] * (s - prev)
        for r, s, prev in zip(train, steps[1:], steps[:-1], strict=True)
    )
    assert row[6] == "1" and row[7] == f"{seconds / 3600:.3g}"
    assert "*device-hours* = each window's time x its world size" in md

    # Final scores with Wilson intervals (n=50 from n-samples) and chance.
    scores = {(r[0], r[1]): r for r in table_rows(md, "Benchmark scores")}
    lo, hi = wilson_interval(0.6, 50)
    assert scores[("kfm_pubmedqa", "acc")][2:] == [
        "0.3333",
        f"0.6000 [{lo:.4f}, {hi:.4f}], n=50",
        "",
    ]

    # Data: the sources' manifests and the data card with its warning.
    assert "[DATA_CARD.md](../data/DATA_CARD.md)" in md and CARD_WARNING in md
    assert {r[1] for r in table_rows(md, "Data")} == {"medquad", "ko_chatbot"}

    # A rerun replaces the report, with the same bytes.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["report", str(high), str(low), "--labels", "high,low"]) == 0
    assert "(replaced the earlier report)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_report_refuses_bad_inputs_and_outputs(runs, tiny_sources, tmp_path, capsys):
    high, low = runs
    shard_set = tiny_sources[0]["path"]
    assert main(["report", str(high), shard_set]) == 1
    assert f"{shard_set} is not a training run directory" in capsys.readouterr().err

    assert main(["report", str(high), str(low), "--labels", "one"]) == 1
    assert "--labels has 1 label(s) for 2 run(s)" in capsys.readouterr().err
    assert main(["report", str(high), str(low), "--labels", "a,"]) == 1
    assert "--labels has an empty label (a,)" in capsys.readouterr().err
    assert main(["report", str(high), str(low), "--labels", "a,a"]) == 1
    assert "--labels repeats a label (a,a)" in capsys.readouterr().err

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    assert main(["report", str(high), "--out", str(notes)]) == 1
    err = capsys.readouterr().err
    assert str(notes) in err and "is not a report made by kfm" in err
    assert (notes / "mine.txt").read_text() == "keep me"

    assert main(["report", str(high), "--out", str(low)]) == 1
    assert "is a training run directory" in capsys.readouterr().err


def hand_built_run(root: Path) -> Path:
    """A run whose metrics.jsonl has two world sizes (2, then 4 after a resume at step 2 that
    logs steps 3-4 again), a NaN loss at its last step, in-loop bench metrics and a line cut off
    by a crash; two results files at step 4 (all 50 items, and a --limit 4 one)."""
    run = root / "hand"
    run.mkdir()
    cfg = load_config(REPO / "configs/tiny.yaml", ["--train.name=hand"])
    (run / "config.yaml").write_text(dump_yaml(cfg))

    def train(step: int, loss: float, world: int) -> dict:
        return {
            "step": step,
            "loss": loss,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "step_time_s": float(world),  # seconds per step of this window
            "tokens_per_s_global": 1000.0 * world,
            "tokens_per_s_per_device": 1000.0,
        }

    lines = [
        {"step": 0, "val_bpb": 4.5, "val_bpb/lang/ko": 4.6},
        train(1, 7.0, 2),
        train(2, 6.8, 2),
        train(3, 6.7, 2),  # lost to the crash: logged again after the resume
        train(4, 6.6, 2),
        train(3, 6.5, 4),
        train(4, 6.4, 4),
        {"step": 4, "val_bpb": 4.2, "val_bpb/lang/ko": 4.3, "bench/kfm_pubmedqa/acc": 0.55},
        train(5, math.nan, 4),
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo'
    (run / "metrics.jsonl").write_text(text)
    write_results(run, 4, results_file(4, p=0.6, n=50, f1=0.41, f1_stderr=0.05))
    # A second result of step 4 with other settings (--limit 4), named as eval/bench.py names it.
    small = results_file(4, p=0.25, n=4, f1=0.2, f1_stderr=0.2)
    (run / "eval" / "step_000004" / "results-0000abcd.json").write_text(json.dumps(small))
    return run


def test_hand_built_run_resume_nan_world_sizes_and_intervals(tmp_path):
    run_dir = hand_built_run(tmp_path)
    run = load_run(run_dir, "hand")
    xs, ys = run.series("loss")
    assert xs == [s * TOKENS_PER_STEP for s in (1, 2, 3, 4, 5)]
    assert ys[:4] == [7.0, 6.8, 6.5, 6.4] and math.isnan(ys[4])  # the resumed values win
    compute = run.compute()
    assert compute.wall_s == 2 + 2 + 4 + 4 + 4  # step_time_s x steps of each window
    assert compute.device_s == 2 * 2 + 2 * 2 + 4 * 4 + 4 * 4 + 4 * 4
    assert compute.world_sizes == [2, 4]

    report = write_report([run_dir])
    md = report.report.read_text()
    assert "- hand: 1 unreadable line(s) of metrics.jsonl skipped" in md
    assert "- hand: 1 non-finite training loss value(s), drawn as gaps" in md
    assert "One run: nothing to compare." in md
    assert (
        "- hand: step 4: shows eval/step_000004/results.json, not "
        "eval/step_000004/results-0000abcd.json (fewer items or other settings)" in md
    )
    row = table_rows(md, "Runs and compute")[0]
    assert row[6] == "2/4" and row[7] == f"{compute.device_s / 3600:.3g}"
    assert row[10] == "nan"

    # The intervals, from the formulas with the n and p given in the file.
    scores = {(r[0], r[1]): r[3] for r in table_rows(md, "Benchmark scores")}
    p, n, z = 0.6, 50, 1.959963984540054
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    wilson = f"0.6000 [{center - half:.4f}, {center + half:.4f}], n=50"
    assert scores[("kfm_pubmedqa", "acc")] == wilson
    assert scores[("kfm_pubmedqa", "acc_norm")] == wilson  # stderr "N/A": n is enough
    normal = f"0.4100 [{0.41 - z * 0.05:.4f}, {0.41 + z * 0.05:.4f}], n=50"
    assert scores[("kfm_klue_nli", "f1")] == normal  # not an accuracy: 1.96 stderr
    in_loop = table_rows(md, "Benchmark scores", table=1)  # last in-loop values
    assert in_loop == [["kfm_pubmedqa", "acc", "", "0.5500"]]  # no n or stderr logged: no interval

    assert [p.file for p in report.plots] == [
        "loss.png",
        "lr.png",
        "grad_norm.png",
        "throughput.png",
        "val_bpb.png",
        "benchmarks.png",
    ]
    assert report.plots[4].panels == [
        "validation bits/byte: all sources",
        "validation bits/byte: language ko",
    ]


def test_wilson_interval_edges():
    # p = 0 has the closed form [0, z^2 / (n + z^2)]; p = 1 mirrors it.
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z95**2 / (10 + Z95**2))
    lo, hi = wilson_interval(1.0, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + Z95**2))
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0.5, 0)


def test_a_run_without_eval_or_benchmarks_skips_those_plots(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(load_config(REPO / "configs/tiny.yaml")))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 7.0, "lr": 1e-3}) + "\n")
    report = write_report([run], out=tmp_path / "out")
    assert [p.file for p in report.plots] == ["loss.png", "lr.png"]
    md = report.report.read_text()
    for missing in ("Gradient norm", "Throughput", "Validation bits per byte", "Benchmark scores"):
        assert f"- {missing}: " in md
    assert "![Throughput]" not in md and not (tmp_path / "out" / "throughput.png").exists()
    assert "No benchmark results" in md


def test_config_diff_names_absent_keys_and_indexed_sources(tmp_path):
    sources = (
        "--data.sources=[{name: a, path: /x/a, weight: 1.0}, {name: b, path: /x/b, weight: 1.0}]"
    )
    dirs = []
    for name, weight in (("one", "1.0"), ("two", "3.0")):
        run = tmp_path / name
        run.mkdir()
        cfg = load_config(REPO / "configs/tiny.yaml", [sources.replace("1.0}]", f"{weight}}}]")])
        text = dump_yaml(cfg)
        if name == "two":  # a run made by a kfm without eval.at_start
            text = text.replace("  at_start: true\n", "")
        (run / "config.yaml").write_text(text)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 7.0}) + "\n")
        dirs.append(run)
    md = write_report(dirs, out=tmp_path / "out").report.read_text()
    diff = {r[0].strip("`"): r[1:] for r in table_rows(md, "Config differences")}
    assert diff == {
        "data.sources[1].weight": ["`1.0`", "`3.0`"],
        "eval.at_start": ["`true`", "*absent*"],
    }


@pytest.mark.slow
def test_report_reads_a_real_kfm_eval_result(runs, capsys):
    """kfm eval --tasks writes the results file kfm report reads (the contract, not a copy)."""
    _, low = runs
    assert main(["eval", str(low), "--tasks", "kfm_pubmedqa", "--limit", "4"]) == 0
    assert main(["report", str(low)]) == 0
    md = (low / "report" / "report.md").read_text()
    data = json.loads((low / "eval" / "step_000006" / "results.json").read_text())
    p = data["results"]["kfm_pubmedqa"]["acc,none"]
    lo, hi = wilson_interval(p, 4)
    rows = {(r[0], r[1]): r for r in table_rows(md, "Benchmark scores")}
    assert rows[("kfm_pubmedqa", "acc")][3] == f"{p:.4f} [{lo:.4f}, {hi:.4f}], n=4"
    assert "low (step 6, first 4 items)" in md
