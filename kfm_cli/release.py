"""`kfm release RUN_DIR OUT`: the open-release bundle of one checkpoint, and its checks.

OUT holds the Hugging Face folder of `kfm export` (safetensors shards, config, generation config,
tokenizer) plus MODEL_CARD.md (README.md = the card with the Hub's YAML front matter),
DATA_CARD.md, LICENSE and kfm_release.json (every file with its sha256, and the checks passed).

The order, so that a failed check leaves nothing that looks released:

1. gather: the checkpoint and its config, the tokenizer (hash-checked as `kfm export` does), the
   shard manifests and the curation data card, eval results, the license;
2. PII audit of a fixed sample of the training text (fails above ``--pii-max``);
3. build everything in ``.OUT.release-<pid>`` beside OUT;
4. checks on that folder: weights only, no local paths, special tokens intact, no eval items;
5. after-checks: transformers loads it and generates; lm-eval scores it on one kfm task;
6. kfm_release.json, then one rename to OUT (``kfm.fs.publish_dir``).

This module is the composition root of a release: it may import eval/ (registry, benchmarks) and
data_pipeline/ (PII finder, license flags, decontamination index); kfm/export/card.py holds the
parts that need only kfm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kfm
from kfm.fs import DATA_RUN_MARKER, RELEASE_FORMAT, RELEASE_MARKER, sha256_file

if TYPE_CHECKING:
    from kfm.config import Config
    from kfm.export.card import PIIAuditResult, SourceRow

# kfm.export (transformers, torch) is imported inside the functions: `kfm --help` builds this
# command's parser and must stay instant. tests/export/test_release.py pins these copies.
DEFAULT_LICENSE = "apache-2.0"
LICENSE_CHOICES = ("apache-2.0", "mit", "cc-by-4.0")
"""kfm.export.card.LICENSES' ids."""
DEFAULT_PII_SAMPLE = 300
"""Training documents the PII audit reads (spread evenly over the sources)."""
DEFAULT_PII_MAX = 100.0
"""PII spans per million sampled characters above which the release fails."""
DEFAULT_MAX_SHARD_SIZE = "5GB"
SMOKE_TASK = "kfm_medqa_4opt"
"""The lm-eval task of the after-check (multiple choice, short prompts)."""
SMOKE_LIMIT = 4
CARD = "MODEL_CARD.md"
DATA_CARD = "DATA_CARD.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

Progress = Callable[[str], None]


@dataclass(slots=True)
class Release:
    """A finished release: where, its files (relative name -> size, sha256), the check lines and
    warnings, and the wall seconds it took."""

    out: Path
    files: dict[str, dict[str, Any]]
    checks: list[str]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---- gathering the facts ---------------------------------------------------------------------


def _checkpoint(run: Path, step: int | None) -> tuple[Path, Path]:
    """(run dir, step dir) of RUN_DIR and --step (default: the newest valid checkpoint)."""
    from kfm.checkpoint import resolve_checkpoint_arg
    from kfm.checkpoint.stepdir import step_dir_name
    from kfm.export.card import ReleaseError

    if step is not None:
        root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
        wanted = root / step_dir_name(step)
        if not wanted.is_dir():
            have = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
            raise ReleaseError(
                f"--step {step}: no checkpoint {wanted}; the run has {', '.join(have) or 'none'}"
            )
        ckpt = resolve_checkpoint_arg(wanted)
    else:
        ckpt = resolve_checkpoint_arg(run)
    return ckpt.parent.parent, ckpt


def _data_runs(paths: list[Path]) -> dict[Path, list[Path]]:
    """Curation runs (`kfm data run` output folders) holding the shard sets ``paths``: a folder
    up to three levels above a shard set with DATA_CARD.md and pipeline.yaml."""
    found: dict[Path, list[Path]] = {}
    for path in paths:
        for parent in list(path.resolve().parents)[:3]:
            if (parent / DATA_CARD).is_file() and (parent / DATA_RUN_MARKER).is_file():
                found.setdefault(parent, []).append(path)
                break
    return found


def _source_rows(cfg: Config, languages: dict[str, str]) -> list[SourceRow]:
    """One row per data.sources entry from its shard manifest; license flags by
    data_pipeline.card.license_flags (the data card's own rule)."""
    from data_pipeline.card import license_flags
    from kfm.data.shards import load_manifest
    from kfm.export.card import SourceRow

    rows = []
    for source in cfg.data.sources:
        manifest = load_manifest(source.path)
        # The source's license as packed (--license, else its documents' own fields); the
        # flags look at every document license too, so one NC document in a set is not missed.
        licenses = list(
            dict.fromkeys(str(s.get("license", "unknown")) for s in manifest["sources"])
        )
        every = licenses + [k for s in manifest["sources"] for k in s.get("document_licenses", {})]
        flags = sorted({f for lic in every for f in license_flags(lic)})
        rows.append(
            SourceRow(
                name=source.name,
                license="; ".join(licenses) or "unknown",
                weight=source.weight,
                docs=sum(int(s["n_docs"]) for s in manifest["splits"].values()),
                tokens=sum(int(s["n_tokens"]) for s in manifest["splits"].values()),
                language=languages.get(source.name),
                flags=tuple(flags),
            )
        )
    return rows


def _license_warnings(rows: list[SourceRow], license_name: str) -> list[str]:
    out = []
    nc = [f"{r.name} ({r.license})" for r in rows if "non-commercial" in r.flags]
    if nc:
        out.append(
            f"non-commercial training data: {', '.join(nc)}. The weights are released under the "
            f"{license_name}, but a model trained on non-commercial text may carry those terms: "
            "do not use it commercially, or drop these sources and retrain for a commercially "
            "usable release."
        )
    grantless = [f"{r.name} ({r.license})" for r in rows if "no license grant" in r.flags]
    if grantless:
        out.append(
            f"training data without a license grant: {', '.join(grantless)}. Redistribution of a "
            "model trained on it may not be permitted; check before publishing."
        )
    return out


def _data_card(rows: list[SourceRow], runs: dict[Path, list[Path]], cfg: Config) -> str:
    """DATA_CARD.md of the release: the curation run's card (each run's, if several), plus a
    table from the shard manifests for sources no curation card covers."""
    parts: list[str] = []
    covered: set[str] = set()
    for run, shard_sets in runs.items():
        text = (run / DATA_CARD).read_text(encoding="utf-8").rstrip()
        parts.append(text if len(runs) == 1 else f"<!-- data card of {run.name} -->\n{text}")
        covered |= {str(p.resolve()) for p in shard_sets}
    loose = [
        r
        for r, s in zip(rows, cfg.data.sources, strict=True)
        if str(Path(s.path).resolve()) not in covered
    ]
    if loose:
        lines = [
            "# Training data" if not parts else "## Sources without a curation data card",
            "",
            "These shard sets were packed without `kfm data run`, so no curation card describes "
            "them; counts and licenses are from their manifests.",
            "",
            "| source | documents | tokens | weight | license |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.name} | {r.docs:,} | {r.tokens:,} | {r.weight:g} | {r.license}"
            + (f" **({', '.join(r.flags)})**" if r.flags else "")
            + " |"
            for r in loose
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _pii_audit(
    cfg: Config, tokenizer: Any, *, n_docs: int, max_per_million: float
) -> tuple[PIIAuditResult, str]:
    """Audit a fixed sample of the training text; (result, "ok" line). Raises ReleaseError
    above the threshold, naming the counts per type and source (never a value)."""
    from data_pipeline.pii import audit
    from kfm.export.card import PIIAuditResult, ReleaseError, sample_training_text

    max_tokens = 4096
    sample = sample_training_text(
        [(s.name, Path(s.path)) for s in cfg.data.sources],
        tokenizer,
        n_docs=n_docs,
        max_tokens=max_tokens,
    )
    found = audit(text for _, text in sample)
    result = PIIAuditResult(
        documents=found.documents,
        characters=found.characters,
        spans=dict(found.spans),
        max_per_million=max_per_million,
        tokens_per_document=max_tokens,
    )
    counts = ", ".join(f"{t} {n}" for t, n in result.spans.items() if n) or "none"
    line = (
        f"PII audit: {result.total} spans ({counts}) in {result.documents} sampled documents, "
        f"{result.per_million:.1f} per million characters (threshold {max_per_million:g})"
    )
    if result.per_million > max_per_million:
        examples = "; ".join(f"{e.type}: {e.context}" for e in found.examples[:5])
        raise ReleaseError(
            f"{line}: FAIL. The training text holds personal data the curation did not scrub "
            f"(masked examples: {examples}). Scrub the corpus (`kfm data run` with its pii step, "
            "or audit it with `kfm data pii-report`) and retrain; if these are false positives, "
            "raise --pii-max"
        )
    return result, line


def _eval_results(run_dir: Path, ckpt: Path) -> tuple[dict | None, str | None, dict | None]:
    """(benchmark results, their Markdown table, validation bpb) recorded for this checkpoint:
    the most complete ``<run>/eval/<step>/results*.json`` (eval.bench) and
    ``<run>/eval/<step>.json`` (kfm eval)."""
    from eval.bench import markdown_table, most_complete_results

    benchmarks = table = bpb = None
    found = most_complete_results(run_dir / "eval" / ckpt.name)  # whole sets over --limit runs
    if found is not None:
        benchmarks = found[1]
        table = markdown_table(benchmarks)
    val_file = run_dir / "eval" / f"{ckpt.name}.json"
    if val_file.is_file():
        val = json.loads(val_file.read_text(encoding="utf-8"))
        bpb = {k: v for k, v in val.items() if k.startswith("val_")}
    elif benchmarks is not None and benchmarks.get("kfm", {}).get("bpb"):
        bpb = {
            ("val_bpb" if k == "all" else f"val_bpb/{k}"): v
            for k, v in benchmarks["kfm"]["bpb"].items()
        }
    return benchmarks, table, bpb


# ---- checks that need eval/ ------------------------------------------------------------------


def eval_index() -> tuple[Any, list[str]]:
    """The decontamination n-gram index (data_pipeline.decontaminate) of every registered eval
    set's item texts, and the names of optional sets not available here (not indexed).

    Raises:
        ReleaseError: the shared data folder holding the sets does not exist.
    """
    from data_pipeline.decontaminate import NgramIndex
    from eval.registry import EVAL_SETS, EvalSetUnavailable, data_root, item_text, iter_items
    from kfm.export.card import ReleaseError

    try:
        data_root()
    except FileNotFoundError as e:
        raise ReleaseError(
            f"the eval-data check reads the registry's test sets: {e}; a release is not made "
            "without it"
        ) from e
    texts: list[tuple[str, str, str]] = []
    missing: list[str] = []
    # An unavailable optional set logs how to provide it, and the Hugging Face datasets import
    # behind it logs about accelerators; the caller's one warning names the sets instead.
    with _library_output_hidden():
        for name in EVAL_SETS:
            try:
                texts += [(name, item.id, item_text(item)) for item in iter_items(name)]
            except EvalSetUnavailable:
                missing.append(name)
    return NgramIndex.build(texts), missing


def _library_output_hidden() -> Any:
    """Hide what libraries write to stderr (bars, import-time notes) unless kfm -v."""
    import contextlib
    import io

    from kfm.console import VERBOSE, verbosity

    if verbosity() >= VERBOSE:
        return contextlib.nullcontext()
    return contextlib.redirect_stderr(io.StringIO())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _readable_text(path: Path) -> str:
    """A file's text as a reader sees it: the string values of a JSON or JSON-lines file (whose
    escapes, \\n or \\uXXXX, would hide an item from the n-gram match), else its raw text."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    try:
        return "\n".join(_strings(json.loads(raw)))
    except ValueError:
        pass
    try:
        return "\n".join(
            s for line in raw.splitlines() if line.strip() for s in _strings(json.loads(line))
        )
    except ValueError:
        return raw


def check_no_eval_items(folder: Path, index: Any) -> str:
    """No file of ``folder`` carries an item of the eval sets in ``index`` (:func:`eval_index`):
    every file but the weights is matched with the rule that kept those items out of the
    training data (a shared 13-gram, or the whole of a shorter item). Returns the "ok" line;
    raises ReleaseError naming the file, set and item."""
    from data_pipeline.decontaminate import contaminating
    from eval.registry import EVAL_SETS
    from kfm.export.card import ReleaseError, release_files

    files = [p for p in release_files(folder) if p.suffix != ".safetensors"]
    for path in files:
        found = contaminating(index.matches(_readable_text(path)))
        if found:
            m = found[0]
            raise ReleaseError(
                f"{path.relative_to(folder).as_posix()} holds eval item {m.set_name}:{m.item_id} "
                f"({m.n_overlapping} of its {m.n_item} shingles); eval data must not ship with "
                f"the model (license of that set: {EVAL_SETS[m.set_name].license}): remove it"
            )
    sets = len({name for name, _ in index.items})
    return f"no eval items: {len(files)} files checked against {len(index.items):,} items of {sets} eval sets"


def _generate_check(folder: Path) -> tuple[Any, Any, str]:
    """transformers loads ``folder`` (AutoModelForCausalLM, AutoTokenizer) and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfm.export.card import ReleaseError

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    ids = tok("고혈압 환자의 일차 치료는", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    new = out.shape[1] - ids.shape[1]
    if new < 1:
        raise ReleaseError(f"{folder}: transformers loaded the model but it generated no token")
    return model, tok, f"transformers loads {type(model).__name__} and generates ({new} new tokens)"


def _lm_eval_check(model: Any, tok: Any) -> str:
    """lm-eval's HFLM on the loaded release scores one kfm task on a few items."""
    from kfm.export.card import ReleaseError

    # lm-eval draws its own progress bars (it passes tqdm's disable flag itself) and imports
    # accelerators that log at import; kfm -v shows them.
    with _library_output_hidden():
        from lm_eval.models.huggingface import HFLM

        from eval.bench import run_benchmarks

        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=SMOKE_LIMIT, device="cpu")
        results = run_benchmarks(lm, [SMOKE_TASK], limit=SMOKE_LIMIT)
    metrics = (results or {}).get("results", {}).get(SMOKE_TASK, {})
    acc = metrics.get("acc,none")
    if not isinstance(acc, float):
        raise ReleaseError(f"lm-eval ran {SMOKE_TASK} on the release but returned no accuracy")
    return f"lm-eval HFLM scores {SMOKE_TASK} (limit {SMOKE_LIMIT}): acc {acc:.2f}"


# ---- the release -----------------------------------------------------------------------------


def release(
    run: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    license: str = DEFAULT_LICENSE,
    name: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    pii_sample: int = DEFAULT_PII_SAMPLE,
    pii_max: float = DEFAULT_PII_MAX,
    overwrite: bool = False,
    after_checks: bool = True,
    progress: Progress = print,
    warn: Progress = print,
) -> Release:
    """Build the release of a checkpoint of ``run`` (newest valid, or ``step``) in ``out``.

    ``after_checks=False`` skips loading the folder with transformers and lm-eval (the checks on
    the files still run). ``progress`` gets one "check: ... ok" line per check, ``warn`` each
    warning (also written into the model card). Returns the :class:`Release`.

    Raises:
        ReleaseError: a bad option or a failed check (the message names the file and the fix).
        OutputError: ``out`` is not new or empty, nor an earlier release with ``overwrite``.
        TokenizerMismatchError, CheckpointError, ShardError: a bad input.
    """
    import torch

    from data_pipeline.report import load_report
    from kfm.checkpoint import load_model_state
    from kfm.checkpoint.stepdir import read_manifest
    from kfm.config import config_from_dict
    from kfm.export.card import (
        CardInputs,
        ReleaseError,
        check_no_local_paths,
        check_special_tokens,
        check_weights_only,
        front_matter,
        local_paths,
        model_card,
        release_files,
        resolve_license,
        training_facts,
    )
    from kfm.export.hf import check_exportable, export_hf, to_hf_state_dict
    from kfm.fs import atomic_write_text, check_output_dir, publish_dir
    from kfm.tokenizer.identity import check_tokenizer_identity, describe

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ReleaseError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if pii_sample < 1:
        raise ReleaseError(f"--pii-sample {pii_sample} must be >= 1 (training documents to audit)")
    run_dir, ckpt = _checkpoint(Path(run), step)
    manifest = read_manifest(ckpt)
    cfg = config_from_dict(manifest.get("config", {}), source=f"{ckpt}/manifest.json")
    check_exportable(cfg.model)  # before the PII audit and the weights
    tokenizer_dir = Path(cfg.tokenizer.path)
    identity = check_tokenizer_identity(
        tokenizer_dir, checkpoint=ckpt, config=cfg, tokenizer_given=False
    )
    if identity.unchecked is not None:
        raise ReleaseError(
            f"{describe(identity, tokenizer_dir)}; a release ships the tokenizer, so it must be "
            "checked: release a checkpoint whose manifest records tokenizer_hash"
        )
    sources = [Path(s.path) for s in cfg.data.sources]
    target = check_output_dir(
        out, "release", inputs=[ckpt, tokenizer_dir, *sources], overwrite=overwrite, flag="OUT"
    )
    name = name or f"kfm-{cfg.train.name}"
    lic = resolve_license(license, holder=f"The {name} authors", year=datetime.date.today().year)
    # Named relative to the run: check lines go into kfm_release.json, which must name no paths.
    checks = [
        f"tokenizer (sha256 {identity.tokenizer_hash[:12]}) is the one "
        f"{ckpt.relative_to(run_dir).as_posix()} was trained with"
    ]
    progress(f"check: {checks[0]}: ok")

    data_runs = _data_runs(sources)
    languages: dict[str, str] = {}
    for data_run in data_runs:
        for source_name, row in load_report(data_run)["sources"].items():
            if row.get("language"):
                languages[source_name] = str(row["language"])
    rows = _source_rows(cfg, languages)
    warnings = _license_warnings(rows, lic.name)
    for w in warnings:
        warn(f"warning: {w}")

    tok = identity.tokenizer  # loaded by the identity check
    pii, line = _pii_audit(cfg, tok, n_docs=pii_sample, max_per_million=pii_max)
    checks.append(line)
    progress(f"check: {line}: ok")
    index, unavailable = eval_index()
    notes = []  # about the release process, not the model: in kfm_release.json, not the card
    if unavailable:
        notes.append(
            f"eval sets not available here, so the release is not checked for their items: "
            f"{', '.join(unavailable)} (eval/registry.py says how to provide them)"
        )
        warn(f"warning: {notes[-1]}")

    benchmarks, table, bpb = _eval_results(run_dir, ckpt)

    tmp = target.parent / f".{target.name}.release-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        state, _ = load_model_state(ckpt)
        expected = set(to_hf_state_dict(state, cfg.model))
        export_hf(
            state,
            cfg.model,
            tmp,
            tokenizer_dir=tokenizer_dir,
            dtype=getattr(torch, DTYPES[dtype]),
            max_shard_size=max_shard_size,
        )
        del state
        (tmp / "kfm_export.json").unlink()  # names local paths; kfm_release.json replaces it
        hf = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        inputs = CardInputs(
            name=name,
            model=cfg.model,
            hf_class=hf["architectures"][0],
            model_type=hf["model_type"],
            dtype=DTYPES[dtype],
            license=lic,
            sources=rows,
            training=training_facts(
                cfg,
                step=int(manifest["step"]),
                world_size=int(manifest.get("world_size", 1)),
                metrics_jsonl=run_dir / "metrics.jsonl",
            ),
            tokenizer_hash=identity.tokenizer_hash,
            data_card=", ".join(r.name for r in data_runs) or None,
            benchmarks=benchmarks,
            benchmark_table=table,
            bpb=bpb,
            pii=pii,
            warnings=warnings,
        )
        card = model_card(inputs)
        atomic_write_text(tmp / CARD, card)
        atomic_write_text(tmp / "README.md", front_matter(inputs) + "\n" + card)
        atomic_write_text(tmp / DATA_CARD, _data_card(rows, data_runs, cfg) + _pii_section(pii))
        atomic_write_text(tmp / "LICENSE", lic.text)

        forbidden = local_paths(
            run_dir, ckpt, tokenizer_dir, *sources, *data_runs, tmp, target, out,
            Path.home(), Path.cwd(), Path(kfm.__file__).resolve().parents[1],
        )  # fmt: skip
        for check in (
            lambda: check_weights_only(tmp, expected),
            lambda: check_no_local_paths(tmp, forbidden),
            lambda: check_special_tokens(tmp, tokenizer_dir),
        ):
            line = check()
            checks.append(line)
            progress(f"check: {line}: ok")
        line = check_no_eval_items(tmp, index)
        checks.append(line)
        progress(f"check: {line}: ok")
        if after_checks:
            model, hf_tok, line = _generate_check(tmp)
            checks.append(line)
            progress(f"check: {line}: ok")
            line = _lm_eval_check(model, hf_tok)
            checks.append(line)
            progress(f"check: {line}: ok")
            del model
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in release_files(tmp)
        }
        marker = {
            "format": RELEASE_FORMAT,
            "version": 1,
            "created_by": f"kfm {kfm.__version__}",
            "name": name,
            "run": run_dir.name,
            "checkpoint": ckpt.relative_to(run_dir).as_posix(),
            "step": int(manifest["step"]),
            "tokenizer_hash": identity.tokenizer_hash,
            "license": lic.hub_id if lic.hub_id != "other" else lic.name,
            "dtype": DTYPES[dtype],
            "checks": checks,
            "warnings": warnings + notes,
            "files": files,
        }
        atomic_write_text(tmp / RELEASE_MARKER, json.dumps(marker, indent=2) + "\n")
        check_no_local_paths(tmp, forbidden)  # the marker too
        publish_dir(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Release(Path(out), files, checks, warnings + notes, time.perf_counter() - started)


def _pii_section(pii: PIIAuditResult) -> str:
    rows = "\n".join(f"| {t} | {n:,} |" for t, n in pii.spans.items())
    return (
        "\n## PII audit at release (kfm release)\n\n"
        f"A fixed random sample of {pii.documents:,} training documents ({pii.characters:,} "
        "characters) decoded from the packed shards, searched with `data_pipeline.pii.find_pii`:"
        f"\n\n| PII type | spans found |\n|---|---|\n{rows}\n\n"
        f"{pii.per_million:.1f} spans per million characters (release threshold "
        f"{pii.max_per_million:g}).\n"
    )


# ---- CLI -------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """The `kfm release` subcommand."""
    p = sub.add_parser(
        "release",
        help="build a checked open-release folder (HF model, cards, license) from a run",
        description="Build OUT: the Hugging Face folder of a checkpoint (sharded safetensors, "
        "config, generation config, tokenizer), MODEL_CARD.md and README.md (architecture, data, "
        "compute, evaluation, license, limits of medical use), DATA_CARD.md, LICENSE and "
        "kfm_release.json (files with sha256, checks passed). Checks, each printed: tokenizer "
        "hash, a PII audit of sampled training text, weights only (no optimizer state), no local "
        "paths in any file, special tokens intact, no eval-set items; then transformers loads and "
        "generates and lm-eval scores one task. The folder is built beside OUT and renamed only "
        "when every check passed.",
    )
    p.add_argument("run_dir", help="training run directory (or a checkpoint step dir)")
    p.add_argument("out", help="release folder to create (must not exist unless --overwrite)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    p.add_argument(
        "--license",
        default=DEFAULT_LICENSE,
        metavar="{" + ",".join(LICENSE_CHOICES) + "} | PATH",
        help=f"license of the weights (default {DEFAULT_LICENSE}), or a license text file",
    )
    p.add_argument(
        "--name", default=None, help="model name in the cards (default kfm-<train.name>)"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype to save")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"safetensors shard size (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.add_argument(
        "--pii-sample",
        type=int,
        default=DEFAULT_PII_SAMPLE,
        help=f"training documents the PII audit samples (default {DEFAULT_PII_SAMPLE})",
    )
    p.add_argument(
        "--pii-max",
        type=float,
        default=DEFAULT_PII_MAX,
        help="fail when the sample holds more PII spans per million characters "
        f"(default {DEFAULT_PII_MAX:g})",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it holds an earlier kfm release (never anything else); the old one "
        "is removed once the new one passed its checks",
    )
    p.set_defaults(func=cmd_release)


def cmd_release(args: argparse.Namespace, overrides: list[str]) -> int:
    from kfm.console import QUIET, verbosity

    def progress(line: str) -> None:
        if verbosity() > QUIET:
            print(line)

    done = release(
        args.run_dir,
        args.out,
        step=args.step,
        license=args.license,
        name=args.name,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        pii_sample=args.pii_sample,
        pii_max=args.pii_max,
        overwrite=args.overwrite,
        progress=progress,
        warn=lambda line: print(line, file=sys.stderr),
    )
    size = sum(f["size"] for f in done.files.values())
    print(
        f"released {done.out}: {len(done.files)} files, {size / 2**20:.1f} MiB, "
        f"{len(done.checks)} checks passed in {done.seconds:.0f} s"
    )
    return 0
