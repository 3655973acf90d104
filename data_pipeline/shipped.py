"""Adapters for the pretraining sets shipped in the shared data folder (``../shared/data``).

Each set's SOURCE.md gives its provenance and license; `SHIPPED_SETS` maps the folder name to a
`ShippedSet` that turns the folder into `Record`s. Choices, per set:

- text is joined from the set's fields with wording unchanged (title + newline + body, question +
  newline + answer; PLOS: title, abstract and body separated by blank lines);
- sets of short sentences or chat pairs (KLUE, KorNLU, the chatbot pairs, the news sentences) are
  grouped, in file order, `SENTENCES_PER_DOC` per document one per line, so that quality filters
  see paragraphs rather than one-liners; sentence sets keep only the first occurrence of each
  sentence (STS sentences repeat across pairs);
- ids are stable across runs: the record's own id, or a part name and a fixed group number;
- attribution travels with the text (url, doi, journal, title, copyright_notice, attribution);
- a set without a stated license (OHSUMED) gets a license string starting with "unknown" so that
  license filters treat it as having no grant.

The evaluation sets of `eval.registry.EVAL_SETS` are deliberately not here: asking for one raises
ValueError. Two shipped folders hold a registered benchmark beside pretraining text (KLUE-NLI in
klue_dev/, XNLI-ko in kornlu/): `BENCHMARK_PARTS` names those parts, and a part whose set is
registered is not among the set's `parts` (never read; asking for it raises ValueError), because
decontamination cannot catch it all once sentences are regrouped and many are shorter than its
n-grams. `scripts/make_sample.py` builds the bundled sample with the adapters of this module.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from eval.registry import EVAL_SETS
from kfm.data.readers import ReaderError, Record, Rejection, json_lines, text_lines

SENTENCES_PER_DOC = 20
"""Sentences (or chat Q/A pairs) per document for the short-sentence sets."""
UNKNOWN_LICENSE = "unknown"
"""License of a document whose input, record and adapter state none."""
NO_GRANT = "unknown (no license stated; research use only)"
"""OHSUMED's license value: no redistribution grant, so license filters must treat it as unknown."""
EVAL_FOLDERS = frozenset(EVAL_SETS) | {
    Path(s.path).parts[0] for s in EVAL_SETS.values() if s.exclusive_folder
}
"""Shared-data folders and names of evaluation sets; never readable as pretraining input (folders
that also hold pretraining text, e.g. klue_dev/ beside KLUE-NLI, stay readable: their adapters
leave the benchmark's files out, see `BENCHMARK_PARTS`)."""
BENCHMARK_PARTS: dict[str, dict[str, str]] = {
    "klue_dev": {"nli": "klue_nli"},
    "kornlu": {"xnli": "xnli_ko"},
}
"""Shipped set -> {part: the `eval.registry.EVAL_SETS` set that part's text is}. While that set is
registered the part is not pretraining input: it is left out of the set's parts and refused."""

Reader = Callable[[Path, str], Iterator[Record | Rejection]]


@dataclass(frozen=True, slots=True)
class ShippedSet:
    """How to read one shipped set: its parts (the units tasks split by) and defaults."""

    name: str
    """Folder name under the shared data root."""
    license: str
    """License of its documents unless a record states its own."""
    language: str | None
    """ISO code of its text; None when it differs per part (korean_english_news)."""
    parts: tuple[str, ...]
    """Independently readable pieces, in reading order (benchmark parts excluded)."""
    files: tuple[str, ...]
    """Files the adapter reads, relative to the folder (checked before any work)."""
    read: Reader
    """(folder, part) -> records of that part, in file order; ValueError for a part not in parts
    (a benchmark part names its eval set)."""
    benchmark_parts: dict[str, str] = field(default_factory=dict)
    """Parts left out because their text is a registered eval set: part -> EVAL_SETS name."""


# ---- helpers shared with scripts/make_sample.py ----


def unique(items: Iterable[str]) -> list[str]:
    """Non-empty stripped strings, first occurrence kept, original order."""
    seen: set[str] = set()
    out = []
    for s in items:
        s = s.strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def group(lines: list[str], size: int = SENTENCES_PER_DOC) -> list[str]:
    """Consecutive `size` lines joined by newlines (the last group may be shorter)."""
    return ["\n".join(lines[i : i + size]) for i in range(0, len(lines), size)]


def read_text(path: Path) -> str:
    """A whole UTF-8 text file; ReaderError naming the file when it is not UTF-8."""
    try:  # bytes, not read_text: newlines inside quoted CSV fields must stay as they are
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReaderError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e


def tsv_columns(path: Path, cols: tuple[int, ...]) -> Iterator[str]:
    """The given columns of each row of a TSV file with a header, row by row."""
    # The KorNLU files hold unescaped double quotes, so csv quoting must be off.
    reader = csv.reader(
        io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    next(reader)  # header
    for row in reader:
        if len(row) > max(cols):
            yield from (row[c] for c in cols)


def plos_license(record: dict) -> str | None:
    """A PLOS article's license from its license_url / license_text; None if unrecognised."""
    url = (record.get("license_url") or "").lower()
    text = (record.get("license_text") or "").lower()
    if "publicdomain/zero" in url or "free of all copyright" in text or "cc0" in text:
        return "CC0-1.0"
    if "public domain declaration" in text:
        return "public-domain"
    if "creative commons attribution" in text or "/licenses/by/" in url:
        return "CC-BY"
    return None


def _grouped(lines: list[str], part: str, where: str) -> Iterator[Record]:
    for i, text in enumerate(group(lines)):
        yield Record(id=f"{part}/{i:04d}", text=text, where=f"{where} group {i}")


def _objects(path: Path) -> Iterator[tuple[str, dict | Rejection]]:
    for line_no, obj in json_lines(path):
        yield f"{path}:{line_no}", obj


# ---- one reader per set ----


def _medquad(folder: Path, part: str) -> Iterator[Record | Rejection]:
    seen: Counter[str] = Counter()
    for where, r in _objects(folder / "medquad.jsonl.gz"):
        if isinstance(r, Rejection):
            yield r
            continue
        # 8 CancerGov qids occur twice (different focus, same XML doc): a counter keeps ids unique.
        rid = f"{r['collection']}/{r['qid']}"
        seen[rid] += 1
        if seen[rid] > 1:
            rid += f"#{seen[rid]}"
        if not (r.get("answer") or "").strip():  # answers removed by the authors (MedlinePlus)
            yield Rejection("empty", where, "no answer (removed upstream)")
            continue
        meta = {k: r[k] for k in ("url", "focus", "qtype", "collection") if r.get(k)}
        yield Record(id=rid, text=r["question"] + "\n" + r["answer"], where=where, metadata=meta)


def _ohsumed(folder: Path, part: str) -> Iterator[Record | Rejection]:
    for where, r in _objects(folder / "ohsumed_single_23.jsonl.gz"):
        if isinstance(r, Rejection):
            yield r
            continue
        meta = {k: r[k] for k in ("title", "category", "split")}
        yield Record(id=r["id"], text=r["title"] + "\n" + r["abstract"], where=where, metadata=meta)


def _plos(folder: Path, part: str) -> Iterator[Record | Rejection]:
    for where, r in _objects(folder / "plos_starter_corpus.jsonl.gz"):
        if isinstance(r, Rejection):
            yield r
            continue
        parts = [p.strip() for p in (r["title"], r["abstract"], r["text"]) if p and p.strip()]
        keep = ("doi", "journal", "title", "license_url", "license_text")
        yield Record(
            id=r["id"],
            text="\n\n".join(parts),
            where=where,
            license=plos_license(r) or UNKNOWN_LICENSE,
            metadata={k: r[k] for k in keep if r.get(k)},
        )


def _craft(folder: Path, part: str) -> Iterator[Record | Rejection]:
    for where, r in _objects(folder / "craft_fulltext.jsonl.gz"):
        if isinstance(r, Rejection):
            yield r
            continue
        meta = {k: r[k] for k in ("pmid", "license_class", "copyright_notice")}
        yield Record(
            id=r["pmid"], text=r["text"], where=where, license=r["license_class"], metadata=meta
        )


def _openstax(file: str, book_url: str) -> Reader:
    attribution = f"OpenStax, Rice University, {book_url} (CC BY-NC-SA 4.0)"

    def read(folder: Path, part: str) -> Iterator[Record | Rejection]:
        for where, r in _objects(folder / file):
            if isinstance(r, Rejection):
                yield r
                continue
            meta = {k: r[k] for k in ("book", "chapter", "title", "module_id") if r.get(k)}
            meta["attribution"] = attribution
            text = r["title"] + "\n" + r["text"]
            yield Record(id=r["module_id"], text=text, where=where, metadata=meta)

    return read


def _medical_abstracts(folder: Path, part: str) -> Iterator[Record | Rejection]:
    path = folder / "medical_tc_test.csv.gz"
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ReaderError(f"{path}: corrupt, truncated or not UTF-8 ({e})") from e
    for row, r in enumerate(csv.DictReader(io.StringIO(raw, newline=""))):
        yield Record(
            id=f"medical_tc_test:{row}",
            text=r["medical_abstract"],
            where=f"{path}:row {row}",
            metadata={"condition_label": int(r["condition_label"])},
        )


def _klue_blocks(path: Path) -> Iterator[list[list[str]]]:
    """Rows (tab-split) of each sentence block of a KLUE NER/DP TSV; ## comment lines skipped."""
    for block in read_text(path).split("\n\n"):
        rows = [
            line.split("\t") for line in block.split("\n") if line and not line.startswith("##")
        ]
        if rows:
            yield rows


def _klue(folder: Path, part: str) -> Iterator[Record | Rejection]:
    if part in ("nli", "sts"):  # nli: read only when klue_nli is not a registered eval set
        fields = ("premise", "hypothesis") if part == "nli" else ("sentence1", "sentence2")
        file = folder / f"klue-{part}-v1.1_dev.json"
        rows = json.loads(read_text(file))
        sentences = unique(r[f] for r in rows for f in fields)
    elif part == "ner":  # one character per row (space included): tags dropped by construction
        file = folder / "klue-ner-v1.1_dev.tsv"
        sentences = unique("".join(r[0] for r in b) for b in _klue_blocks(file))
    else:  # dp: INDEX, WORD_FORM, LEMMA, POS, HEAD, DEPREL; word forms are space-separated
        file = folder / "klue-dp-v1.1_dev.tsv"
        sentences = unique(" ".join(r[1] for r in b) for b in _klue_blocks(file))
    yield from _grouped(sentences, part, str(file))


def _kornlu(folder: Path, part: str) -> Iterator[Record | Rejection]:
    files: tuple[str, ...]
    if part == "xnli":  # sentence1, sentence2, gold_label; read only when xnli_ko is unregistered
        files, cols = ("xnli.dev.ko.tsv", "xnli.test.ko.tsv"), (0, 1)
    else:  # genre, filename, year, id, score, sentence1, sentence2
        files, cols = ("sts-train.tsv", "sts-dev.tsv", "sts-test.tsv"), (5, 6)
    sentences = unique(s for name in files for s in tsv_columns(folder / name, cols))
    yield from _grouped(sentences, part, str(folder / files[0]))


def chatbot_pairs(folder: Path) -> list[str]:
    """The chatbot set's "question\\nanswer" pairs in file order (labels dropped)."""
    path = folder / "ChatbotData.csv"
    return [
        f"{r['Q'].strip()}\n{r['A'].strip()}"
        for r in csv.DictReader(io.StringIO(read_text(path), newline=""))
    ]


def _chatbot(folder: Path, part: str) -> Iterator[Record | Rejection]:
    for i, text in enumerate(group(chatbot_pairs(folder))):
        yield Record(id=f"{i:05d}", text=text, where=f"{folder}/ChatbotData.csv group {i}")


NEWS_PARTS = ("dev.ko", "dev.en", "test.ko", "test.en")


def _news(folder: Path, part: str) -> Iterator[Record | Rejection]:
    path = folder / f"korean-english-park.{part}"
    lines = []
    for _, line in text_lines(path):
        if isinstance(line, Rejection):
            yield line
        else:
            lines.append(line)
    language = part.rsplit(".", 1)[1]
    for rec in _grouped(unique(lines), part, str(path)):
        rec.language = language
        yield rec


def _with_parts(
    name: str,
    license: str,
    language: str | None,
    part_files: Mapping[str, tuple[str, ...]],
    read: Reader,
) -> ShippedSet:
    """A set of several parts (part -> the files it reads), less the parts of `BENCHMARK_PARTS`
    whose eval set is registered; its reader refuses a part it does not offer."""
    held_out = {
        part: eval_set
        for part, eval_set in BENCHMARK_PARTS.get(name, {}).items()
        if eval_set in EVAL_SETS
    }
    parts = tuple(p for p in part_files if p not in held_out)

    def checked(folder: Path, part: str) -> Iterator[Record | Rejection]:
        # A plain function (not a generator), so a refused part raises at the call.
        if part in held_out:
            raise ValueError(
                f"shipped set {name!r} part {part!r} is the benchmark set {held_out[part]!r} "
                "(eval/registry.py EVAL_SETS), so it is never read as pretraining input; "
                f"this set's pretraining parts: {', '.join(parts)}"
            )
        if part not in parts:
            raise ValueError(
                f"shipped set {name!r} has no part {part!r}; its parts: {', '.join(parts)}"
            )
        return read(folder, part)

    return ShippedSet(
        name=name,
        license=license,
        language=language,
        parts=parts,
        files=tuple(f for p in parts for f in part_files[p]),
        read=checked,
        benchmark_parts=held_out,
    )


def _one(name: str, license: str, language: str | None, file: str, read: Reader) -> ShippedSet:
    return ShippedSet(
        name=name, license=license, language=language, parts=("all",), files=(file,), read=read
    )


SHIPPED_SETS: dict[str, ShippedSet] = {
    s.name: s
    for s in (
        _one("medquad", "CC-BY-4.0", "en", "medquad.jsonl.gz", _medquad),
        _one("ohsumed_abstracts", NO_GRANT, "en", "ohsumed_single_23.jsonl.gz", _ohsumed),
        _one("plos_starter_corpus", "CC-BY", "en", "plos_starter_corpus.jsonl.gz", _plos),
        _one("craft_fulltext", UNKNOWN_LICENSE, "en", "craft_fulltext.jsonl.gz", _craft),
        _one(
            "openstax_anatomy_physiology_2e",
            "CC-BY-NC-SA-4.0",
            "en",
            "openstax_anatomy_physiology_2e.jsonl.gz",
            _openstax(
                "openstax_anatomy_physiology_2e.jsonl.gz",
                "https://openstax.org/details/books/anatomy-and-physiology-2e",
            ),
        ),
        _one(
            "openstax_microbiology",
            "CC-BY-NC-SA-4.0",
            "en",
            "openstax_microbiology.jsonl.gz",
            _openstax(
                "openstax_microbiology.jsonl.gz",
                "https://openstax.org/details/books/microbiology",
            ),
        ),
        _one(
            "medical_abstracts_tc",
            "CC-BY-SA-3.0",
            "en",
            "medical_tc_test.csv.gz",
            _medical_abstracts,
        ),
        _with_parts(
            "klue_dev",
            "CC-BY-SA-4.0",
            "ko",
            {
                t: (f"klue-{t}-v1.1_dev.{x}",)
                for t, x in (("nli", "json"), ("sts", "json"), ("ner", "tsv"), ("dp", "tsv"))
            },
            _klue,
        ),
        _with_parts(
            "kornlu",
            "CC-BY-SA-4.0",
            "ko",
            {
                "xnli": ("xnli.dev.ko.tsv", "xnli.test.ko.tsv"),
                "korsts": ("sts-train.tsv", "sts-dev.tsv", "sts-test.tsv"),
            },
            _kornlu,
        ),
        _one("korean_chatbot_data", "MIT", "ko", "ChatbotData.csv", _chatbot),
        ShippedSet(
            name="korean_english_news",
            license="CC-BY-SA-3.0",
            language=None,
            parts=NEWS_PARTS,
            files=tuple(f"korean-english-park.{p}" for p in NEWS_PARTS),
            read=_news,
        ),
    )
}


def get_shipped_set(name: str) -> ShippedSet:
    """The adapter of shipped set `name`.

    Raises:
        ValueError: `name` is an evaluation set, or no shipped pretraining set (closest named).
    """
    if name in EVAL_FOLDERS:
        raise ValueError(
            f"{name!r} is an evaluation set (eval/registry.py EVAL_SETS): it is never read as "
            "pretraining input; drop it from inputs (decontamination checks against it instead)"
        )
    if name not in SHIPPED_SETS:
        close = difflib.get_close_matches(name, SHIPPED_SETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown shipped set {name!r}{hint}; shipped pretraining sets: "
            f"{', '.join(SHIPPED_SETS)}"
        )
    return SHIPPED_SETS[name]
