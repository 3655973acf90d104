"""`kfm data run` end to end on a slice of configs/data/sample.yaml, crash-and-rerun, and the card.

The run is the real pipeline (every step, the local executor, packing with the committed test
tokenizer) on the first documents of every shipped pretraining set; its shards then train a tiny
model for two steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TOKENIZER

pytest.importorskip("datatrove")

SAMPLE_CONFIG = REPO / "configs" / "data" / "sample.yaml"
LIMIT = 10


def _shared_data_or_skip() -> Path:
    from eval.registry import data_root

    try:
        return data_root()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kfm_cli",
        "data",
        "run",
        str(SAMPLE_CONFIG),
        f"--pipeline.output_dir={out}",
        f"--pipeline.limit_per_input={LIMIT}",
        f"--pack.tokenizer={TOKENIZER}",
        "--pack.train_tokenizer=false",
        "--card.train_preset=configs/tiny.yaml",
        "--executor.workers=2",
        "--pack.workers=1",
        *extra,
    ]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_args(out, *extra), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _digest(out: Path) -> dict[str, str]:
    """sha256 of every output file except logs; shard manifests without their created_at."""
    digests = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith("logs/"):
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created_at")
            data = json.dumps(manifest, sort_keys=True).encode()
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    _shared_data_or_skip()
    out = tmp_path_factory.mktemp("datarun") / "sample"
    _run(out)
    return out


def test_sample_run_outputs(sample_run: Path) -> None:
    stats = json.loads((sample_run / "stats.json").read_text())
    assert stats["reconciled"], stats["problems"]
    sources = stats["sources"]
    assert len(sources) == 11
    for name, row in sources.items():
        assert 0 < row["input_docs"] <= LIMIT * 2, name  # the limit holds per task, 2 tasks
        if row["pack_docs"]:
            manifest = json.loads((sample_run / "shards" / name / "manifest.json").read_text())
            assert manifest["sources"][0]["name"] == name
            assert manifest["sources"][0]["document_licenses"], name
            n_tokens = sum(s["n_tokens"] for s in manifest["splits"].values())
            assert row["pack_tokens"] == n_tokens
    langs = {r["language"] for r in sources.values()}
    assert {"ko", "en"} <= langs or None in langs
    # train.yaml labels the single-language sources, for kfm train's val_bpb/lang/<code>
    train = yaml.safe_load((sample_run / "train.yaml").read_text())
    labelled = {s["name"]: s.get("language") for s in train["data"]["sources"]}
    assert {"en", "ko"} <= set(labelled.values()), labelled
    # every stage's steps reconcile and chain: what one step kept, the next one received
    curate = [s for s in stats["stages"] if s["stage"] == "curate"]
    for prev, nxt in zip(curate, curate[1:], strict=False):
        assert prev["kept"] == nxt["in"]
    for step in stats["stages"]:
        assert step["in"] == step["kept"] + sum(step["removed"].values()), step
    card = (sample_run / "DATA_CARD.md").read_text()
    assert "non-commercial sources included" in card
    assert "openstax_microbiology" in card and "ohsumed_abstracts" in card


def test_sample_run_trains(sample_run: Path, tmp_path: Path) -> None:
    """The shards are what `kfm train` reads: two steps on the written train.yaml."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfm_cli",
            "train",
            str(sample_run / "train.yaml"),
            "--train.steps=2",
            f"--train.run_root={tmp_path}",
            "--eval.interval=0",
            "--checkpoint.interval=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "sample" / "metrics.jsonl").open()]
    assert any(m.get("step") == 2 and "loss" in m for m in metrics)


def test_card_command_rewrites_card(sample_run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "card.md"
    proc = subprocess.run(
        [sys.executable, "-m", "kfm_cli", "data", "card", str(sample_run), "-o", str(dest)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == (sample_run / "DATA_CARD.md").read_text()


def test_crash_and_rerun_is_byte_identical(sample_run: Path, tmp_path: Path) -> None:
    """SIGKILL the run once the first curate task completed; the rerun skips completed tasks and
    its output equals an uninterrupted run's, byte for byte (shard manifests: but created_at)."""
    out = sample_run.parent / "crashed"
    # same output_dir string matters (paths are recorded in manifests): reuse the clean run's
    clean = _digest(sample_run)
    os.rename(sample_run, out)
    try:
        proc = subprocess.Popen(
            _args(sample_run),
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        marker = sample_run / "logs" / "curate" / "completions"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.is_dir() and any(marker.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (sample_run / "stats.json").exists()
        rerun = _run(sample_run)
        # the curate stage skipped the task that had completed before the kill
        assert re.search(r"stage 1/\d+ curate: .*\(\d+ already complete\)", rerun.stdout)
        assert _digest(sample_run) == clean
    finally:
        import shutil

        shutil.rmtree(sample_run, ignore_errors=True)
        os.rename(out, sample_run)


def test_rerun_with_other_config_is_refused(sample_run: Path) -> None:
    proc = subprocess.run(
        _args(sample_run, "--pack.val_fraction=0.2"), cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "--overwrite" in proc.stderr


@pytest.fixture
def cluster(tmp_path: Path):
    from tests.slurm_cluster import missing_slurm, slurm_cluster

    if reason := missing_slurm():
        pytest.skip(reason)
    with slurm_cluster(tmp_path / "slurm") as c:
        yield c


@pytest.mark.slow
def test_sample_slice_on_slurm_equals_local(cluster, sample_run: Path, tmp_path: Path) -> None:
    """The same command with --executor slurm on a real one-node Slurm: one job array per stage,
    chained by afterok; its shards and stats equal the local run's byte for byte."""
    out = tmp_path / "slurm_run"
    env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
    args = _args(out, "--executor=slurm")
    args += [f"--executor.slurm.partition={cluster.partition}", "--executor.slurm.time=30:00"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage report: job " in proc.stdout, proc.stdout
    cluster.wait_idle(timeout=900)
    assert (out / "DATA_CARD.md").is_file(), cluster.log_tail()

    def payload(root: Path) -> dict[str, str]:
        return {
            k: v
            for k, v in _digest(root).items()
            if k.endswith((".bin", ".idx")) or k in ("stats.json", "DATA_CARD.md")
        }

    assert payload(out) == payload(sample_run)
    for stage in ("curate", "pack", "report"):
        script = out / "logs" / stage / "launch_script.slurm"
        assert f"#SBATCH --job-name=kfm-{stage}" in script.read_text()
        assert cluster.run("sbatch", "--test-only", str(script), check=False).returncode == 0
