"""The texts of an open release and the checks that need only kfm: model card, license, and what
must not ship (training state, local paths, changed special tokens).

``kfm release`` (kfm_cli/release.py) assembles a release from these pieces; the checks that need
``eval/`` (the registry's test sets) or ``data_pipeline/`` (the PII finder, license flags) live
there, since kfm never imports those packages. Every function here is pure or reads only the
folder and files it is given.

A model card states only what the run recorded: numbers come from the checkpoint's config, the
run's metrics.jsonl, the shard manifests, the data card and the eval result files. Where a fact is
missing the card says so ("not evaluated", "not recorded"); it never estimates one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kfm.config import Config, ModelConfig

# torch, numpy and kfm.model are imported inside the functions that use them. (Importing this
# module still imports kfm.export and so transformers: kfm_cli/release.py keeps its own copy of
# the license ids for `kfm --help`, which tests/export/test_release.py holds equal to LICENSES.)

# ---- licenses --------------------------------------------------------------------------------

_LICENSE_DIR = Path(__file__).parent / "licenses"
LICENSES: dict[str, tuple[str, str]] = {
    "apache-2.0": ("Apache License 2.0", "apache-2.0.txt"),
    "mit": ("MIT License", "mit.txt"),
    "cc-by-4.0": ("Creative Commons Attribution 4.0 International", "cc-by-4.0.txt"),
}
"""--license choice (the Hugging Face Hub's license id) -> (name, text file under licenses/)."""


class ReleaseError(ValueError):
    """A release problem (bad option, missing input, failed check); the message names the fix."""


@dataclass(frozen=True, slots=True)
class License:
    """The license the weights are released under.

    hub_id is the Hub's license id for the README front matter ("other" for a license file given
    by path, whose name then goes to ``license_name``); text is the full LICENSE file.
    """

    hub_id: str
    name: str
    text: str


def resolve_license(choice: str, *, holder: str, year: int) -> License:
    """The license for ``--license``: a known id (``LICENSES``) or the path of a license file.

    The MIT text gets the copyright line ``Copyright (c) {year} {holder}``. Raises
    ``ReleaseError`` for an unknown id that is not a readable file either.
    """
    key = choice.lower()
    if key in LICENSES:
        name, filename = LICENSES[key]
        text = (_LICENSE_DIR / filename).read_text(encoding="utf-8")
        return License(key, name, text.replace("{year}", str(year)).replace("{holder}", holder))
    path = Path(choice)
    if not path.is_file():
        raise ReleaseError(
            f"--license {choice}: not one of {', '.join(LICENSES)} and not a license file; pass "
            "one of those ids or the path of a license text"
        )
    text = path.read_text(encoding="utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip()), path.name)
    return License("other", first[:80], text)


# ---- facts the card states -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One training source as the card lists it (counts from its shard set's manifest)."""

    name: str
    license: str
    weight: float
    docs: int | None = None
    tokens: int | None = None
    language: str | None = None
    flags: tuple[str, ...] = ()
    """License warnings ("non-commercial", "no license grant"); decided by the caller."""


@dataclass(frozen=True, slots=True)
class TrainingFacts:
    """What training the released checkpoint took, from its config and the run's metrics."""

    step: int
    steps_planned: int
    tokens: int
    """Tokens trained on up to ``step``: step x global_batch_size x seq_len."""
    seq_len: int
    global_batch_size: int
    world_size: int
    dtype: str
    lr: float
    flops: float
    """Training FLOPs: kfm.model.flops_per_token x tokens (forward + backward, attention included)."""
    device_hours: float | None
    """Sum over logged windows of steps x step time x world size / 3600 (None if no metrics):
    training steps only, without evaluation and checkpoint time."""


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of ``cfg``'s model, tied weights once (meta device)."""
    import torch

    from kfm.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return model.num_params(), model.num_params(exclude_embeddings=True)


def device_hours(metrics_jsonl: Path, *, up_to_step: int, world_size: int) -> float | None:
    """Device-hours of training steps up to ``up_to_step`` from a run's metrics.jsonl.

    Each logged line's step_time_s is the mean over the steps since the previous logged line,
    so a window contributes (steps in it) x step_time_s x world_size. A step logged twice (a
    resumed run) keeps its later line. None when the file is missing or logs no step times.
    """
    if not metrics_jsonl.is_file():
        return None
    times: dict[int, float] = {}
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step_time_s" in rec and rec.get("step", 0) <= up_to_step:
            times[int(rec["step"])] = float(rec["step_time_s"])
    if not times:
        return None
    seconds, previous = 0.0, 0
    for step in sorted(times):
        seconds += (step - previous) * times[step]
        previous = step
    return seconds * world_size / 3600


def training_facts(
    cfg: Config, *, step: int, world_size: int, metrics_jsonl: Path | None
) -> TrainingFacts:
    """The :class:`TrainingFacts` of a checkpoint at ``step`` trained with ``cfg``."""
    from kfm.model import flops_per_token

    tokens = step * cfg.train.global_batch_size * cfg.data.seq_len
    return TrainingFacts(
        step=step,
        steps_planned=cfg.train.steps,
        tokens=tokens,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        world_size=world_size,
        dtype=cfg.train.dtype,
        lr=cfg.optim.lr,
        flops=flops_per_token(cfg.model, cfg.data.seq_len) * tokens,
        device_hours=(
            None
            if metrics_jsonl is None
            else device_hours(metrics_jsonl, up_to_step=step, world_size=world_size)
        ),
    )


@dataclass(slots=True)
class PIIAuditResult:
    """Counts of the PII audit of a training-text sample (spans per PII type)."""

    documents: int
    characters: int
    spans: dict[str, int]
    max_per_million: float
    """The threshold: the audit fails above this many spans per 10^6 characters."""
    tokens_per_document: int
    """Each sampled document is read up to this many tokens."""

    @property
    def total(self) -> int:
        return sum(self.spans.values())

    @property
    def per_million(self) -> float:
        """Spans of all types per 10^6 characters sampled (0.0 for an empty sample)."""
        return self.total * 1e6 / self.characters if self.characters else 0.0


@dataclass(slots=True)
class CardInputs:
    """Everything the model card states, gathered by kfm_cli/release.py."""

    name: str
    model: ModelConfig
    hf_class: str
    model_type: str
    dtype: str
    license: License
    sources: list[SourceRow]
    training: TrainingFacts
    tokenizer_hash: str
    data_card: str | None
    """Where DATA_CARD.md came from (the data run's name), None if written from the manifests."""
    benchmarks: dict[str, Any] | None = None
    """``<run>/eval/<step>/results.json`` (lm-eval results + "kfm" metadata), if it exists."""
    benchmark_table: str | None = None
    """Those results as a Markdown table (eval.bench.markdown_table)."""
    bpb: dict[str, float] | None = None
    """Validation loss/bpb of ``kfm eval`` (val_bpb, val_bpb/<source>, val_bpb/lang/<code>)."""
    pii: PIIAuditResult | None = None
    warnings: list[str] = field(default_factory=list)


# ---- rendering -------------------------------------------------------------------------------


def _n(x: float | int | None, unit: str = "") -> str:
    if x is None:
        return "not recorded"
    if isinstance(x, int):
        return f"{x:,}{unit}"
    return f"{x:.4g}{unit}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def architecture_lines(
    cfg: ModelConfig, *, hf_class: str, model_type: str, dtype: str
) -> list[str]:
    """The card's architecture list (shared by `kfm export`'s README stub and the release card)."""
    from kfm.model import ffn_hidden_dim

    total, non_embedding = param_counts(cfg)
    head_dim = cfg.d_model // cfg.n_heads
    return [
        f"- class: `{hf_class}` (`model_type: {model_type}`)",
        f"- parameters: {total:,} ({total / 1e6:.1f} M); non-embedding: {non_embedding:,} "
        f"({non_embedding / 1e6:.1f} M)",
        f"- layers: {cfg.n_layers}, d_model: {cfg.d_model}, heads: {cfg.n_heads} "
        f"(kv heads: {cfg.n_kv_heads or cfg.n_heads}), head_dim: {head_dim}",
        f"- SwiGLU hidden: {ffn_hidden_dim(cfg)}, RMSNorm eps: {cfg.norm_eps}, "
        f"QK norm: {cfg.qk_norm}",
        f"- RoPE theta: {cfg.rope_theta}, context (max positions): {cfg.max_seq_len}",
        f"- vocabulary: {cfg.vocab_size}, tied embeddings: {cfg.tie_embeddings}",
        f"- weights stored as: {dtype}",
    ]


def front_matter(inputs: CardInputs) -> str:
    """The README's YAML front matter (Hub metadata): license, languages, tags, datasets."""
    meta: dict[str, Any] = {"library_name": "transformers", "license": inputs.license.hub_id}
    if inputs.license.hub_id == "other":
        meta |= {"license_name": inputs.license.name, "license_link": "LICENSE"}
    meta |= {
        "language": ["ko", "en"],
        "pipeline_tag": "text-generation",
        "tags": ["kfm", "medical", "biomedical", "causal-lm", "pretrained"],
        "datasets": [s.name for s in inputs.sources],
    }
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=None)
    return f"---\n{body}---\n"


def _eval_lines(inputs: CardInputs) -> list[str]:
    benchmarks, bpb = inputs.benchmarks, inputs.bpb
    if benchmarks is None and bpb is None:
        return [
            "Not evaluated: no benchmark results (`<run>/eval/<step>/results.json`) and no "
            "validation result of `kfm eval` exist for this checkpoint.",
            "",
        ]
    lines: list[str] = []
    if benchmarks is not None and inputs.benchmark_table:
        meta = benchmarks.get("kfm", {})
        limit = f", at most {meta['limit']} items per task" if meta.get("limit") else ""
        lines += [
            f"Benchmarks (lm-evaluation-harness, {meta.get('num_fewshot') or 0}-shot{limit}; "
            "chance = expected accuracy of a uniform guess):",
            "",
            inputs.benchmark_table,
            "",
        ]
    else:
        lines += ["Benchmarks: not evaluated (no `<run>/eval/<step>/results.json`).", ""]
    if bpb is not None:
        rows = [
            [key.removeprefix("val_bpb/") if "/" in key else "all", f"{value:.4f}"]
            for key, value in bpb.items()
            if key.startswith("val_bpb")
        ]
        lines += [
            f"Validation bits per byte (`kfm eval`, {_n(bpb.get('val_tokens'))} held-out tokens):",
            "",
            *_table(["split", "bits per byte"], rows),
            "",
        ]
    else:
        lines += ["Validation bits per byte: not evaluated (run `kfm eval`).", ""]
    return lines


def _pii_lines(pii: PIIAuditResult | None) -> list[str]:
    if pii is None:
        return ["Not run."]
    rows = [[t, _n(n)] for t, n in pii.spans.items()]
    return [
        f"The PII finder (`data_pipeline.pii.find_pii`) was run over a fixed random sample of "
        f"{pii.documents:,} training documents ({pii.characters:,} characters, each read up to "
        f"{pii.tokens_per_document:,} tokens) decoded from the packed shards. Training text was "
        "scrubbed by the curation pipeline; what is counted here is what remained (or what the "
        "finder mistakes for PII).",
        "",
        *_table(["PII type", "spans found"], rows),
        "",
        f"Total: {pii.total:,} spans, {pii.per_million:.1f} per million characters "
        f"(release threshold: {pii.max_per_million:g}).",
    ]


MEDICAL_USE = """\
This is a pretrained base model for research on Korean and English medical and biomedical
language. It is **not a medical device** and is not approved or validated for any clinical use.

- Do not use it for diagnosis, treatment, triage or any decision about a patient, or as a
  substitute for a qualified health professional.
- It continues text; it does not answer with verified facts. It can state false medical
  information fluently (hallucination), including wrong doses, contraindications and citations.
- It was evaluated only on the benchmarks listed above (if any), which measure multiple-choice
  accuracy, not safety or clinical usefulness. Performance on other tasks, languages, dialects
  or patient groups is unknown.
- It has had no instruction tuning, safety tuning or human-feedback alignment, and reflects the
  biases of its training text.
- Outputs shown to patients or clinicians need expert review."""


def model_card(inputs: CardInputs) -> str:
    """MODEL_CARD.md: architecture, data, training and compute, evaluation, PII audit, license,
    intended use and the limits of medical use. README.md is this with :func:`front_matter`."""
    cfg, t = inputs.model, inputs.training
    lines = [f"# {inputs.name}", ""]
    lines += [
        "A Korean + English medical/biomedical causal language model pretrained from scratch with "
        f"kfm, released in Hugging Face transformers format (checkpoint step {t.step:,}).",
        "",
    ]
    for warning in inputs.warnings:
        lines += [f"> **WARNING:** {warning}", ""]
    lines += ["## Architecture", ""]
    lines += architecture_lines(
        cfg, hf_class=inputs.hf_class, model_type=inputs.model_type, dtype=inputs.dtype
    )
    lines += ["", "## Training data", ""]
    rows = [
        [
            s.name,
            s.language or "-",
            _n(s.docs) if s.docs is not None else "-",
            _n(s.tokens) if s.tokens is not None else "-",
            f"{s.weight:g}",
            s.license + (f" **({', '.join(s.flags)})**" if s.flags else ""),
        ]
        for s in inputs.sources
    ]
    lines += _table(["source", "language", "documents", "tokens", "weight", "license"], rows)
    total_tokens = sum(s.tokens or 0 for s in inputs.sources)
    where = (
        f"the data card of the curation run `{inputs.data_card}`"
        if inputs.data_card
        else "the shard sets' manifests (no curation data card was found)"
    )
    lines += [
        "",
        f"{total_tokens:,} tokens in the shard sets (train + validation splits); weight = mixture "
        f"weight. Counts from the shard manifests; see `DATA_CARD.md` ({where}) for the filters, "
        f"deduplication, decontamination and licenses. Tokenizer sha256: `{inputs.tokenizer_hash}`.",
        "",
        "## Training",
        "",
        f"- steps: {t.step:,} of {t.steps_planned:,} planned; tokens seen: {t.tokens:,} "
        f"({t.global_batch_size} sequences x {t.seq_len} tokens per step)",
        f"- peak learning rate: {t.lr:g}; compute dtype: {t.dtype}",
        f"- world size: {t.world_size} device(s); device-hours: "
        + (
            "not recorded (no metrics.jsonl)"
            if t.device_hours is None
            else f"{t.device_hours:.4g} (training steps only)"
        ),
        f"- training FLOPs: {t.flops:.3e} (6 x matmul params + attention, per token, x tokens)",
        "",
        "## Evaluation",
        "",
        *_eval_lines(inputs),
        "## PII audit of the training text",
        "",
        *_pii_lines(inputs.pii),
        "",
        "## License",
        "",
        f"The weights are released under the {inputs.license.name} (`LICENSE`). The training "
        "data keeps its own licenses (table above, `DATA_CARD.md`).",
        "",
        "## Intended use and limits of medical use",
        "",
        MEDICAL_USE,
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")',
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")',
        'ids = tok("고혈압의 일차 치료는", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
        "`kfm_release.json` lists every file of this folder with its sha256 and the checks the "
        "release passed.",
        "",
    ]
    return "\n".join(lines)


# ---- checks ----------------------------------------------------------------------------------

TRAINING_STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".distcp", ".pkl", ".pickle", ".npy")
"""File types that hold pickled tensors or training state; a release ships safetensors only."""
_STATE_NAMES = re.compile(r"optim|trainer_state|scheduler|rng_state|^\.metadata$", re.IGNORECASE)


def release_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, hidden ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a .safetensors file (reads its JSON header only)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def _safetensors_header(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(size).decode("utf-8", errors="replace")


def check_weights_only(folder: Path, expected_keys: set[str]) -> str:
    """No optimizer or trainer state in ``folder``: no pickled/DCP files, no state file names,
    and the safetensors hold exactly the model's tensors (``expected_keys``, tied ones allowed
    to be absent). Returns the "ok" line; raises ``ReleaseError`` naming the file."""
    found: set[str] = set()
    n_weights = 0
    for path in release_files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.suffix in TRAINING_STATE_SUFFIXES or _STATE_NAMES.search(path.name):
            raise ReleaseError(
                f"{rel}: training state in the release (optimizer, trainer or DCP file); a "
                "release holds model weights only (safetensors): remove it"
            )
        if path.suffix == ".safetensors":
            n_weights += 1
            keys = set(safetensors_keys(path))
            if extra := sorted(keys - expected_keys):
                raise ReleaseError(
                    f"{rel}: tensors that are not model weights ({', '.join(extra[:5])}"
                    f"{' ...' if len(extra) > 5 else ''}); a release holds model weights only"
                )
            found |= keys
    missing = sorted(expected_keys - found - {"lm_head.weight"})
    if not n_weights or missing:
        raise ReleaseError(
            f"{folder}: model weights missing ({', '.join(missing[:5]) or 'no .safetensors'})"
        )
    return (
        f"weights only: {len(found)} tensors in {n_weights} safetensors file(s), no optimizer state"
    )


def _path_pattern(paths: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``paths`` as a whole path (or a prefix of a longer one)."""
    alts = sorted({p.rstrip("/\\") for p in paths if p.rstrip("/\\")}, key=len, reverse=True)
    if not alts:
        return None
    body = "|".join(re.escape(p) for p in alts)
    return re.compile(rf"(?:{body})(?=$|[/\\\s\"'`),;:\]}}])")


HOME_PATTERN = re.compile(r"(?:/home/|/Users/|[A-Za-z]:\\{1,2}Users\\{1,2})[A-Za-z0-9._-]+")
"""A user's home directory on Linux, macOS or Windows, whoever's machine wrote it."""


def local_paths(*paths: str | Path | None) -> list[str]:
    """The absolute forms (as given and with symlinks resolved) of ``paths`` that a release must
    not mention. A one-component path (``/root``, ``/tmp``) counts only with a slash after it,
    so that the word alone in a vocabulary or text is not taken for it."""
    out: set[str] = set()
    for p in paths:
        if p is None:
            continue
        for form in (os.path.abspath(p), os.path.realpath(p)):
            parts = Path(form).parts
            if len(parts) <= 1:
                continue
            out.add(form if len(parts) > 2 else form + os.sep)
    return sorted(out)


def check_no_local_paths(folder: Path, paths: Sequence[str]) -> str:
    """No file of ``folder`` mentions one of ``paths`` (see :func:`local_paths`) or a home
    directory: every file's text is scanned (safetensors: the JSON header). Returns the "ok"
    line; raises ``ReleaseError`` naming the file, line and path."""
    exact = _path_pattern(p for p in paths if not p.endswith(os.sep))
    prefixes = [p for p in paths if p.endswith(os.sep)]
    files = release_files(folder)
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            text = _safetensors_header(path)
        else:
            text = path.read_bytes().decode("utf-8", errors="replace")
        hits = [
            (m.start(), m.group(0))
            for pat in (exact, HOME_PATTERN)
            if pat
            for m in [pat.search(text)]
            if m
        ]
        hits += [(text.find(p), p) for p in prefixes if p in text]
        if hits:
            at, found = min(hits)
            line = text.count("\n", 0, at) + 1
            raise ReleaseError(
                f"{rel}:{line} holds the local path {found!r}; a release must not name "
                "paths of this machine: remove it at its source (config, data card, tokenizer) "
                "and release again"
            )
    return f"no local paths: {len(files)} files scanned"


_SPECIALS = ("bos", "eos", "pad")
_PROBE = "환자는 급성 심근경색으로 내원하였다. Metformin 500 mg twice daily."


def check_special_tokens(folder: Path, tokenizer_dir: Path) -> str:
    """The released tokenizer is the kfm tokenizer the model was trained with: bos/eos/pad
    strings and ids, every added (special) token, and the encoding of a Korean + English probe
    match; config.json and generation_config.json carry the same bos/eos/pad ids. Returns the
    "ok" line; raises ``ReleaseError`` naming what differs."""
    from transformers import AutoTokenizer

    from kfm.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer_dir)
    shipped = AutoTokenizer.from_pretrained(str(folder))
    problems = []
    for name in _SPECIALS:
        a = (getattr(ours, f"{name}_token"), getattr(ours, f"{name}_token_id"))
        b = (getattr(shipped, f"{name}_token"), getattr(shipped, f"{name}_token_id"))
        if a != b:
            problems.append(
                f"{name} token {b[0]!r} (id {b[1]}) in the release, {a[0]!r} (id {a[1]}) in kfm's tokenizer"
            )
    if ours.get_added_vocab() != shipped.get_added_vocab():
        diff = set(ours.get_added_vocab().items()) ^ set(shipped.get_added_vocab().items())
        problems.append(f"added tokens differ: {sorted(diff)[:4]}")
    if ours(_PROBE).input_ids != shipped(_PROBE).input_ids:
        problems.append("a Korean + English probe encodes to other ids")
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        for special in _SPECIALS:
            want = getattr(ours, f"{special}_token_id")
            if data.get(f"{special}_token_id") != want:
                problems.append(
                    f"{name}: {special}_token_id={data.get(f'{special}_token_id')} but the tokenizer's is {want}"
                )
    if problems:
        raise ReleaseError(
            f"special tokens of the release differ from the tokenizer {tokenizer_dir} the model "
            "was trained with: " + "; ".join(problems) + "; release again from the run's tokenizer"
        )
    ids = ", ".join(
        f"{n}={getattr(ours, f'{n}_token')}/{getattr(ours, f'{n}_token_id')}" for n in _SPECIALS
    )
    return f"special tokens intact ({ids}; {len(ours.get_added_vocab())} added tokens; config and generation config agree)"


# ---- sampling training text ------------------------------------------------------------------


def sample_training_text(
    shard_sets: Sequence[tuple[str, Path]],
    tokenizer: Any,
    *,
    n_docs: int,
    seed: int = 0,
    max_tokens: int = 4096,
) -> list[tuple[str, str]]:
    """A fixed random sample of training documents, decoded: [(source name, text), ...].

    ``n_docs`` draws are split evenly over the shard sets (the first ones take the remainder);
    in each, documents of the train split are drawn uniformly without replacement with a
    generator seeded by ``seed`` and the source's position, and each is read up to
    ``max_tokens`` tokens (bos/eos dropped) through memory-mapped .idx/.bin files: the cost is
    the sample, never the corpus. Raises ``ShardError`` (kfm.data.shards) for a missing or
    broken shard set.
    """
    import numpy as np

    from kfm.data.shards import ShardSet

    out: list[tuple[str, str]] = []
    n_sets = len(shard_sets)
    per_set = [n_docs // n_sets + (i < n_docs % n_sets) for i in range(n_sets)]
    for i, ((name, path), k) in enumerate(zip(shard_sets, per_set, strict=True)):
        shards = ShardSet.open(path, "train")  # checks the manifest and file sizes
        if k == 0 or shards.n_docs == 0:
            continue
        rng = np.random.default_rng([seed, i])
        picks = np.sort(rng.choice(shards.n_docs, size=min(k, shards.n_docs), replace=False))
        # Document d of the split lives in the file whose cumulative doc count passes d; its
        # token range comes from that file's .idx (int64 offsets, see kfm.data.shards).
        files = list(shards.manifest["splits"]["train"]["files"])
        doc_starts = np.cumsum([0] + [int(f["n_docs"]) for f in files])
        tok_starts = np.cumsum([0] + [int(f["n_tokens"]) for f in files])
        idxs: dict[int, np.ndarray] = {}
        for d in picks.tolist():
            f = int(np.searchsorted(doc_starts, d, side="right")) - 1
            if f not in idxs:
                idxs[f] = np.memmap(Path(path) / files[f]["idx"], dtype="<i8", mode="r")
            local = d - int(doc_starts[f])
            start, end = int(idxs[f][local]), int(idxs[f][local + 1])
            ids = shards.read(int(tok_starts[f]) + start, min(end - start, max_tokens + 2))
            kept = [t for t in ids.tolist() if t not in (shards.bos_id, shards.eos_id)]
            text = tokenizer.decode(kept, skip_special_tokens=False)
            # A cut document may end inside a character's bytes: drop its replacement char.
            out.append((name, text.rstrip("\ufffd") if end - start > max_tokens + 2 else text))
    return out
