"""`kfm data run` with any task count: `tasks: 1` used to crash after its first stage.

A stage that runs in this process (one worker: tasks 1, executor.workers 1, or a one-core
machine) keeps the steps it ran, loaded models included; a later stage that starts a process
pool then pickled every earlier stage into each pool task (datatrove's `depends=` chain) and
failed on the fastText model. Stages are no longer chained, and the model-holding steps drop
their models when pickled (they reload on first use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SAMPLE, TOKENIZER, slice_jsonl

pytest.importorskip("datatrove", reason="needs datatrove: pip install 'kfm[data]'")

import dill  # noqa: E402  (datatrove's dependency)
from datatrove.pipeline.base import PipelineStep  # noqa: E402

# English and Korean slices of the bundled sample: 200 documents, four input files.
SLICES = (("medquad", 70), ("plos", 10), ("ko_chatbot", 70), ("klue", 50))


def write_config(root: Path, name: str, tasks: int) -> Path:
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    lines = [
        f"name: {name}",
        f"output_dir: {root / name}",
        f"tasks: {tasks}",
        "inputs:",
    ]
    for source, n_docs in SLICES:
        path = inputs / f"{source}.jsonl"
        if not path.exists():
            slice_jsonl(SAMPLE / f"{source}.jsonl.gz", path, n_docs)
        lines.append(f"  - {{name: {source}, format: jsonl, paths: ['{path}']}}")
    lines += [
        "pack:",
        f"  tokenizer: {TOKENIZER}",
        "  train_tokenizer: false",
        "  workers: 1",
        "card:",
        "  train_preset: configs/tiny.yaml",
    ]
    config = root / f"{name}.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def data_run(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kfm_cli", "data", "run", str(config), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same 200 documents curated with tasks 1 and tasks 2 (default workers)."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for tasks in (1, 2):
        # The second run writes no train.yaml, and its summary must not point at one.
        extra = () if tasks == 1 else ("--card.train_preset=null",)
        proc = data_run(write_config(root, f"t{tasks}", tasks), *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
        out[tasks] = root / f"t{tasks}"
        assert ("train: kfm train" in proc.stdout) == (tasks == 1), proc.stdout
        assert (out[tasks] / "train.yaml").is_file() == (tasks == 1)
    return out


def test_tasks_one_curates_end_to_end(runs: dict[int, Path]) -> None:
    out = runs[1]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reconciled"], stats["problems"]
    read = {name: row["input_docs"] for name, row in stats["sources"].items()}
    assert read == dict(SLICES)
    # a stage with a process pool ran after the in-process ones: that is where it crashed
    buckets = out / "logs" / "dedup_minhash_buckets" / "completions"
    assert len(list(buckets.iterdir())) > 1
    for name, row in stats["sources"].items():
        assert row["pack_docs"] > 0, name
        manifest = json.loads((out / "shards" / name / "manifest.json").read_text())
        assert sum(s["n_tokens"] for s in manifest["splits"].values()) == row["pack_tokens"]
    assert (out / "DATA_CARD.md").is_file() and (out / "train.yaml").is_file()


def test_tasks_one_and_two_keep_the_same_documents(runs: dict[int, Path]) -> None:
    """Splitting the input over tasks changes where documents are processed, not which survive."""

    def kept(out: Path) -> dict[str, tuple[int, int]]:
        stats = json.loads((out / "stats.json").read_text())
        return {n: (r["pack_docs"], r["pack_tokens"]) for n, r in stats["sources"].items()}

    assert kept(runs[1]) == kept(runs[2])
    stats2 = json.loads((runs[2] / "stats.json").read_text())
    assert stats2["reconciled"], stats2["problems"]
    assert len(list((runs[2] / "logs" / "curate" / "completions").iterdir())) == 2


def test_tasks_one_on_slurm_dry_run_pickles_every_stage(tmp_path: Path) -> None:
    """The Slurm executor ships each stage as a dill pickle; with tasks 1 every one loads back."""
    config = write_config(tmp_path, "slurm1", 1)
    proc = data_run(config, "--executor=slurm", "--dry-run", "--executor.slurm.partition=cpu")
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = tmp_path / "slurm1" / "logs"
    pickles = sorted(logs.glob("*/executor.pik"))
    assert {p.parent.name for p in pickles} >= {"curate", "dedup_minhash_buckets", "pack"}
    for pik in pickles:
        with pik.open("rb") as f:
            executor = dill.load(f)
        assert executor.depends is None and executor.pipeline, pik


def test_language_id_step_pickles_after_use() -> None:
    """A step that ran (model loaded) pickles without its model and reloads it on first use."""
    from datatrove.data import Document

    from data_pipeline.steps.decontaminate import Decontaminator
    from data_pipeline.steps.langid import LanguageID

    step = LanguageID()
    doc = Document(text="The patient was given metformin for type 2 diabetes.", id="0")
    assert step.filter(doc) is True and doc.metadata["language"] == "en"
    assert step._detector is not None
    copy = dill.loads(dill.dumps(step))
    assert copy._detector is None and step._detector is not None
    ko = Document(text="환자는 급성 심근경색으로 응급실에 내원하였다.", id="1")
    assert copy.filter(ko) is True and ko.metadata["language"] == "ko"

    decon = Decontaminator()
    decon._index = object()  # stands for the built index: it stays behind
    assert dill.loads(dill.dumps(decon))._index is None


class _Model:
    """Stands for a loaded model (fastText's cannot be pickled, not even by dill)."""

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle a loaded model")


class KeepsAModel(PipelineStep):
    """Passes documents through and then holds a model; the executor must not send a stage that
    ran in this process to the pool of a later stage."""

    name = "keeps a model"
    type = "Formatter"

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        yield from data
        self.model = _Model()


POOL_SCRIPT = """
import sys
from pathlib import Path
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from data_pipeline.executor import ExecutorConfig, run_stages
from data_pipeline.stage import Stage
from tests.data_pipeline.test_tasks_one import KeepsAModel

def main() -> int:
    work = Path(sys.argv[1])
    stages = [
        Stage(name="first", tasks=1, pipeline=[
            JsonlReader(str(work / "in")), KeepsAModel(), JsonlWriter(str(work / "mid"))]),
        Stage(name="second", tasks=2, pipeline=[
            JsonlReader(str(work / "mid")), JsonlWriter(str(work / "out"), compression=None)]),
    ]
    run_stages(stages, ExecutorConfig(workers=2), logging_dir=work / "logs")
    return 0
"""


def test_in_process_stage_then_pool_stage(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "in").mkdir(parents=True)
    for f in range(2):
        rows = [json.dumps({"id": f"{f}-{d}", "text": f"doc {d} of {f}"}) for d in range(3)]
        (work / "in" / f"part{f}.jsonl").write_text("\n".join(rows) + "\n")
    (work / "pool_entry.py").write_text(textwrap.dedent(POOL_SCRIPT))
    # Imported and called like a console script, so datatrove's forkserver pool can start.
    code = (
        f"import sys; sys.path[:0] = [{str(work)!r}, {str(REPO)!r}]; "
        "import pool_entry; sys.exit(pool_entry.main())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(work)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads(line) for p in (work / "out").glob("*.jsonl") for line in p.open()]
    assert sorted(d["id"] for d in docs) == [f"{f}-{d}" for f in range(2) for d in range(3)]
