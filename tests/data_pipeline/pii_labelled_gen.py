"""Writes tests/data_pipeline/assets/pii_labelled.jsonl: the labelled PII test set.

Labels come from construction (each PII value is placed into a template and its offsets are
recorded), never from data_pipeline.pii. Values are fake: example.* domains, RFC 5737 / RFC 3849
addresses, 0000 phone blocks, 555-01xx NANP numbers; registration and card numbers are random
but carry valid dates/Luhn digits where the format needs them. Each span also records its
``form`` (the template slot: ``phone_spaced``, ``phone_00``, ``credit_card_any``...). The hard
negatives include numbers built to pass Luhn (accessions, orders, ISBN-13/EAN-13/GTIN-14 with
their own check digit, millisecond timestamps, lots with a leading 0, rows of years or counts,
serials in non-card groups), corporate registration numbers and 00 + unassigned country codes.
Run from the repository root:

    python -m tests.data_pipeline.pii_labelled_gen
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).parent / "assets" / "pii_labelled.jsonl"
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)


def luhn_digit(body: str) -> str:
    """The Luhn check digit to append to ``body``."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def rrn_check(first12: str, offset: int = 11) -> int:
    """Registration-number check digit (offset 11 residents, 13 old foreigner numbers)."""
    s = sum(int(d) * w for d, w in zip(first12, _RRN_WEIGHTS, strict=True))
    return (offset - s % 11) % 10


def _birth(rng: random.Random, g: str) -> str:
    century = {"1": 1900, "2": 1900, "5": 1900, "6": 1900, "9": 1800, "0": 1800}.get(g, 2000)
    yy = rng.randrange(0, 100) if century != 2000 else rng.randrange(0, 24)
    mm = rng.randrange(1, 13)
    dd = rng.randrange(1, calendar.monthrange(century + yy, mm)[1] + 1)
    return f"{yy:02d}{mm:02d}{dd:02d}"


def make_rrn(rng: random.Random, *, foreigner: bool, style: str) -> str:
    """A registration number; style picks checksum validity (valid / post2020) and separator."""
    g = rng.choice("5678" if foreigner else ("1234" * 5 + "90"))
    front = _birth(rng, g)
    tail = "".join(str(rng.randrange(10)) for _ in range(5))
    body = front + g + tail
    good = rrn_check(body, 13 if foreigner else 11)
    # Post-2020 numbers: random last digits, here forced to FAIL the old checksum.
    if style == "masked":
        return f"{front}-{g}******"
    last = good if style.startswith("valid") else (good + rng.randrange(1, 10)) % 10
    sep = {"valid": "-", "post2020": "-", "valid_nosep": "", "post2020_space": " "}.get(
        style, " - "
    )
    return f"{front}{sep}{g}{tail}{last}"


def make_card(rng: random.Random) -> str:
    """A Luhn-valid card number with a real issuer prefix, in a usual grouping."""
    prefix, length = rng.choice(
        [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15)]
        + [("37", 15), ("6011", 16), ("65", 16), ("3530", 16), ("62", 19), ("36", 14)]
    )
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    digits = body + luhn_digit(body)
    sep = rng.choice(["-", " ", ""])
    if length == 15 or length == 14:
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif length == 13:
        groups = [digits[:4], digits[4:7], digits[7:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, length, 4)]
    return sep.join(groups)


def _luhn_number(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def make_card_any_prefix(rng: random.Random) -> str:
    """A Luhn-valid 16-digit card whose issuer prefix is none of the big networks' (Korean
    domestic 9xxx cards, UATP 1xxx, private-label 7xxx/8xxx), printed in groups of four."""
    digits = _luhn_number(rng, rng.choice(["9410", "9490", "1", "7", "8"]), 16)
    sep = rng.choice(["-", " ", " - "])
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def make_card_spaced(rng: random.Random) -> str:
    """A card in groups separated by a spaced hyphen: ``4111 - 1111 - 1111 - 1111``."""
    digits = _luhn_number(rng, rng.choice(["4", "51", "9410", "62"]), 16)
    return " - ".join(digits[i : i + 4] for i in range(0, 16, 4))


def make_card_plain(rng: random.Random) -> str:
    """An unseparated Luhn-valid 15/16-digit card number, any issuer prefix."""
    prefix, length = rng.choice([("4", 16), ("9410", 16), ("37", 15), ("1", 15), ("55", 16)])
    return _luhn_number(rng, prefix, length)


def make_luhn_invalid_card(rng: random.Random) -> str:
    """A 16-digit Visa-shaped number whose Luhn digit is wrong (must not match)."""
    body = "4" + "".join(str(rng.randrange(10)) for _ in range(14))
    bad = (int(luhn_digit(body)) + rng.randrange(1, 10)) % 10
    d = body + str(bad)
    return " ".join(d[i : i + 4] for i in range(0, 16, 4))


def make_phone(rng: random.Random) -> str:
    n = f"{rng.randrange(10000):04d}"
    m = f"{rng.randrange(100):02d}"
    return rng.choice(
        [
            f"010-0000-{n}",
            f"010 0000 {n}",
            f"010.0000.{n}",
            f"0100000{n}",
            f"011-000-{n}",
            f"016-000-{n}",
            f"019-0000-{n}",
            f"02-000-{n}",
            f"02-0000-{n}",
            f"(02) 000-{n}",
            f"031-000-{n}",
            f"051.000.{n}",
            f"064 000 {n}",
            f"070-0000-{n}",
            f"0505-000-{n}",
            f"+82 10-0000-{n}",
            f"+82-10-0000-{n}",
            f"+82 (0)10 0000 {n}",
            f"+82-2-000-{n}",
            f"+1 (212) 555-01{m}",
            f"(212) 555-01{m}",
            f"617-555-01{m}",
            f"+44 20 7946 0{n[:3]}",
            f"+81 3-0000-{n}",
            f"+86 10 0000 {n}",
            f"+49 30 000000{m}",
        ]
    )


def make_email(rng: random.Random) -> str:
    user = rng.choice(["jdoe", "kim.minsu", "patient42", "lee_j", "hong+clinic", "park.sy"])
    dom = rng.choice(["example.com", "example.org", "mail.example.net", "hospital.example.co.kr"])
    return f"{user}{rng.randrange(100)}@{dom}"


def make_hi(rng: random.Random) -> str:
    d = "".join(str(rng.randrange(10)) for _ in range(11))
    return rng.choice([d, f"{d[0]}-{d[1:9]}-{d[9:]}", f"{d[:1]}-{d[1:]}", f"{d[:5]} {d[5:]}"])


def make_hi_spaced(rng: random.Random) -> str:
    """An 11-digit insurance number in groups joined by spaced hyphens: ``1 - 23456789 - 01``."""
    d = "".join(str(rng.randrange(10)) for _ in range(11))
    return f"{d[0]} - {d[1:9]} - {d[9:]}"


def make_ip(rng: random.Random) -> str:
    return rng.choice(
        [
            f"192.0.2.{rng.randrange(1, 255)}",
            f"198.51.100.{rng.randrange(1, 255)}",
            f"203.0.113.{rng.randrange(1, 255)}",
            f"2001:db8::{rng.randrange(1, 0xFFFF):x}",
            f"2001:db8:0:0:0:0:0:{rng.randrange(1, 0xFFFF):x}",
            f"2001:db8:85a3::8a2e:370:{rng.randrange(1, 0xFFFF):x}",
        ]
    )


def make_url_cred(rng: random.Random) -> str:
    tok = "".join(rng.choice("abcdefghijkmnpqrstuvwxyz0123456789") for _ in range(16))
    return rng.choice(
        [
            f"https://admin:{tok}@emr.example.com/records",
            f"ftp://backup:{tok}@files.example.org/dump.sql",
            f"postgres://svc_user:{tok}@db.example.net:5432/clinic",
            f"https://api.example.com/v2/patients?id=17&api_key={tok}",
            f"https://pacs.example.org/view?study=88&token={tok}",
            f"http://lab.example.com/login?user=kim&password={tok}",
            f"https://s3.example.com/bucket/report.pdf?X-Amz-Expires=60&signature={tok}",
        ]
    )


def make_phone_spaced(rng: random.Random) -> str:
    """Phone numbers with spaced hyphens/dots or mixed separators."""
    n = f"{rng.randrange(10000):04d}"
    m = f"{rng.randrange(100):02d}"
    return rng.choice(
        [
            f"010 - 0000 - {n}",
            f"010 - 000 - {n}",
            f"02 - 000 - {n}",
            f"031 - 000 - {n}",
            f"010. 0000. {n}",
            f"010 .0000 .{n}",
            f"010-0000.{n}",
            f"010 0000-{n}",
            f"(02) 000 - {n}",
            f"070 - 0000 - {n}",
            f"+82 10 - 0000 - {n}",
            f"212 - 555 - 01{m}",
        ]
    )


def make_phone_00(rng: random.Random) -> str:
    """International numbers dialled with the 00 prefix instead of +."""
    n = f"{rng.randrange(10000):04d}"
    m = f"{rng.randrange(100):02d}"
    return rng.choice(
        [
            f"0082 10 0000 {n}",
            f"0082-10-0000-{n}",
            f"0082 2 000 {n}",
            f"008210000{n}",
            f"001 212 555 01{m}",
            f"001-617-555-01{m}",
            f"0044 20 7946 0{n[:3]}",
            f"0081 3 0000 {n}",
            f"0086 10 0000 {n}",
            f"00852 0000 {n}",
        ]
    )


MAKERS: dict[str, Callable[[random.Random], str]] = {
    "email": make_email,
    "phone": make_phone,
    "phone_spaced": make_phone_spaced,
    "phone_00": make_phone_00,
    "rrn": lambda r: make_rrn(
        r, foreigner=False, style=r.choice(["valid", "post2020", "valid_nosep", "post2020_space"])
    ),
    "rrn_post2020": lambda r: make_rrn(r, foreigner=False, style="post2020"),
    "rrn_masked": lambda r: make_rrn(r, foreigner=False, style="masked"),
    "rrn_spaced": lambda r: make_rrn(r, foreigner=False, style="spaced"),
    "frn_spaced": lambda r: make_rrn(r, foreigner=True, style="spaced"),
    "frn": lambda r: make_rrn(r, foreigner=True, style=r.choice(["valid", "post2020"])),
    "health_insurance": make_hi,
    "health_insurance_spaced": make_hi_spaced,
    "credit_card": make_card,
    "credit_card_any": make_card_any_prefix,
    "credit_card_spaced": make_card_spaced,
    "credit_card_plain": make_card_plain,
    "ip": make_ip,
    "url_cred": make_url_cred,
}

# Templates: {slot} is replaced by a value of that kind; the label type drops a "_suffix".
POSITIVE_TEMPLATES = [
    "퇴원 요약: 환자 연락처 {phone}, 보호자 연락처 {phone}.",
    "외래 예약 변경은 담당 간호사({phone})에게 문의하십시오.",
    "Referral letter: please contact the patient at {phone} or {email}.",
    "주민등록번호 {rrn} 환자, 2형 당뇨로 내원함.",
    "성명: 홍길동 / 주민번호: {rrn_post2020} / 진료과: 내분비내과",
    "신분 확인: {rrn_post2020} (2020년 10월 이후 발급 번호).",
    "주민등록번호 {rrn_masked} 로 본인 확인 완료.",
    "Patient ID (RRN) {rrn}; admitted for community-acquired pneumonia.",
    "외국인등록번호 {frn} 환자, 통역 서비스 요청.",
    "Foreign resident registration no. {frn}, insured via employer.",
    "외국인 환자(등록번호 {frn}), 보호자 연락처 {phone}.",
    "ARC number {frn}; interpreter booked for the follow-up.",
    "건강보험증 번호 {health_insurance} 확인 후 접수.",
    "건강보험 가입자번호: {health_insurance}, 피부양자 등록 필요.",
    "Health insurance card no. {health_insurance} was verified at admission.",
    "보험증번호 {health_insurance}, 본인부담 산정특례 적용.",
    "Member ID {health_insurance} (national health insurance).",
    "결제 카드 {credit_card} 로 외래 진료비 수납.",
    "Paid the copay with card {credit_card}; receipt emailed to {email}.",
    "The billing system stored {credit_card} in plain text, which is a violation.",
    "EMR 접속 로그: {ip} 에서 로그인 시도 5회.",
    "Access from {ip} was blocked by the hospital firewall at 02:14.",
    "PACS server {ip}, backup server {ip}.",
    "설정 파일에 {url_cred} 가 그대로 남아 있었음.",
    "The integration script calls {url_cred} every night.",
    "문의: {email} / 전화 {phone}",
    "Discharge note sent to the GP at {email}; follow-up call to {phone} in 2 weeks.",
    "보호자 {phone}, 이메일 {email}, 주민번호 {rrn}.",
    "Contact: {phone}. Insurance card number {health_insurance}.",
    "환자 휴대폰{phone}로 검사 결과 문자 발송.",
    "응급 연락처는 {phone}이며 주소지는 서울시 종로구.",
    "Patient requested records be faxed to {phone}.",
    "Signed in from {ip} using {url_cred}.",
    "등록번호 {rrn}, 카드 {credit_card}, IP {ip}.",
    "Ref: {email}; HbA1c 7.1% on 2024-03-02; callback {phone}.",
    "Support group, 12 Main St, Bethesda, MD 20892-3655 Phone: {phone} E-mail: {email}",
    # Spaced and mixed separators, 00-prefixed international numbers.
    "보호자 연락처: {phone_spaced} (야간 연락 가능).",
    "Callback number {phone_spaced}, ask for the ward clerk.",
    "환자 휴대전화 {phone_spaced}, 자택 {phone_spaced}.",
    "해외 거주 보호자 연락처 {phone_00}.",
    "Family abroad can be reached at {phone_00} after 6 pm.",
    "From overseas, dial {phone_00} to reach the patient's daughter.",
    "연락처 {phone_spaced} / 해외 {phone_00} / 이메일 {email}",
    "주민등록번호 {rrn_spaced} 로 수진자 자격 조회.",
    "RRN {rrn_spaced} was written on the consent form.",
    "외국인등록번호 {frn_spaced}, 체류자격 E-9.",
    "건강보험증번호 {health_insurance_spaced} 확인 후 수납.",
    # Cards of any issuer prefix, spaced hyphens, unseparated next to a card word.
    "Card on file: {credit_card_any}; expiry 12/27.",
    "국내 전용 카드 {credit_card_any} 로 결제함.",
    "The scanned form showed {credit_card_any} in the payment box.",
    "체크카드 번호 {credit_card_spaced} 입력 오류로 재결제.",
    "Credit card {credit_card_spaced} was declined twice.",
    "카드번호 {credit_card_plain} 가 상담 메모에 남아 있음.",
    "Visa card number {credit_card_plain} was typed into the free-text field.",
]

NEGATIVE_LINES = [
    "Admission date 2024-01-15, discharge date 2024-01-22.",
    "입원일 2024.01.15, 퇴원일 2024.01.22.",
    "검사일: 2023/11/30 09:30, 결과 보고 2023-12-01.",
    "NDC 0002-3227-30 (atorvastatin) was dispensed.",
    "NDC 50090-2875-1 and NDC 0378-3512-77 were substituted.",
    "ATC code A10BA02 (metformin); ATC C09AA05 (ramipril).",
    "HbA1c 6.5%, fasting glucose 126 mg/dL.",
    "WBC 7.2 x10^3/uL, Hb 13.4 g/dL, Plt 250 x10^3/uL.",
    "Na 140 mmol/L, K 4.1 mmol/L, Cr 0.92 mg/dL, eGFR 88 mL/min/1.73m2.",
    "혈압 120/80 mmHg, 맥박 72회/분, 체온 36.5도.",
    "ISBN 978-89-6077-104-5 (대한내과학회 교과서).",
    "ISBN 978-0-07-180215-4, Harrison's Principles of Internal Medicine.",
    "ISBN-10 0-07-180215-9 is the older edition.",
    "doi:10.1056/NEJMoa2034577",
    "https://doi.org/10.1001/jama.2020.12839",
    "PMID: 31234567; PMCID: PMC7654321.",
    "PMID 34567890 and PMID 28912345 report similar findings.",
    "Software version 1.2.3.4 was used for the analysis.",
    "EMR 버전 2.10.3.1 업데이트 후 재시작.",
    "We used SPSS ver. 25.0.0.1 and R 4.3.1.",
    "See section 2.1.3.4 of the guideline.",
    "Table 3.2.1.4 lists the adverse events.",
    "Build 10.0.19045.3803 of the workstation OS was installed.",
    "v1.2.3.4 of the pipeline fixed the bug.",
    "대표전화 1588-0000, 예약센터 1577-0000.",
    "고객센터 1600-0000 으로 문의하세요 (평일 09:00-18:00).",
    "Specimen accession 0101234567890123 was received.",
    "Lot number 010000012345678 expired.",
    "Order no. 02123456789012 was cancelled.",
    "BRCA1, BRCA2, TP53, EGFR L858R, KRAS G12C mutations were tested.",
    "HLA-B*58:01 carriers should avoid allopurinol.",
    "HLA-DRB1*04:01:01 allele was detected.",
    "IL-6, TNF-α, CD4+ T cells and HER2 3+ were reported.",
    "생년월일 900101, 성별 남.",
    "Sample 240115-01 and 240115-02 were run in duplicate.",
    "검체번호 231130-A12 접수.",
    "Invalid date form 991332-1234567 is not a registration number.",
    "Code 900230-1234567 has no 30th of February.",
    "Code 230229-3123456 has no 29 February 2023.",
    "Ratio 1:2:3 and time 12:30:45 were recorded.",
    "Dose 2.5 mg bid, then 5 mg qd; titrate by 2.5 mg every 2 weeks.",
    "ICD-10 E11.9, I10, J18.9; KCD-8 코드 E11.9.",
    "EDI 코드 643304681, 약가 1,234원.",
    "보험 청구 코드 AA157, 수가 12,345원.",
    "Visit https://www.example.com/guidelines/diabetes for details.",
    "자세한 내용은 https://example.org/faq?page=2&lang=ko 참고.",
    "The API docs are at https://api.example.com/v2/docs?section=auth.",
    "Patient weight 72.5 kg, height 172.3 cm, BMI 24.4.",
    "Creatinine clearance 85.2 mL/min.",
    "Reference range 3.5-5.0 mmol/L.",
    "The p-value was 0.003 (95% CI 1.12-2.45).",
    "Figure 1.2.3.4 shows the flow diagram.",
    "Chapter 10.2.1.3 covers insulin titration.",
    "GenBank accession NM_000546.6 (TP53).",
    "rs1801133 (MTHFR C677T) genotype CT.",
    "E-value 1e-10, bitscore 250.3.",
    "2023년 10월 15일 외래 방문, 다음 방문 2023년 11월 12일.",
    "진료비 총액 1,234,567원 중 본인부담 123,456원.",
    "Serial number 1234-5678-9012 of the infusion pump.",
    "Room 1203, bed 4; ward 12-3.",
    "UDI (01)00884838012345(17)251231(10)A123.",
    "Zip code 03080, 서울특별시 종로구.",
    "MRN placeholder XXXXXX was redacted upstream.",
    "Telephone consultations are offered weekdays 09:00-17:00.",
    "The study enrolled 1,234 patients between 2019 and 2021.",
    "Use 0.9% NaCl 1000 mL over 8 h.",
    "Insulin glargine 10 units at 22:00.",
    "IP 주소는 개인정보에 해당하므로 기록하지 않는다.",
    "Email addresses were removed before analysis.",
    "PubMed query: diabetes[MeSH] AND 2020:2024[dp].",
    "Coordinates 37.5665, 126.9780 (Seoul).",
    "Trial NCT04368728 enrolled 43,548 participants.",
    "CAS 657-24-9 (metformin), CAS 134523-00-5 (atorvastatin).",
    "KFDA 허가번호 제2023-0123호.",
    "UNII 9100L32L2N identifies metformin hydrochloride.",
    "Follow up in 3-6 months.",
    "OR 1.23 (1.01-1.45), HR 0.85 (0.72-0.99).",
    "Version history: 0.9.1, 1.0.0, 1.0.1.",
    "Catechol O-methyltransferase (EC 2.1.1.6) activity was measured.",
    "Adenosine deaminase (ADA, E.C. 3.5.4.4) levels were raised.",
    "Acetylcholinesterase [Enzyme Commission (EC) No. 3.1.1.8] in postmortem brain.",
    "Dose table (kg, mL, drops): 225 11 16 250 13 18 275 14 19 300 15 21 325 16 23.",
    "For appointments call the toll-free line 1-800-555-0199.",
    "NLM toll-free (888) 555-0142, weekdays.",
    "사업자등록번호 123-45-67890 (의료법인 대표 번호).",
    "Pages 1010 - 1018 and 2010 - 2014 of the proceedings.",
    "혈압 110 - 120 / 70 - 80 mmHg 로 안정적.",
    "Visit on 02 - 05 - 2024 was rescheduled.",
    "doi:10.1371/journal.pone.0123456",
    "https://doi.org/10.1186/s12916-019-1234-5",
    "PMCID PMC7654321, GenBank MN908947.3, SRA SRR12345678.",
    "Assembly GCF_000001405.40 (GRCh38.p14) was used for alignment.",
    "Catalog no. 0012 3456 7890 (reagent kit).",
    "REF 0028 1234 5678 / LOT 0000 1234 5678.",
    "Admissions by year: 2015 2016 2017 2018 2019 2020 2021.",
    "Patients per year 1520 1634 1788 1902 2011 2145 2290 were enrolled.",
    "Version 10.0.19045.3803 and build 2024.01.15.1234 were tested.",
    "보험 청구 건수 1,234,567,890,123 건 (누적).",
]

NEGATIVE_TEMPLATES = [
    "Accession {digits11} received without clinical notes.",
    "주문번호 {digits11} 처리 완료.",
    "Barcode {luhn_bad} failed verification.",
    "카드번호 {luhn_bad} 는 유효하지 않은 번호임.",
    "Collected on {date_dash}, analysed on {date_dot}.",
    "NDC {ndc} was dispensed at discharge.",
    # Luhn-valid numbers that are not cards: ids, barcodes, timestamps, ISBNs.
    "Specimen accession {luhn16} received in the core lab.",
    "검체 접수번호 {luhn16}, 채혈 시각 07:40.",
    "Order no. {luhn14} shipped to the pharmacy.",
    "처방 주문번호 {luhn15} 취소됨.",
    "ISBN {isbn13} (print edition).",
    "의약품 표준코드 {kd13} (바코드 스캔).",
    "UDI (01){gtin14}(17)261231(10)A12",
    "Event time {ms13} ms since the epoch.",
    "Sequencing run {luhn19} finished on the NovaSeq.",
    "법인등록번호 {corp13} (학교법인).",
    "Corporate registration no. {corp13} of the hospital foundation.",
    # Luhn-valid numbers in groups, which only the card layout rules tell from cards.
    "Reagent kit lot {lot0} (store at 2-8 C).",
    "Follow-up visits were scheduled in {years}.",
    "Enrolled per site: {table_row}.",
    "Infusion pump serial {serial}, firmware 3.2.",
    "Catalogue no. {cat00} (reagent, 500 tests).",
]


def ean_digit(body: str) -> str:
    """The GS1 check digit (EAN-13, GTIN-14, ISBN-13) to append to ``body``."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return str((10 - total % 10) % 10)


def luhn_valid_id(rng: random.Random, prefix: str, length: int, *, ean: bool = False) -> str:
    """A ``length``-digit id starting with ``prefix`` (GS1 check digit if ``ean``) that also
    passes Luhn: the hard case, an id a card check alone would take for a card."""
    while True:
        body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
        digits = body + (ean_digit(body) if ean else str(rng.randrange(10)))
        if int(luhn_digit(digits[:-1])) == int(digits[-1]):
            return digits


def _neg_value(kind: str, rng: random.Random) -> str:
    if kind.startswith("luhn") and kind[4:].isdigit():
        return luhn_valid_id(rng, str(rng.randrange(1, 10)), int(kind[4:]))
    if kind == "isbn13":
        return luhn_valid_id(rng, rng.choice(["97889", "97801", "97811"]), 13, ean=True)
    if kind == "kd13":
        return luhn_valid_id(rng, "880", 13, ean=True)
    if kind == "gtin14":
        return luhn_valid_id(rng, rng.choice(["1", "2", "5"]), 14, ean=True)
    if kind == "ms13":
        return luhn_valid_id(rng, "17", 13)
    if kind == "lot0":  # ISO/IEC 7812 gives no card issuer a leading 0
        d = luhn_valid_id(rng, "0" + rng.choice("89"), 16)
        return rng.choice([" ", "-"]).join(d[i : i + 4] for i in range(0, 16, 4))
    if kind == "years":  # four increasing years that happen to pass Luhn
        while True:
            ys = sorted(rng.sample(range(2005, 2026), 4))
            if int(luhn_digit("".join(map(str, ys))[:-1])) == ys[-1] % 10:
                return " ".join(map(str, ys))
    if kind == "table_row":  # seven counts; the first four pass Luhn together
        first = luhn_valid_id(rng, str(rng.randrange(1, 10)), 16)
        rest = [first[i : i + 4] for i in range(0, 16, 4)]
        return " ".join(rest + [str(rng.randrange(1000, 10000)) for _ in range(3)])
    if kind == "serial":  # 16 digits, but not in a card's groups
        d = luhn_valid_id(rng, str(rng.randrange(1, 10)), 16)
        return rng.choice(
            ["-".join((d[:6], d[6:12], d[12:])), " ".join((d[:3], d[3:6], d[6:9], d[9:13], d[13:]))]
        )
    if kind == "cat00":  # 00 and a code no country has: not a dialled number
        cc = rng.choice(["12", "28", "35", "80", "89"])
        return f"00{cc} {rng.randrange(10000):04d} {rng.randrange(10000):04d}"
    if kind == "corp13":
        office = rng.choice(["110111", "110114", "120111", "150111", "180111"])
        return f"{office}-{rng.randrange(10_000_000):07d}"
    if kind == "digits11":
        return "".join(str(rng.randrange(10)) for _ in range(11))
    if kind == "luhn_bad":
        return make_luhn_invalid_card(rng)
    if kind == "date_dash":
        return f"20{rng.randrange(10, 25)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == "date_dot":
        return f"20{rng.randrange(10, 25)}.{rng.randrange(1, 13):02d}.{rng.randrange(1, 29):02d}"
    if kind == "ndc":
        return f"{rng.randrange(10000):04d}-{rng.randrange(10000):04d}-{rng.randrange(100):02d}"
    raise KeyError(kind)


PII_TYPES = ("email", "phone", "rrn", "frn", "health_insurance", "credit_card", "ip", "url_cred")


def label_type(slot: str) -> str:
    """The PII type of a template slot: the type it names, before any ``_form`` suffix."""
    return next(t for t in PII_TYPES if slot == t or slot.startswith(t + "_"))


def fill(template: str, value_for: Callable[[str], str]) -> tuple[str, list[dict[str, object]]]:
    """Fill ``{slot}``s left to right; return the text and the labelled spans of the slots."""
    out, spans, pos = "", [], 0
    while (i := template.find("{", pos)) >= 0:
        j = template.index("}", i)
        out += template[pos:i]
        kind = template[i + 1 : j]
        value = value_for(kind)
        start = len(out)
        out += value
        if not kind.startswith("neg:"):
            spans.append({"type": label_type(kind), "start": start, "end": len(out), "form": kind})
        pos = j + 1
    return out + template[pos:], spans


def generate(seed: int = 20261122) -> list[dict[str, object]]:
    """The labelled lines: positive templates filled 5 times each, then the hard negatives."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(5):
        for t in POSITIVE_TEMPLATES:
            text, spans = fill(t, lambda k: MAKERS[k](rng))
            rows.append({"text": text, "spans": spans})
    for line in NEGATIVE_LINES:
        rows.append({"text": line, "spans": []})
    for _ in range(3):
        for t in NEGATIVE_TEMPLATES:
            text, spans = fill(t.replace("{", "{neg:"), lambda k: _neg_value(k[4:], rng))
            rows.append({"text": text, "spans": spans})
    return rows


def render(rows: list[dict[str, object]]) -> str:
    """JSONL text of ``rows``."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(generate()), encoding="utf-8")
    print(f"wrote {OUT}")
