"""PII detection and scrubbing: labelled-set recall/precision, exact spans, edge cases, the step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.pii import (
    PII_TYPES,
    PLACEHOLDERS,
    PIISpan,
    audit,
    find_pii,
    luhn_ok,
    pii_report,
    rrn_checksum_ok,
    scrub,
)
from kfm.tokenizer import PII_TOKENS
from tests.conftest import REPO
from tests.data_pipeline import pii_labelled_gen

LABELLED = Path(__file__).parent / "assets" / "pii_labelled.jsonl"
# Per type, on exact (type, start, end) matches. Each rule the scrubber has is needed to reach
# these: without spaced separators phone recall is 0.86, without 00-prefixed numbers 0.83,
# without the country-code check phone precision is 0.96; with the old issuer-prefix rule card
# recall is 0.49; without any one card guard (card word before an unseparated number, group
# layout, leading 0, table row, years) card precision is at most 0.95; without the corporate /
# barcode labels rrn and frn precision are 0.92 / 0.89. The one miss by design: an unseparated
# card with no card word before it (recall 54/55).
MIN_RECALL = 0.97
MIN_PRECISION = 0.97


def _load_labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]


def _score(rows: list[dict]) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Per-type recall and precision, counting exact (type, start, end) matches."""
    gold, pred, hit = Counter(), Counter(), Counter()
    errors = []
    for row in rows:
        want = {(s["type"], s["start"], s["end"]) for s in row["spans"]}
        got = {(s.type, s.start, s.end) for s in find_pii(row["text"])}
        gold.update(t for t, _, _ in want)
        pred.update(t for t, _, _ in got)
        hit.update(t for t, _, _ in want & got)
        if want != got:
            errors.append(f"{row['text']!r}: missed {want - got}, extra {got - want}")
    recall = {t: hit[t] / gold[t] for t in gold}
    precision = {t: hit[t] / pred[t] for t in pred}
    return recall, precision, errors


def test_labelled_file_is_what_the_generator_writes():
    assert LABELLED.read_text(encoding="utf-8") == pii_labelled_gen.render(
        pii_labelled_gen.generate()
    )


def test_labelled_file_shape():
    rows = _load_labelled()
    spans = [s for r in rows for s in r["spans"]]
    assert len(spans) >= 300 and sum(1 for r in rows if not r["spans"]) >= 150
    assert {s["type"] for s in spans} == set(PII_TYPES)
    forms = Counter(s["form"] for s in spans)
    for form in ("phone_spaced", "phone_00", "rrn_spaced", "credit_card_any", "credit_card_spaced"):
        assert forms[form] >= 10, form
    post2020 = [
        s
        for r in rows
        for s in r["spans"]
        if s["type"] == "rrn"
        and "*" not in (d := r["text"][s["start"] : s["end"]])
        and not rrn_checksum_ok("".join(c for c in d if c.isdigit()))
    ]
    assert len(post2020) >= 10
    # Hard negatives that pass Luhn: a card check alone would take each for a card.
    luhn_negatives = [
        d
        for r in rows
        if not r["spans"]
        for d in re.findall(r"(?<!\d)\d(?:[- ]?\d){12,18}(?!\d)", r["text"])
        if luhn_ok(re.sub(r"\D", "", d))
    ]
    assert len(luhn_negatives) >= 40


def test_labelled_recall_and_precision_per_type():
    recall, precision, errors = _score(_load_labelled())
    print(f"recall {recall}\nprecision {precision}")  # shown with pytest -s
    assert set(recall) == set(PII_TYPES) == set(precision)
    low = {t: (recall[t], precision[t]) for t in PII_TYPES}
    low = {t: rp for t, rp in low.items() if min(rp) < min(MIN_RECALL, MIN_PRECISION)}
    assert not low, (low, errors[:10])


def test_placeholders_are_the_tokenizer_special_tokens():
    assert set(PLACEHOLDERS) == set(PII_TYPES)
    assert sorted(PLACEHOLDERS.values()) == sorted(PII_TOKENS)
    assert PLACEHOLDERS["rrn"] == "<|rrn|>" and PLACEHOLDERS["url_cred"] == "<|url_cred|>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("연락처 010-0000-1234.", [("phone", 4, 17, "010-0000-1234")]),
        ("전화010.0000.1234로", [("phone", 2, 15, "010.0000.1234")]),
        ("Tel) 02)000-0000", [("phone", 5, 16, "02)000-0000")]),
        ("mail a.b@example.com.", [("email", 5, 20, "a.b@example.com")]),
        ("RRN 900101-1234568 ok", [("rrn", 4, 18, "900101-1234568")]),
        ("ARC 850315-5123456", [("frn", 4, 18, "850315-5123456")]),
        (
            "ip 192.0.2.15, v6 2001:db8::1",
            [("ip", 3, 13, "192.0.2.15"), ("ip", 18, 29, "2001:db8::1")],
        ),
        (
            "url https://u:pw@db.example.com/x).",
            [("url_cred", 4, 33, "https://u:pw@db.example.com/x")],
        ),
        ("건강보험증 번호 1-2345678-901", [("health_insurance", 9, 22, "1-2345678-901")]),
        ("card 4111 1111 1111 1111 1225", [("credit_card", 5, 24, "4111 1111 1111 1111")]),
        # Spaced and mixed separators.
        ("연락처 010 - 0000 - 1234.", [("phone", 4, 21, "010 - 0000 - 1234")]),
        ("Tel 02 - 000 - 1234", [("phone", 4, 19, "02 - 000 - 1234")]),
        ("전화 010. 0000. 1234", [("phone", 3, 18, "010. 0000. 1234")]),
        ("call 010-0000.1234 now", [("phone", 5, 18, "010-0000.1234")]),
        ("US 212 - 555 - 0100", [("phone", 3, 19, "212 - 555 - 0100")]),
        ("RRN 900101 - 1234568", [("rrn", 4, 20, "900101 - 1234568")]),
        ("건강보험 1 - 23456789 - 01", [("health_insurance", 5, 22, "1 - 23456789 - 01")]),
        # International numbers dialled with 00.
        ("Seoul 0082 10 0000 1234", [("phone", 6, 23, "0082 10 0000 1234")]),
        ("NY 001 212 555 0100", [("phone", 3, 19, "001 212 555 0100")]),
        ("London 0044 20 7946 0000.", [("phone", 7, 24, "0044 20 7946 0000")]),
        # Cards whatever the issuer: a Korean domestic 9xxx card, spaced hyphens, unseparated
        # after a card word.
        ("code 9111 1111 1111 1110", [("credit_card", 5, 24, "9111 1111 1111 1110")]),
        ("4111 - 1111 - 1111 - 1111", [("credit_card", 0, 25, "4111 - 1111 - 1111 - 1111")]),
        ("카드번호 9111111111111110", [("credit_card", 5, 21, "9111111111111110")]),
    ],
)
def test_exact_spans(text, expected):
    assert find_pii(text) == [PIISpan(*e) for e in expected]


def test_post_2020_rrn_with_failing_checksum_is_still_found():
    valid = "201015-3987651"
    digits = valid.replace("-", "")
    good_last = next(d for d in "0123456789" if rrn_checksum_ok(digits[:12] + d))
    bad = valid[:-1] + str((int(good_last) + 3) % 10)
    assert not rrn_checksum_ok(bad.replace("-", ""))
    assert [s.type for s in find_pii(f"주민번호 {bad} 확인")] == ["rrn"]
    assert [s.text for s in find_pii(f"주민번호 {bad[:6]}{bad[7:]}")] == [bad[:6] + bad[7:]]


def test_rrn_checksum_known_values():
    # 12 weighted digits of 900101-123456x: 9*2+0*3+0*4+1*5+0*6+1*7+1*8+2*9+3*2+4*3+5*4+6*5 = 124
    # 124 % 11 = 3 -> check digit (11 - 3) % 10 = 8.
    assert rrn_checksum_ok("9001011234568")
    assert not rrn_checksum_ok("9001011234567")


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
    for digits in ("9111111111111110", "0911111111111111", "2015201620172018"):
        assert luhn_ok(digits)  # the hard negatives below are hard


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # Luhn fails
        "accession 9111111111111110",  # Luhn ok, unseparated, no card word before it
        "lot 0911 1111 1111 1111",  # Luhn ok, a leading 0 (no card issuer has one)
        "serial 911111-111111-1110",  # (9111111111111110 again)  # Luhn ok, not a card's grouping
        "years 2015 2016 2017 2018",  # a row of years
        "catalogue 0012 3456 7890, REF 0028 1234 5678",  # 00 + no country's code
        "법인등록번호 110111-0123456",  # a corporation's public number, RRN-shaped
        "표준코드 8803225517597",  # an EAN-13 drug code that reads as an FRN
        "pages 1010 - 1018, 혈압 110 - 120 / 70 - 80",
        "admitted 2024-01-15, seen 2024.01.15",
        "birth 900101 and sample 240115-01",
        "not a date 900230-1234567 (30 February)",
        "accession 0101234567890123",
        "12-010-0000-1234-5",  # phone inside a longer hyphenated run
        "NDC 0002-3227-30, ISBN 978-89-6077-104-5, PMID 31234567",
        "version 1.2.3.4, v1.2.3.4, section 2.1.3.4",
        "12345678901 without insurance context",
        "대표번호 1588-0000",
        "HLA-B*58:01, 12:30:45",
        "https://example.com/a?page=2",
    ],
)
def test_hard_negatives(text):
    assert find_pii(text) == []


def test_health_insurance_needs_keyword_within_window():
    number = "12345678901"
    assert [s.type for s in find_pii(f"건강보험 {number}")] == ["health_insurance"]
    far = "건강보험 " + "가" * 25 + " " + number
    assert find_pii(far) == []


def test_overlap_longest_wins():
    # The URL holds an email-like "pw@db.example.com"; the whole URL must win, once.
    spans = find_pii("see https://u:pw@db.example.com/x now")
    assert [s.type for s in spans] == ["url_cred"]


def test_scrub_output_and_counts():
    text = "Call 010-0000-1234 or 010-0000-5678, mail a@example.com, RRN 201015-3987654."
    out, counts = scrub(text)
    assert out == "Call <|phone|> or <|phone|>, mail <|email|>, RRN <|rrn|>."
    assert counts == Counter({"phone": 2, "email": 1, "rrn": 1})
    out, counts = scrub(text, types=["email"])
    assert out == "Call 010-0000-1234 or 010-0000-5678, mail <|email|>, RRN 201015-3987654."
    assert counts == Counter({"email": 1})
    with pytest.raises(ValueError, match="unknown PII types"):
        scrub(text, types=["ssn"])


def test_scrub_is_idempotent_on_the_labelled_set():
    for row in _load_labelled()[:60]:
        once, _ = scrub(row["text"])
        assert scrub(once) == (once, Counter())


def test_pii_report_writes_spans_and_counts(tmp_path):
    src = tmp_path / "in.jsonl"
    docs = [
        {"id": "d1", "text": "메일 a@example.com 전화 02-000-0000"},
        {"text": "nothing here"},
    ]
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) + "\n")
    out = tmp_path / "report.jsonl"
    counts = pii_report(src, out)
    assert counts == {**dict.fromkeys(PII_TYPES, 0), "email": 1, "phone": 1}
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {
            "id": "d1",
            "spans": [
                {"type": "email", "start": 3, "end": 16, "text": "a@example.com"},
                {"type": "phone", "start": 20, "end": 31, "text": "02-000-0000"},
            ],
        },
        {"id": 2, "spans": []},
    ]


def test_pii_report_stdout(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 7, "text": "ip 192.0.2.1"}) + "\n")
    assert pii_report(src, None)["ip"] == 1
    assert json.loads(capsys.readouterr().out)["spans"][0]["text"] == "192.0.2.1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', "in.jsonl:2: not valid JSON"),
        ('{"body": "x"}\n', "in.jsonl:1: expected a JSON object with a string 'text'"),
    ],
)
def test_pii_report_names_the_bad_line(tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError, match=message):
        pii_report(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_scrubber_step_run():
    pytest.importorskip("datatrove")
    from datatrove.data import Document

    from data_pipeline.steps.pii_scrub import PIIScrubber, PIIScrubConfig

    docs = [
        Document(
            text="환자 010-0000-1234, 주민번호 201015-3987654",
            id="a",
            metadata={"source": "notes", "license": "CC-BY-4.0"},
        ),
        Document(text="HbA1c 6.5% on 2024-01-15", id="b", metadata={"source": "notes"}),
        Document(text="mail x@example.com, ip 192.0.2.9", id="c", metadata={"license": "MIT"}),
    ]
    step = PIIScrubber(PIIScrubConfig())
    out = list(step.run(iter(docs), rank=0, world_size=1))
    assert [d.id for d in out] == ["a", "b", "c"]
    assert out[0].text == "환자 <|phone|>, 주민번호 <|rrn|>"
    assert out[0].metadata == {
        "source": "notes",
        "license": "CC-BY-4.0",
        "pii_counts": {"phone": 1, "rrn": 1},
    }
    assert out[1].text == "HbA1c 6.5% on 2024-01-15" and out[1].metadata["pii_counts"] == {}
    assert out[2].text == "mail <|email|>, ip <|ip|>"
    totals = {k: step.stats[k].total for k in ("pii_phone", "pii_rrn", "pii_email", "pii_ip")}
    assert totals == {"pii_phone": 1, "pii_rrn": 1, "pii_email": 1, "pii_ip": 1}
    assert step.stats["total"].total == 3 == step.stats["forwarded"].total
    assert step.stats["documents_with_pii"].total == 2

    only_email = PIIScrubber(PIIScrubConfig(types=["email"]))
    (doc,) = only_email.run([Document(text="x@example.com 010-0000-1234", id="d")])
    assert doc.text == "<|email|> 010-0000-1234"


def test_scrub_config_rejects_unknown_type_with_hint():
    pytest.importorskip("datatrove")
    from data_pipeline.steps.pii_scrub import PIIScrubConfig

    with pytest.raises(ValueError, match="did you mean 'email'"):
        PIIScrubConfig(types=["emial"])


def test_package_import_does_not_import_datatrove():
    code = "import sys, data_pipeline, data_pipeline.pii; print('datatrove' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_scrubber_without_datatrove_names_the_extra():
    # A real interpreter in which importing datatrove fails, as on an install without kfm[data].
    code = (
        "import sys; sys.modules['datatrove'] = None\n"
        "from data_pipeline.steps.pii_scrub import PIIScrubber\n"
        "try:\n    PIIScrubber()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "pip install 'kfm[data]'" in out.stdout


# ---- the audit (kfm release) ----


def test_audit_counts_and_masks_every_value():
    phone, mail, rrn = "010-0000-1234", "kim.minsu@example.com", "201015-3987654"
    texts = [
        f"보호자 {phone}, 메일 {mail}, 주민번호 {rrn}, 외래 2024-01-15 10:30 방문.",
        "HbA1c 6.5% on 2024-01-15, no personal data.",
        f"Second call to {phone} at 10:30.",
    ]
    result = audit(iter(texts), examples_per_type=1, context_chars=12)
    assert (result.documents, result.characters) == (3, sum(map(len, texts)))
    assert result.spans == {**dict.fromkeys(PII_TYPES, 0), "phone": 2, "email": 1, "rrn": 1}
    assert result.documents_with == {
        **dict.fromkeys(PII_TYPES, 0),
        "phone": 2,
        "email": 1,
        "rrn": 1,
    }
    assert result.documents_with_pii == 2 and result.total_spans == 4
    assert [(e.type, e.document) for e in result.examples] == [
        ("phone", 0),
        ("email", 0),
        ("rrn", 0),
    ]
    assert result.examples[0].context == "보호자 [[###-####-####]], 메일 <|email|>"
    assert result.examples[2].context == "<|email|>, 주민번호 [[######-#######]], 외래 ####-##"
    dumped = json.dumps(result.to_dict(), ensure_ascii=False) + result.markdown()
    for value in (phone, mail, rrn, "0000", "1234", "kim", "3987654"):
        assert value not in dumped
    assert result.to_dict()["spans_per_million_characters"]["phone"] == pytest.approx(
        2e6 / result.characters
    )
    assert "| phone | 2 | 2 |" in result.markdown()


def test_audit_types_and_empty_input():
    result = audit(["mail a@example.com, phone 010-0000-1234"], types=["email"])
    assert result.types == ("email",) and result.spans == {"email": 1}
    empty = audit([])
    assert empty.documents == 0 and empty.spans_per_million_characters()["email"] == 0.0
    with pytest.raises(ValueError, match="unknown PII types"):
        audit([], types=["ssn"])


def test_audit_masks_a_neighbour_cut_by_the_context_window():
    # The email's context window ends inside the phone number: the whole phone is masked.
    result = audit(["a@example.com 010-0000-1234"], types=["email", "phone"], context_chars=5)
    assert result.examples[0].context == "[[x@xxxxxxx.xxx]] <|phone|>"
