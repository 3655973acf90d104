"""Build the bundled sample corpus under data/sample/ from /work/shared/data.

Re-runnable and deterministic: fixed selection order, sorted keys, gzip with mtime=0, so running it
twice gives byte-identical files. Only permissively licensed sets are used (CC BY, CC0/public
domain, MIT, CC BY-SA); non-commercial text (OpenStax), unlicensed text (OHSUMED) and every
evaluation set (PubMedQA, MedQA, MedMCQA, MMLU, and KLUE-NLI / XNLI-ko beside the Korean
pretraining text: the klue and kornlu files take only the parts the pipeline's adapters read,
`data_pipeline.shipped.SHIPPED_SETS[...].parts`) are deliberately left out.

Usage:
    python scripts/make_sample.py [--src /work/shared/data] [--out data/sample]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# The sentence-set parsing and grouping are the pipeline's own (data_pipeline.shipped), so the
# sample and a pipeline run over the shipped sets agree on them.
from data_pipeline.shipped import (
    SENTENCES_PER_DOC,
    SHIPPED_SETS,
    chatbot_pairs,
    group,
    plos_license,
)
from kfm.data.readers import Record

# Budgets in UTF-8 bytes of document text. English totals ~3 MB; Korean takes all the Korean
# pretraining text the permissive sets offer (~3.1 MB, ~1.28 M characters), because it is scarce.
MEDQUAD_BYTES = 1_300_000
PLOS_BYTES = 1_000_000
CRAFT_BYTES = 800_000
LIC_SA = "CC-BY-SA-4.0"

SOURCES = {
    "medquad": {
        "repo": "https://github.com/abachaa/MedQuAD",
        "commit": "577bd37b96c02d1833b2c9eed2de9f96964e96cb",
        "license": "CC BY 4.0",
        "cite": (
            'Asma Ben Abacha and Dina Demner-Fushman, "A Question-Entailment Approach to '
            'Question Answering", BMC Bioinformatics 20, 511 (2019). MedQuAD is published '
            "under a Creative Commons Attribution 4.0 International Licence (CC BY)."
        ),
    },
    "plos": {
        "repo": "https://github.com/PLOS/allofplos (starter_corpus)",
        "commit": "07fdeed848b2816a7fbf7da6418ef6e2076e1960",
        "license": "per article: CC BY (2.5/3.0/4.0) or CC0; see each record's license_text",
        "cite": (
            "Articles published by the Public Library of Science (PLOS); each record keeps its "
            "title, DOI, journal and the article's own license statement (license_text)."
        ),
    },
    "craft": {
        "repo": "https://github.com/UCDenver-ccp/CRAFT (articles/txt)",
        "commit": "2abe82b8bb8089448b84937d5f61d8c218011322",
        "license": "per article (PMC open access): CC BY, PLoS OA license, or public domain",
        "cite": (
            "Article texts from the CRAFT corpus (Colorado Richly Annotated Full-Text corpus, "
            "Bada et al., BMC Bioinformatics 2012); each record keeps the article's verbatim "
            "copyright notice (copyright_notice) and license_class."
        ),
    },
    "ko_chatbot": {
        "repo": "https://github.com/songys/Chatbot_data",
        "commit": "4cf20d13fc46f5037fd1c531cd566e2dd9f72974",
        "license": "MIT",
        "cite": "Chatbot_data by GitHub user songys (Copyright (c) 2018), MIT License; see licenses/.",
    },
    "klue": {
        "repo": "https://github.com/KLUE-benchmark/KLUE",
        "commit": "3efd98708a40ff49251fddde35453f8fbb11f536",
        "license": "CC BY-SA 4.0",
        "cite": (
            'Sungjoon Park et al., "KLUE: Korean Language Understanding Evaluation", NeurIPS '
            "Datasets and Benchmarks 2021. Licensed CC BY-SA 4.0; license text in licenses/."
        ),
    },
    "kornlu": {
        "repo": "https://github.com/kakaobrain/KorNLUDatasets",
        "commit": "0df0fe7d496eb61b092e022e238c2230b29f1cbc",
        "license": "CC BY-SA 4.0",
        "cite": (
            'Jiyeon Ham et al., "KorNLI and KorSTS: New Benchmark Datasets for Korean Natural '
            'Language Understanding", Findings of EMNLP 2020 (Kakao Brain). Licensed CC BY-SA '
            "4.0; license text in licenses/."
        ),
    },
}


def _read_jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _take_until(records: Iterable[dict], budget: int) -> list[dict]:
    """First records (in the given order) until their text reaches `budget` bytes."""
    out, used = [], 0
    for r in records:
        if used >= budget:
            break
        out.append(r)
        used += _nbytes(r["text"])
    return out


def medquad(src: Path) -> tuple[list[dict], str]:
    rows = [r for r in _read_jsonl_gz(src / "medquad/medquad.jsonl.gz") if r["answer"].strip()]
    # A fixed stride over the file order spreads the budget over all nine answered collections.
    total = sum(_nbytes(r["question"]) + _nbytes(r["answer"]) + 1 for r in rows)
    stride = max(1, -(-total // MEDQUAD_BYTES))  # ceil, so the stride reaches the last collection
    docs = [
        {
            "id": f"medquad/{r['collection']}/{r['qid']}",
            "text": r["question"] + "\n" + r["answer"],
            "source": "medquad",
            "license": "CC-BY-4.0",
            "url": r["url"],
            "focus": r["focus"],
            "qtype": r["qtype"],
        }
        for r in rows[::stride]
    ]
    return docs, (
        f"Only QA pairs with a non-empty answer ({len(rows)}); every {stride}th in file order "
        f"(~{MEDQUAD_BYTES // 1000} kB). text = question + newline + answer (wording "
        "unchanged); url, focus and qtype kept as fields."
    )


def _plos_license(r: dict) -> str:
    lic = plos_license(r)
    if lic is None:
        raise SystemExit(
            f"make_sample: PLOS article {r['id']} has an unrecognised license; check it"
        )
    return lic


def plos(src: Path) -> tuple[list[dict], str]:
    docs = []
    for r in _read_jsonl_gz(src / "plos_starter_corpus/plos_starter_corpus.jsonl.gz"):
        parts = [p.strip() for p in (r["title"], r["abstract"], r["text"]) if p and p.strip()]
        docs.append(
            {
                "id": f"plos/{r['id']}",
                "text": "\n\n".join(parts),
                "source": "plos_starter_corpus",
                "license": _plos_license(r),
                "license_text": r["license_text"],
                "license_url": r["license_url"],
                "title": r["title"],
                "doi": r["doi"],
                "journal": r["journal"],
            }
        )
    docs = _take_until(docs, PLOS_BYTES)
    return docs, (
        f"First {len(docs)} articles in corpus order until ~{PLOS_BYTES // 1000} kB. text = "
        "title, abstract and body joined by blank lines (wording unchanged); license_text, "
        "license_url, title, doi, journal kept as fields."
    )


# BMC-OA articles allow verbatim redistribution only; a training sample is better kept to
# licenses that allow reuse outright, so only these classes are taken.
CRAFT_CLASSES = ("CC-BY", "PLoS-OA-license (CC-BY-equivalent)", "public-domain")


def craft(src: Path) -> tuple[list[dict], str]:
    docs = [
        {
            "id": f"craft/{r['pmid']}",
            "text": r["text"],
            "source": "craft_fulltext",
            "license": r["license_class"],
            "license_class": r["license_class"],
            "copyright_notice": r["copyright_notice"],
            "pmid": r["pmid"],
        }
        for r in _read_jsonl_gz(src / "craft_fulltext/craft_fulltext.jsonl.gz")
        if r["license_class"] in CRAFT_CLASSES
    ]
    docs = _take_until(docs, CRAFT_BYTES)
    return docs, (
        f"First {len(docs)} articles in corpus order whose license_class is one of "
        f"{', '.join(CRAFT_CLASSES)} (BMC verbatim-only articles left out) until "
        f"~{CRAFT_BYTES // 1000} kB. text verbatim; copyright_notice and license_class kept."
    )


def ko_chatbot(src: Path) -> tuple[list[dict], str]:
    pairs = chatbot_pairs(src / "korean_chatbot_data")
    docs = [
        {"id": f"ko_chatbot/{i:05d}", "text": t, "source": "korean_chatbot_data", "license": "MIT"}
        for i, t in enumerate(group(pairs, SENTENCES_PER_DOC))
    ]
    return docs, (
        f"All {len(pairs)} Q/A pairs in file order, grouped {SENTENCES_PER_DOC} pairs per document "
        "(question line, answer line); labels dropped."
    )


def _shipped_parts(src: Path, shipped: str, prefix: str) -> tuple[list[dict], list[str]]:
    """All records of a shipped set's pretraining parts (the pipeline's adapter), as documents."""
    adapter = SHIPPED_SETS[shipped]
    docs = []
    for part in adapter.parts:
        for rec in adapter.read(src / shipped, part):
            if not isinstance(rec, Record):  # the KLUE/KorNLU readers reject nothing today
                raise SystemExit(f"make_sample: {rec.where}: {rec.reason} ({rec.detail})")
            docs.append(
                {"id": f"{prefix}/{rec.id}", "text": rec.text, "source": shipped, "license": LIC_SA}
            )
    return docs, list(adapter.parts)


def klue(src: Path) -> tuple[list[dict], str]:
    docs, parts = _shipped_parts(src, "klue_dev", "klue")
    return docs, (
        f"The pipeline's klue_dev parts {', '.join(parts)}: KLUE STS dev sentence1/sentence2, "
        "NER dev sentences (characters joined, tags dropped) and DP dev sentences (word forms "
        f"joined by spaces), each deduplicated (first occurrence kept), grouped "
        f"{SENTENCES_PER_DOC} sentences per document one per line; labels dropped. KLUE-NLI dev "
        "is left out: it is the benchmark set klue_nli (eval/registry.py)."
    )


def kornlu(src: Path) -> tuple[list[dict], str]:
    docs, parts = _shipped_parts(src, "kornlu", "kornlu")
    return docs, (
        f"The pipeline's kornlu parts {', '.join(parts)}: KorSTS train+dev+test "
        f"sentence1/sentence2, deduplicated (first occurrence kept), grouped {SENTENCES_PER_DOC} "
        "sentences per document one per line; labels and metadata dropped. XNLI-ko dev/test is "
        "left out: it is the benchmark set xnli_ko (eval/registry.py)."
    )


BUILDERS = {
    "medquad": medquad,
    "plos": plos,
    "craft": craft,
    "ko_chatbot": ko_chatbot,
    "klue": klue,
    "kornlu": kornlu,
}
LICENSE_FILES = {
    # source file (relative to --src) -> name under data/sample/licenses/
    "korean_chatbot_data/LICENSE": "Chatbot_data-MIT-LICENSE.txt",
    "klue_dev/License.md": "KLUE-CC-BY-SA-4.0-License.md",
    "kornlu/LICENSE": "KorNLUDatasets-CC-BY-SA-4.0-LICENSE.txt",
}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary repository files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonl_gz(docs: list[dict]) -> bytes:
    raw = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    buf = io.BytesIO()
    # mtime=0 and no file name in the header keep the output byte-identical across runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw.encode("utf-8"))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "data/sample")
    args = parser.parse_args(argv)
    for rel in ("medquad/SOURCE.md", "kornlu/SOURCE.md"):
        if not (args.src / rel).is_file():
            raise SystemExit(f"make_sample: {args.src / rel} not found; pass --src DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "licenses").mkdir(exist_ok=True)

    rows = []
    sections = []
    for name, build in BUILDERS.items():
        docs, changes = build(args.src)
        file = f"{name}.jsonl.gz"
        _atomic_write(args.out / file, _jsonl_gz(docs))
        n_chars = sum(len(d["text"]) for d in docs)
        n_bytes = sum(_nbytes(d["text"]) for d in docs)
        rows.append(
            f"| {file} | {len(docs)} | {n_chars:,} | {n_bytes:,} | {SOURCES[name]['license']} |"
        )
        s = SOURCES[name]
        sections.append(
            f"## {file}\n\n- Source repository: {s['repo']}\n- Commit: {s['commit']}\n"
            f"- License: {s['license']}\n- Attribution: {s['cite']}\n- Changes: {changes}\n"
        )
        print(f"{file}: {len(docs)} docs, {n_chars:,} chars, {n_bytes:,} bytes")
    for rel, dst in LICENSE_FILES.items():
        _atomic_write(args.out / "licenses" / dst, (args.src / rel).read_bytes())

    md = (
        "# data/sample: licenses and provenance\n\n"
        "Made by `python scripts/make_sample.py` (deterministic; re-run to rebuild). Each file is "
        "gzip JSONL, one document per line with at least `id`, `text`, `source`, `license`.\n"
        "Text wording is never changed; only selection, joining and grouping as listed below.\n"
        "Left out on purpose: non-commercial sets (OpenStax), sets without a license (OHSUMED), "
        "medical_abstracts_tc, and every evaluation set (PubMedQA, MedQA, MedMCQA, MMLU, "
        "KLUE-NLI, XNLI-ko).\n\n"
        "| file | documents | characters | UTF-8 bytes | license |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nLicense texts required by MIT and CC BY-SA are copied byte-for-byte in "
        "`licenses/`. The CC BY-SA 4.0 parts (klue, kornlu) stay under CC BY-SA 4.0.\n\n"
        + "\n".join(sections)
    )
    _atomic_write(args.out / "LICENSES.md", md.encode("utf-8"))
    # Not under the script's control, so a stale copy from an older layout is removed loudly.
    for p in sorted(args.out.glob("*.jsonl.gz")):
        if p.name.removesuffix(".jsonl.gz") not in BUILDERS:
            print(f"removing stale {p}")
            p.unlink()


if __name__ == "__main__":
    main()
