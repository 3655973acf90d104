"""`kfm release`: the open-release folder of the tiny run, its cards, and every check made to fail.

One full release (with the transformers and lm-eval after-checks) is built per module from the
session's tiny run (tests/eval/checks.py); the checks are then made to fail on copies of it, each
with one planted problem. Releases that only need the files (overwrite rules, cards of other
runs) skip the after-checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kfm.checkpoint import load_model_state
from kfm.export.card import (
    LICENSES,
    ReleaseError,
    check_no_local_paths,
    check_special_tokens,
    check_weights_only,
    device_hours,
    local_paths,
    param_counts,
    resolve_license,
    sample_training_text,
)
from kfm.export.hf import to_hf_state_dict
from kfm.fs import OutputError, sha256_file
from kfm.tokenizer import load_tokenizer
from kfm_cli.release import (
    LICENSE_CHOICES,
    SMOKE_TASK,
    check_no_eval_items,
    eval_index,
    release,
)
from tests.conftest import REPO, SAMPLE, TOKENIZER, slice_jsonl
from tests.eval.checks import STEP, tiny_run

CARD_SECTIONS = [
    "## Architecture",
    "## Training data",
    "## Training",
    "## Evaluation",
    "## PII audit of the training text",
    "## License",
    "## Intended use and limits of medical use",
    "## Usage",
]


def _shared_data_or_skip() -> None:
    from eval.registry import data_root

    try:
        data_root()
    except FileNotFoundError as e:
        pytest.skip(f"kfm release checks the registry's eval sets: {e}")


@pytest.fixture(scope="module")
def run(tiny_sources, tmp_path_factory) -> Path:
    """A copy of the session's tiny run without eval results (other test modules evaluate the
    shared run in place; the card must be written from what this module recorded)."""
    _shared_data_or_skip()
    copy = tmp_path_factory.mktemp("release_run") / "tokcheck"
    shutil.copytree(tiny_run(tiny_sources, tmp_path_factory).run_dir, copy, symlinks=True)
    shutil.rmtree(copy / "eval", ignore_errors=True)
    return copy


@pytest.fixture(scope="module")
def released(run, tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny run released with every check, weights split into several safetensors shards."""
    out = tmp_path_factory.mktemp("release") / "kfm-tiny"
    lines: list[str] = []
    release(run, out, max_shard_size="300KB", progress=lines.append, warn=lines.append)
    return out, lines


def _run_config(run: Path) -> dict:
    manifest = json.loads((run / "checkpoints" / STEP / "manifest.json").read_text())
    return manifest["config"]


def _run_with_sources(run: Path, dst: Path, sources: list[dict]) -> Path:
    """A copy of ``run`` whose checkpoint config trains on ``sources`` (same tokenizer)."""
    shutil.copytree(run, dst, symlinks=True)
    path = dst / "checkpoints" / STEP / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["data"]["sources"] = sources
    path.write_text(json.dumps(manifest, indent=2))
    return dst


def _packed(tmp: Path, name: str, texts: list[str] | None = None, license: str | None = None):
    """A shard set packed with the test tokenizer: ``texts``, else a medquad slice."""
    from kfm.data.pack import pack

    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / f"{name}.jsonl"
    if texts is None:
        slice_jsonl(SAMPLE / "medquad.jsonl.gz", src, 40)
    else:
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    out = tmp / "shards" / name
    pack([str(src)], str(TOKENIZER), str(out), source_name=name, license=license, val_fraction=0.1)
    return {"name": name, "path": str(out), "weight": 1.0}


# ---- a release passes its own checks ---------------------------------------------------------


def test_release_passes_its_checks(released):
    out, lines = released
    checks = [line for line in lines if line.startswith("check: ")]
    expected = [
        "check: tokenizer",
        "check: PII audit",
        "check: weights only",
        "check: no local paths",
        "check: special tokens intact",
        "check: no eval items",
        "check: transformers loads",
        f"check: lm-eval HFLM scores {SMOKE_TASK}",
    ]
    assert [next(c for c in checks if c.startswith(e)) for e in expected] == checks
    assert all(c.endswith(": ok") for c in checks)
    marker = json.loads((out / "kfm_release.json").read_text())
    assert marker["format"] == "kfm-release" and marker["checkpoint"] == f"checkpoints/{STEP}"
    assert len(marker["checks"]) == len(checks)
    files = {p.name for p in out.iterdir()} - {"kfm_release.json"}
    assert set(marker["files"]) == files
    for name, entry in marker["files"].items():
        assert entry["sha256"] == sha256_file(out / name), name
    # Sharded weights, no export marker (it names local paths), nothing left beside OUT.
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "kfm_export.json").exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_transformers_generates_and_matches_kfm_logits(released, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfm.config import config_from_dict
    from kfm.export.verify import export_logits_diff

    out, _ = released
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("당뇨병 환자의 혈당 관리는", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    state, _ = load_model_state(run / "checkpoints" / STEP)
    cfg = config_from_dict(_run_config(run))
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    assert export_logits_diff(state, cfg.model, out, tokens) <= 1e-4


def test_model_card_states_the_run(released, run):
    from kfm.config import config_from_dict
    from kfm.data.shards import load_manifest

    out, _ = released
    card = (out / "MODEL_CARD.md").read_text()
    readme = (out / "README.md").read_text()
    assert [line for line in card.splitlines() if line.startswith("## ")] == CARD_SECTIONS
    front, body = readme.removeprefix("---\n").split("---\n", 1)
    assert body.lstrip("\n") == card
    meta = yaml.safe_load(front)
    cfg = config_from_dict(_run_config(run))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["ko", "en"]
    assert meta["datasets"] == [s.name for s in cfg.data.sources]
    total, non_embedding = param_counts(cfg.model)
    assert f"parameters: {total:,}" in card and f"non-embedding: {non_embedding:,}" in card
    assert f"layers: {cfg.model.n_layers}, d_model: {cfg.model.d_model}" in card
    assert f"vocabulary: {cfg.model.vocab_size}" in card
    step = int(STEP.removeprefix("step_"))
    tokens = step * cfg.train.global_batch_size * cfg.data.seq_len
    assert f"tokens seen: {tokens:,}" in card
    hours = device_hours(run / "metrics.jsonl", up_to_step=step, world_size=1)
    assert hours is not None and f"device-hours: {hours:.4g}" in card
    for source in cfg.data.sources:
        manifest = load_manifest(source.path)
        n_tokens = sum(s["n_tokens"] for s in manifest["splits"].values())
        row = next(line for line in card.splitlines() if line.startswith(f"| {source.name} |"))
        assert f"| {n_tokens:,} |" in row and manifest["sources"][0]["license"] in row
    assert "Not evaluated" in card
    assert "not a medical device" in card and "hallucination" in card
    assert "WARNING" not in card and "non-commercial" not in card
    apache = (REPO / "kfm" / "export" / "licenses" / "apache-2.0.txt").read_text()
    assert (out / "LICENSE").read_text() == apache
    data_card = (out / "DATA_CARD.md").read_text()
    assert "no curation card describes them" in data_card  # packed with kfm pack, no data run
    assert "## PII audit at release" in data_card and "| email | 0 |" in data_card


def test_card_shows_recorded_eval_results(released, run, tmp_path):
    """bpb from `kfm eval` and benchmarks from eval.bench land in the card as recorded."""
    from lm_eval.models.huggingface import HFLM

    from eval.bench import markdown_table, run_benchmarks, write_results
    from eval.run import evaluate_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    val = evaluate_checkpoint(copy)  # the run's own settings: <run>/eval/step_N.json
    out, _ = released
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=2)
    partial = run_benchmarks(lm, [SMOKE_TASK], limit=1)
    assert partial is not None
    write_results(copy, STEP, partial)  # results.json
    results = run_benchmarks(lm, [SMOKE_TASK], limit=2)
    write_results(copy, STEP, results)  # results-<hash>.json: more items, so the card's
    release(copy, tmp_path / "rel", after_checks=False, progress=print, warn=print)
    card = (tmp_path / "rel" / "MODEL_CARD.md").read_text()
    assert markdown_table(results) in card
    assert f"| all | {val['val_bpb']:.4f} |" in card
    assert "Not evaluated" not in card


# ---- each check fails on a planted problem ---------------------------------------------------


@pytest.fixture
def copy(released, tmp_path) -> Path:
    out, _ = released
    return Path(shutil.copytree(out, tmp_path / "copy"))


def _expected_keys(run: Path) -> set[str]:
    from kfm.config import config_from_dict

    state, _ = load_model_state(run / "checkpoints" / STEP)
    return set(to_hf_state_dict(state, config_from_dict(_run_config(run)).model))


def test_weights_check_fails_on_optimizer_state(copy, run):
    from safetensors.torch import save_file

    keys = _expected_keys(run)
    check_weights_only(copy, keys)  # the release as built passes
    planted = copy / "trainer_state_rank0.pt"
    shutil.copy(run / "checkpoints" / STEP / "trainer_state_rank0.pt", planted)
    with pytest.raises(ReleaseError, match="trainer_state_rank0.pt: training state"):
        check_weights_only(copy, keys)
    planted.unlink()
    save_file({"optimizer.state.0.exp_avg": torch.zeros(4)}, str(copy / "extra.safetensors"))
    with pytest.raises(
        ReleaseError, match=r"extra.safetensors: tensors that are not model weights \(optimizer"
    ):
        check_weights_only(copy, keys)


@pytest.mark.parametrize("where", ["run", "home"])
def test_local_path_check_fails_on_a_path_in_any_file(copy, run, where):
    paths = local_paths(run, TOKENIZER, REPO)
    check_no_local_paths(copy, paths)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    planted = str(run / "checkpoints") if where == "run" else "/home/alice/kfm/tokenizer"
    config["name_or_path"] = planted
    (copy / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(ReleaseError, match=r"tokenizer_config.json:\d+ holds the local path"):
        check_no_local_paths(copy, paths)


def test_special_token_check_fails_on_a_changed_token(copy):
    check_special_tokens(copy, TOKENIZER)
    path = copy / "tokenizer_config.json"
    original = path.read_text()
    path.write_text(original.replace('"eos_token": "<|eos|>"', '"eos_token": "<|pad|>"'))
    with pytest.raises(ReleaseError, match=r"eos token '<\|pad\|>' \(id 2\) in the release"):
        check_special_tokens(copy, TOKENIZER)
    path.write_text(original)
    config = json.loads((copy / "generation_config.json").read_text())
    config["bos_token_id"] = 5
    (copy / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ReleaseError, match="generation_config.json: bos_token_id=5"):
        check_special_tokens(copy, TOKENIZER)


def test_eval_item_check_fails_on_an_eval_item(copy, monkeypatch):
    """A KorMedMCQA row (CC BY-NC; here the committed sample rows) or a MedQA item in any file."""
    from eval.registry import KORMEDMCQA_ENV, KORMEDMCQA_SAMPLE, item_text, iter_items

    monkeypatch.setenv(KORMEDMCQA_ENV, str(KORMEDMCQA_SAMPLE))
    index, missing = eval_index()
    assert not missing
    check_no_eval_items(copy, index)
    row = next(i for i in iter_items("kormedmcqa_doctor") if i.split == "test")
    (copy / "eval_samples.jsonl").write_text(
        json.dumps({"doc": item_text(row)})  # \\uXXXX and \\n escapes, read as JSON
    )
    with pytest.raises(
        ReleaseError, match=f"eval_samples.jsonl holds eval item kormedmcqa_doctor:{row.id}"
    ):
        check_no_eval_items(copy, index)
    (copy / "eval_samples.jsonl").unlink()
    medqa = next(iter_items("medqa_usmle"))
    with (copy / "MODEL_CARD.md").open("a") as f:
        f.write("\n## Example\n\n" + item_text(medqa) + "\n")
    with pytest.raises(ReleaseError, match=f"MODEL_CARD.md holds eval item medqa_usmle:{medqa.id}"):
        check_no_eval_items(copy, index)


def test_pii_in_training_text_fails_and_leaves_no_folder(run, tmp_path):
    texts = [
        f"환자 연락처 010-{1000 + i}-5678, 메일 patient{i}@example.com 으로 결과를 안내하였다. "
        "Follow-up visit in two weeks."
        for i in range(20)
    ]
    source = _packed(tmp_path, "leaky", texts)
    copy = _run_with_sources(run, tmp_path / "run", [source])
    out = tmp_path / "rel"
    proc = subprocess.run(
        [sys.executable, "-m", "kfm_cli", "release", str(copy), str(out)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "PII audit" in proc.stderr and "FAIL" in proc.stderr and "--pii-max" in proc.stderr
    assert "email" in proc.stderr and "phone" in proc.stderr
    assert "patient" not in proc.stderr  # the audit names types and masked shapes, never values
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "rel" in p.name] == []


def test_non_commercial_source_is_warned_in_card(run, tmp_path):
    nc = _packed(tmp_path, "openstax_like", license="CC-BY-NC-SA-4.0")
    sources = [*_run_config(run)["data"]["sources"], nc]
    copy = _run_with_sources(run, tmp_path / "run", sources)
    warned: list[str] = []
    release(copy, tmp_path / "rel", after_checks=False, progress=print, warn=warned.append)
    assert any("non-commercial training data: openstax_like (CC-BY-NC-SA-4.0)" in w for w in warned)
    card = (tmp_path / "rel" / "MODEL_CARD.md").read_text()
    assert "> **WARNING:** non-commercial training data: openstax_like" in card
    assert "CC-BY-NC-SA-4.0 **(non-commercial)**" in card
    assert "openstax_like" in (tmp_path / "rel" / "DATA_CARD.md").read_text()


# ---- where a release may be written ----------------------------------------------------------


def test_overwrite_rules(released, run, tmp_path):
    out, _ = released
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not a release made by kfm"):
        release(run, foreign, after_checks=False, overwrite=True)
    with pytest.raises(OutputError, match="a training run directory"):
        release(run, run, after_checks=False, overwrite=True)
    earlier = Path(shutil.copytree(out, tmp_path / "earlier"))
    with pytest.raises(OutputError, match="already holds a kfm release; pass --overwrite"):
        release(run, earlier, after_checks=False)
    (earlier / "stale.txt").write_text("from the earlier release")
    release(run, earlier, after_checks=False, overwrite=True, progress=print, warn=print)
    assert not (earlier / "stale.txt").exists() and (earlier / "kfm_release.json").is_file()
    assert (foreign / "todo.txt").read_text() == "mine"


# ---- licenses and sampling -------------------------------------------------------------------


def test_license_choices(tmp_path):
    from kfm.export.card import CardInputs, front_matter  # noqa: F401  (front matter below)

    assert tuple(LICENSES) == LICENSE_CHOICES
    mit = resolve_license("mit", holder="The kfm-x authors", year=2026)
    assert "Copyright (c) 2026 The kfm-x authors" in mit.text and mit.hub_id == "mit"
    assert (
        "Creative Commons Attribution 4.0" in resolve_license("cc-by-4.0", holder="", year=1).text
    )
    own = tmp_path / "MY_LICENSE.txt"
    own.write_text("\nOpenRAIL-M style terms\n...\n")
    lic = resolve_license(str(own), holder="", year=1)
    assert (lic.hub_id, lic.name) == ("other", "OpenRAIL-M style terms")
    with pytest.raises(
        ReleaseError, match="--license gpl-9: not one of apache-2.0, mit, cc-by-4.0"
    ):
        resolve_license("gpl-9", holder="", year=1)


def test_training_text_sample_is_fixed_bounded_and_decodes_the_documents(tiny_sources):
    tok = load_tokenizer(TOKENIZER)
    sets = [(s["name"], Path(s["path"])) for s in tiny_sources]
    sample = sample_training_text(sets, tok, n_docs=20, seed=3)
    assert sample == sample_training_text(sets, tok, n_docs=20, seed=3)
    assert sample != sample_training_text(sets, tok, n_docs=20, seed=4)
    assert [name for name, _ in sample] == ["medquad"] * 10 + ["ko_chatbot"] * 10
    originals = {
        json.loads(line)["text"]
        for line in (Path(tiny_sources[0]["path"]).parent.parent / "medquad.jsonl").open()
    }
    # Each is a training document (its first 4,096 tokens by default).
    assert all(any(o.startswith(text) for o in originals) for n, text in sample if n == "medquad")
    # The same draws read up to 16 tokens each: a prefix of each document, much shorter.
    full = sample_training_text(sets, tok, n_docs=4)
    short = sample_training_text(sets, tok, n_docs=4, max_tokens=16)
    for (_, whole), (_, head) in zip(full, short, strict=True):
        assert whole.startswith(head) and 0 < len(head) < len(whole) // 4


@pytest.mark.slow
def test_release_of_a_curated_run_copies_its_data_card(tmp_path):
    """`kfm data run` (every shipped set, 10 documents each; OpenStax is CC BY-NC-SA, OHSUMED has
    no license grant) -> 2 training steps -> release: DATA_CARD.md is the curation card plus the
    release's PII audit, languages come from its stats, both license warnings are in the card."""
    pytest.importorskip("datatrove")
    _shared_data_or_skip()
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "kfm_cli", "data", "run", "configs/data/sample.yaml",
         f"--pipeline.output_dir={data}", "--pipeline.limit_per_input=10",
         f"--pack.tokenizer={TOKENIZER}", "--pack.train_tokenizer=false",
         "--card.train_preset=configs/tiny.yaml", "--pack.workers=1"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "kfm_cli", "train", str(data / "train.yaml"),
         f"--train.run_root={tmp_path}", "--train.name=curated", "--train.steps=2",
         "--checkpoint.interval=2", "--eval.interval=0"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    warned: list[str] = []
    out = tmp_path / "curated" / "release"
    release(tmp_path / "curated", out, after_checks=False, progress=print, warn=warned.append)
    data_card = (out / "DATA_CARD.md").read_text()
    original = (data / "DATA_CARD.md").read_text().rstrip()
    assert data_card.startswith(original) and "## PII audit at release" in data_card
    card = (out / "MODEL_CARD.md").read_text()
    assert "> **WARNING:** non-commercial training data: openstax_anatomy_physiology_2e" in card
    assert "> **WARNING:** training data without a license grant: ohsumed_abstracts" in card
    assert any("non-commercial" in w for w in warned)
    assert "| klue_dev | ko |" in card and "| medquad | en |" in card
    assert f"the data card of the curation run `{data.name}`" in card
