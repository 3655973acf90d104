"""Find and scrub personal data (PII) in Korean and English medical text, in pure Python.

Detection is regular expressions plus small validators (calendar dates, Luhn, card prefixes,
IP octets, keyword context). Offsets are Python ``str`` indices (code points), not bytes.

Rules and decisions, per type (``PLACEHOLDERS`` maps each type to the tokenizer's token):

- ``email``: ``local@domain.tld`` with an alphabetic TLD of 2+ letters.
- ``phone``: Korean mobile (010, 011, 016-019), Seoul 02 and regional 031-064 landlines, 070
  internet phones, 0502-0508 personal "safe numbers", ``+82`` and ``0082`` forms (with or without
  ``(0)``), other ``+CC`` international forms (7-15 digits in all, E.164), ``00``-dialled
  international forms (``001 212 555 0100``, ``0044 20 7946 0000``: the first group is exactly
  00 and a country code assigned by ITU-T E.164, the groups are separated, 8-15 digits after
  the 00; ``0012 3456 7890`` is a catalogue number), and North-American ``(212) 555-0100`` /
  ``212-555-0100`` forms. Separators between groups: a hyphen, dot or en dash with at most one
  space either side (``010 - 0000 - 1234``, ``010. 0000. 1234``), one space, or none (NANP
  needs a hyphen or dot, 00-dialled numbers need some separator); they may differ within one
  number (``010-0000.1234``). A run that goes on with another hyphenated group
  (``12-010-0000-1234-5``) is a longer code. Business numbers are deliberately NOT scrubbed:
  Korean representative numbers (15xx/16xx/18xx-xxxx) and NANP toll-free codes (800, 833-888)
  belong to hospitals and companies, are public, and clinic FAQs are full of them. Other
  organisations' landlines cannot be told from personal ones and are scrubbed.
- ``rrn`` / ``frn``: ``YYMMDD-GNNNNNN`` (hyphen or en dash with at most one space either side,
  one space, or no separator). The date must exist in the century the gender digit ``G`` gives
  (1/2/5/6: 1900s, 3/4/7/8: 2000s, 9/0: 1800s); ``G`` in 1-4, 9, 0 is a resident number, 5-8 a
  foreigner number. The checksum is NOT required: numbers issued since October 2020 have random
  last six digits, so a failed checksum never clears a match (:func:`rrn_checksum_ok` reports
  it for callers who want it as metadata). A masked tail (``900101-1******``) still counts:
  birth date and sex identify a patient. Not a registration number: one right after a
  corporate-registration label (법인등록번호, "corporate registration no.": a company's public
  number of the same form), or an unseparated 13-digit run after a barcode label (표준코드,
  바코드, barcode, EAN, GTIN, UDI; Korean EAN-13 drug codes start 880 and read as 1988 dates).
- ``health_insurance``: an 11-digit number (hyphens, spaced hyphens or spaces between digits)
  counts only when a keyword (건강보험, 보험증, 건보, 의료보험, 가입자, 증번호, health insurance,
  insurance/member/card no/number/id ...) occurs within the 20 characters before it. Without
  context an 11-digit number is too common (orders, accessions) to be called personal. An
  11-digit mobile number next to such a keyword stays a phone (equal length: phone ranks first).
- ``credit_card``: 13-19 digits passing the Luhn check, whatever the issuer prefix (Korean
  domestic cards start with 9, UATP with 1), except a leading 0 (ISO/IEC 7812 gives no card
  issuer one). About one in ten digit strings passes Luhn, so the form carries the precision:
  in groups (separated as phones are, minus the dot), the groups must be a card's printed
  layout: fours with a last group of 1-4 digits, 4-6-5, 4-6-4 or 4-3-3-3; an unseparated run
  counts only after a card word within 30 characters (카드, 신용, 체크, card, credit, debit, Visa,
  Mastercard, Amex, JCB, UnionPay, Diners, Maestro, PAN, "cc no"): without one it is an
  accession, order, lot, barcode or timestamp. The card starts its run of digit groups or
  follows a group of 1-2 digits, and at most two groups of 3+ digits follow it (expiry, CVC);
  longer runs are table rows, and groups that are all years (1900-2099) are a row of years.
- ``ip``: IPv4 with octets 0-255 (no leading zeros) and IPv6 (validated by :mod:`ipaddress`, at
  least three hex groups). An IPv4-shaped run right after version/section words ("version",
  "ver", "release", "build", "section", "chapter", "table", "fig", "EC"/"E.C." enzyme numbers,
  "formula", 버전, 판) is a version, section or enzyme number, not an address.
- ``url_cred``: the whole URL when it carries credentials, either ``scheme://user:pass@host`` or
  a secret query parameter (token, access_token, refresh_token, password, passwd, pwd, api_key,
  apikey, secret, client_secret, auth, sig/signature, session/sessionid/sid). The whole URL is
  replaced, because its host and path often identify the account too.

On overlaps the longest span wins; on equal length the more specific type (``_PRIORITY``).
"""

from __future__ import annotations

import calendar
import ipaddress
import json
import re
import sys
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kfm.data.readers import ReaderError, Rejection, json_lines
from kfm.fs import atomic_write_text
from kfm.tokenizer import PII_TOKENS

PLACEHOLDERS: dict[str, str] = {
    "email": "<|email|>",
    "phone": "<|phone|>",
    "rrn": "<|rrn|>",
    "frn": "<|frn|>",
    "health_insurance": "<|health_insurance|>",
    "credit_card": "<|credit_card|>",
    "ip": "<|ip|>",
    "url_cred": "<|url_cred|>",
}
"""PII type -> the placeholder written in its place (the tokenizer's PII special tokens)."""
PII_TYPES: tuple[str, ...] = tuple(PLACEHOLDERS)

# Import-time guard: a placeholder the tokenizer does not keep whole would be split into pieces.
if set(PLACEHOLDERS.values()) != set(PII_TOKENS):  # pragma: no cover
    raise RuntimeError("data_pipeline.pii.PLACEHOLDERS differs from kfm.tokenizer.PII_TOKENS")

# Lower rank wins when two candidates have the same length.
_PRIORITY = {t: i for i, t in enumerate(("url_cred", "email", "rrn", "frn", "credit_card"))}
_PRIORITY.update({"phone": 5, "health_insurance": 6, "ip": 7})


@dataclass(frozen=True)
class PIISpan:
    """One piece of personal data: its type, ``text[start:end]`` offsets and the matched text."""

    type: str
    start: int
    end: int
    text: str


# ASCII boundaries: ``\b``/``\w`` would treat Hangul as word characters, and Korean text glues
# particles and labels straight onto numbers ("전화010-0000-0000로").
# A run that continues with another hyphenated group ("12-010-0000-1234-5", "010 - 0000 -
# 1234 - 5") is some longer code, not a phone number.
_L = r"(?<![0-9A-Za-z])(?<![0-9][-.])(?<![0-9] [-\u2013] )"
_R = r"(?![0-9A-Za-z])(?![-.][0-9])(?! [-\u2013] [0-9])"
# Between digit groups: a hyphen, dot or en dash with at most one space either side
# ("010 - 0000 - 1234", "010. 0000. 1234", "010-0000.1234"), a single space, or nothing.
_GAP = r"(?: ?[-.\u2013] ?| )"
_SEP = _GAP + "?"

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)

_KR_AREA = r"(?:02|03[1-3]|04[1-4]|05[1-5]|06[1-4]|070|050[2-8])"
_PHONE_PATTERNS = [
    # Korean mobile.
    re.compile(_L + r"01[016789]" + _SEP + r"\d{3,4}" + _SEP + r"\d{4}" + _R),
    # Korean landline / 070 / 050x, area code optionally in parentheses: (02) 000-0000, and
    # the "02)000-0000" form of Korean letterheads.
    re.compile(
        _L + r"(?:\(?" + _KR_AREA + r"\)\s?|" + _KR_AREA + _SEP + r")\d{3,4}" + _SEP + r"\d{4}" + _R
    ),
    # +82 or 0082, optional (0), then the national number without its leading 0.
    re.compile(
        r"(?<![0-9A-Za-z+])(?:\+|00)82"
        + _SEP
        + r"(?:\(0\)"
        + _SEP
        + r")?(?:1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70)"
        + _SEP
        + r"\d{3,4}"
        + _SEP
        + r"\d{4}"
        + _R
    ),
    # North American Numbering Plan: needs a separator or parentheses to be told from IDs.
    # Toll-free area codes (800, 833...888) are business numbers, like Korea's 15xx, so skipped.
    re.compile(
        _L
        + r"(?:\((?!8(\d)\1)[2-9]\d{2}\)\s?|(?!8(\d)\2)[2-9]\d{2} ?[-.] ?)[2-9]\d{2} ?[-.] ?\d{4}"
        + _R
    ),
]
# Other international numbers; the digit count is checked after matching.
_INTL_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])\+(?!82)[1-9]\d{0,2}(?:" + _SEP + r"(?:\(\d{1,5}\)|\d{1,5})){2,6}" + _R
)
# The same dialled with 00 instead of +: the first group is exactly 00 and an assigned country
# code ("001", "0044", "00852"), and the groups must be separated: unseparated digit runs
# starting with 00 are lot and catalogue numbers.
_INTL_00 = re.compile(
    r"(?<![0-9A-Za-z+])00(?P<cc>[1-9]\d{0,2})(?:" + _GAP + r"(?:\(\d{1,5}\)|\d{1,5})){2,6}" + _R
)
# E.164 country codes assigned to countries (ITU-T E.164 list; 82 is handled as Korea above).
_COUNTRY_CODES = frozenset(
    (1, 7, 20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49)
    + (51, 52, 53, 54, 55, 56, 57, 58, 60, 61, 62, 63, 64, 65, 66, 81, 84, 86, 90, 91, 92)
    + (93, 94, 95, 98, 211, 212, 213, 216, 218, 290, 291, 297, 298, 299, 420, 421, 423, 670)
    + (850, 852, 853, 855, 856, 880, 886, 992, 993, 994, 995, 996, 998)
).union(
    *(
        range(lo, hi + 1)
        for lo, hi in ((220, 258), (260, 269), (350, 359), (370, 389), (500, 509), (590, 599))
        + ((672, 692), (960, 977))
    )
)

_RRN = re.compile(
    _L + r"(?P<yy>\d{2})(?P<mm>0[1-9]|1[0-2])(?P<dd>0[1-9]|[12]\d|3[01])"
    r"(?: ?[-\u2013] ?| )?(?P<g>\d)(?P<tail>\d{6}|\*{6})" + r"(?![0-9A-Za-z*])"
)
# A Korean corporate registration number (법인등록번호) has the same 6+7 digit form and is public.
_CORP_LABEL = re.compile(
    r"(?:법인\s?(?:등록)?\s?번호|corporate\s+registration\s+(?:no\.?|number))\s*[:#]?\s*$",
    re.IGNORECASE,
)
# Korean drug standard codes and other EAN-13 barcodes start 880 and often read as a date, so an
# unseparated 13-digit run after a barcode label (and only numbers and punctuation) is a code.
_BARCODE_LABEL = re.compile(
    r"(?:표준\s?코드|바코드|barcode|EAN(?:-13)?|GTIN|UDI)[^A-Za-z\uac00-\ud7a3]*$", re.IGNORECASE
)
_CENTURY = {"1": 1900, "2": 1900, "5": 1900, "6": 1900, "3": 2000, "4": 2000, "7": 2000, "8": 2000}
_CENTURY.update({"9": 1800, "0": 1800})

_HI_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d(?:(?: ?- ?| )?\d){10}(?![0-9A-Za-z])(?![-.][0-9])")
_HI_KEYWORD = re.compile(
    r"건강\s?보험|보험증|건보|의료\s?보험|가입자|증\s?번호|health[\s-]*insurance|"
    r"(?:insurance|member|card|policy)\s*(?:no\b|number|id\b|#)",
    re.IGNORECASE,
)
_HI_WINDOW = 20

_DIGIT_GROUPS = re.compile(r"(?<![0-9A-Za-z])\d+(?:(?: ?[-\u2013] ?| )\d+)*(?![0-9A-Za-z])")
# Group lengths cards are printed in: fours (the last group 1-4 digits: 16, 19 digits), 4-6-5
# (Amex), 4-6-4 (Diners), 4-3-3-3 (13-digit Visa).
_CARD_LAYOUT = re.compile(r"4(?:,4)*,[1-4]|4,6,[45]|4,3,3,3")
_CARD_CONTEXT = re.compile(
    r"카드|card|credit|debit|visa|master|amex|american\s+express|discover|jcb|unionpay|"
    r"diners|maestro|신용|체크|\bpan\b|\bcc\s*(?:no|#)",
    re.IGNORECASE,
)
_CARD_WINDOW = 30
_YEAR = re.compile(r"19\d\d|20\d\d")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(r"(?<![0-9A-Za-z.])(?:" + _OCTET + r"\.){3}" + _OCTET + r"(?![0-9A-Za-z]|\.\d)")
_VERSION_CONTEXT = re.compile(
    r"(?<![A-Za-z])(?:version|ver\.?|release|build|rev\.?|section|sec\.|chapter|table|"
    r"fig\.?|figure|EC|E\.C\.|EC\)?\s*No\.?|formula(?:\s+of)?|버전|판|\u00a7)\s*[:#=]?\s*$",
    re.IGNORECASE,
)
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Za-z:])")

_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
_URL = re.compile(r"(?<![A-Za-z0-9])[A-Za-z][A-Za-z0-9+.-]{1,15}://" + _URL_CHARS + "+")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]+:[^/?#@\s]+@")
_SECRET_PARAM = re.compile(
    r"[?&;](?:access_?token|refresh_?token|token|password|passwd|pwd|api_?key|apikey|"
    r"client_?secret|secret|auth|sig|signature|session(?:id)?|sid)=[^&#\s]+",
    re.IGNORECASE,
)


def luhn_ok(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn check (payment cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def rrn_checksum_ok(digits: str) -> bool:
    """Whether a 13-digit Korean resident/foreigner registration number has a valid check digit.

    Metadata only: numbers issued since October 2020 have random trailing digits, so a failure
    here does not mean the number is not a registration number. Foreigner numbers (G in 5-8)
    use the old offset of 13 instead of 11.
    """
    if len(digits) != 13 or not digits.isdigit():
        return False
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    s = sum(int(d) * w for d, w in zip(digits, weights, strict=False))
    offset = 13 if digits[6] in "5678" else 11
    return (offset - s % 11) % 10 == int(digits[12])


def _valid_birth_date(yy: str, mm: str, dd: str, g: str) -> bool:
    year = _CENTURY[g] + int(yy)
    return int(dd) <= calendar.monthrange(year, int(mm))[1]


def _find_cards(text: str) -> Iterable[tuple[int, int]]:
    # Runs of digit groups. A card is a whole-group sub-run of 13-19 digits that starts the run
    # (or follows a group of 1-2 digits: "No. 2 4111 ...") and is followed by at most two
    # more groups of 3+ digits (expiry, CVC: "4111 1111 1111 1111 1225"). Longer runs are
    # table rows of numbers.
    for m in _DIGIT_GROUPS.finditer(text):
        groups = [
            (g.start() + m.start(), g.end() + m.start()) for g in re.finditer(r"\d+", m.group())
        ]
        lengths = [e - s for s, e in groups]
        best: tuple[int, int] | None = None
        for i in range(len(groups)):
            if i > 0 and lengths[i - 1] >= 3:
                continue
            n = 0
            for j in range(i, len(groups)):
                n += lengths[j]
                if n > 19:
                    break
                if n < 13:
                    continue
                s, e = groups[i][0], groups[j][1]
                if best is not None and e - s <= best[1] - best[0]:
                    continue
                digits = re.sub(r"\D", "", text[s:e])
                if i == j:  # unseparated: an id unless a card word comes just before
                    if not _CARD_CONTEXT.search(text, max(0, s - _CARD_WINDOW), s):
                        continue
                elif not _CARD_LAYOUT.fullmatch(",".join(map(str, lengths[i : j + 1]))):
                    continue
                trailing = 0
                for k in range(j + 1, len(groups)):
                    if lengths[k] < 3:
                        break
                    trailing += 1
                years = all(_YEAR.fullmatch(text[a:b]) for a, b in groups[i : j + 1])
                if digits[0] != "0" and trailing <= 2 and not years and luhn_ok(digits):
                    best = (s, e)
        if best is not None:
            yield best


def _candidates(text: str, types: frozenset[str]) -> Iterable[tuple[str, int, int]]:
    if "email" in types:
        for m in _EMAIL.finditer(text):
            yield "email", m.start(), m.end()
    if "phone" in types:
        for pat in _PHONE_PATTERNS:
            for m in pat.finditer(text):
                yield "phone", m.start(), m.end()
        for m in _INTL_PHONE.finditer(text):
            n_digits = sum(c.isdigit() for c in m.group())
            if 7 <= n_digits <= 15:
                yield "phone", m.start(), m.end()
        for m in _INTL_00.finditer(text):
            n_digits = sum(c.isdigit() for c in m.group()) - 2
            if int(m.group("cc")) in _COUNTRY_CODES and 8 <= n_digits <= 15:
                yield "phone", m.start(), m.end()
    if types & {"rrn", "frn"}:
        for m in _RRN.finditer(text):
            g = m.group("g")
            if not _valid_birth_date(m.group("yy"), m.group("mm"), m.group("dd"), g):
                continue
            before = text[max(0, m.start() - 40) : m.start()]
            if _CORP_LABEL.search(before) or (
                m.group().isdigit() and _BARCODE_LABEL.search(before)
            ):
                continue
            kind = "frn" if g in "5678" else "rrn"
            if kind in types:
                yield kind, m.start(), m.end()
    if "health_insurance" in types:
        for m in _HI_NUMBER.finditer(text):
            if _HI_KEYWORD.search(text, max(0, m.start() - _HI_WINDOW), m.start()):
                yield "health_insurance", m.start(), m.end()
    if "credit_card" in types:
        for s, e in _find_cards(text):
            yield "credit_card", s, e
    if "ip" in types:
        for m in _IPV4.finditer(text):
            if not _VERSION_CONTEXT.search(text, max(0, m.start() - 16), m.start()):
                yield "ip", m.start(), m.end()
        for m in _IPV6.finditer(text):
            if sum(1 for g in m.group().split(":") if g) < 3:
                continue
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            yield "ip", m.start(), m.end()
    if "url_cred" in types:
        for m in _URL.finditer(text):
            url = m.group().rstrip(".,;:!?'\")]}")
            if _USERINFO.match(url) or _SECRET_PARAM.search(url):
                yield "url_cred", m.start(), m.start() + len(url)


def find_pii(text: str, *, types: Iterable[str] | None = None) -> list[PIISpan]:
    """All PII spans in ``text``, sorted by start and non-overlapping.

    ``types`` restricts detection to those PII types (default: all of ``PII_TYPES``). Where
    candidates overlap, the longest wins, then the more specific type. Raises ``ValueError`` on
    an unknown type.
    """
    wanted = frozenset(PII_TYPES if types is None else types)
    if unknown := wanted - set(PII_TYPES):
        raise ValueError(f"unknown PII types {sorted(unknown)}; known: {list(PII_TYPES)}")
    cands = sorted(
        set(_candidates(text, wanted)), key=lambda c: (c[1] - c[2], _PRIORITY[c[0]], c[1])
    )
    starts: list[int] = []
    ends: list[int] = []
    kinds: list[str] = []
    for kind, s, e in cands:
        i = bisect_left(starts, s)
        # Overlap with the accepted span before (ends after s) or after (starts before e).
        if (i > 0 and ends[i - 1] > s) or (i < len(starts) and starts[i] < e):
            continue
        starts.insert(i, s)
        ends.insert(i, e)
        kinds.insert(i, kind)
    return [PIISpan(k, s, e, text[s:e]) for k, s, e in zip(kinds, starts, ends, strict=True)]


def scrub(text: str, *, types: Iterable[str] | None = None) -> tuple[str, Counter[str]]:
    """``text`` with each PII span replaced by its placeholder, and the count of spans per type.

    ``types`` as in :func:`find_pii`.
    """
    parts: list[str] = []
    counts: Counter[str] = Counter()
    pos = 0
    for span in find_pii(text, types=types):
        parts.append(text[pos : span.start])
        parts.append(PLACEHOLDERS[span.type])
        counts[span.type] += 1
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts), counts


def mask_shape(text: str) -> str:
    """``text`` with every digit replaced by ``#`` and every letter by ``x``; punctuation kept.

    Shows a span's form (``###-####-####``, ``xxxx##@xxxxxxx.xxx``) without its value.
    """
    return "".join("#" if c.isdigit() else "x" if c.isalpha() else c for c in text)


@dataclass(frozen=True)
class PIIExample:
    """One found span for a human to judge, with the value masked (`PIIAudit.examples`).

    ``context`` is the span's shape (`mask_shape`) between ``[[`` and ``]]``, with up to
    ``context_chars`` characters of text either side in which every digit is ``#`` and every
    other PII span is masked too. ``document`` is the index of the text in the audited iterable.
    """

    type: str
    document: int
    context: str


@dataclass
class PIIAudit:
    """What `audit` found in a set of documents (counts only, plus masked examples)."""

    types: tuple[str, ...]
    """The PII types looked for."""
    documents: int = 0
    """Documents scanned."""
    characters: int = 0
    """Characters (code points) scanned."""
    spans: dict[str, int] = field(default_factory=dict)
    """PII type -> spans found (every type in ``types``, zeros included)."""
    documents_with: dict[str, int] = field(default_factory=dict)
    """PII type -> documents holding at least one span of that type."""
    documents_with_pii: int = 0
    """Documents holding at least one span of any type."""
    examples: list[PIIExample] = field(default_factory=list)
    """The first few spans of each type, masked (never the raw value)."""

    @property
    def total_spans(self) -> int:
        """Spans of all types."""
        return sum(self.spans.values())

    def spans_per_million_characters(self) -> dict[str, float]:
        """PII type -> spans per 10^6 characters scanned (0.0 when nothing was scanned)."""
        return {
            t: n * 1e6 / self.characters if self.characters else 0.0 for t, n in self.spans.items()
        }

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of every field, plus ``spans_per_million_characters``."""
        return {
            "types": list(self.types),
            "documents": self.documents,
            "characters": self.characters,
            "spans": dict(self.spans),
            "total_spans": self.total_spans,
            "documents_with": dict(self.documents_with),
            "documents_with_pii": self.documents_with_pii,
            "spans_per_million_characters": self.spans_per_million_characters(),
            "examples": [
                {"type": e.type, "document": e.document, "context": e.context}
                for e in self.examples
            ],
        }

    def markdown(self) -> str:
        """A Markdown table (type, spans, documents, spans per 10^6 characters) and a summary line."""
        rate = self.spans_per_million_characters()
        lines = [
            f"PII audit: {self.documents} documents, {self.characters} characters; "
            f"{self.documents_with_pii} documents with PII, {self.total_spans} spans.",
            "",
            "| type | spans | documents | per 10^6 chars |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {t} | {self.spans[t]} | {self.documents_with[t]} | {rate[t]:.2f} |"
            for t in self.types
        ]
        return "\n".join(lines) + "\n"


def _masked_context(text: str, spans: list[PIISpan], i: int, context_chars: int) -> str:
    span = spans[i]
    lo, hi = max(0, span.start - context_chars), min(len(text), span.end + context_chars)
    # Mask whole spans that cross the window's edges before cutting, so no part of a value shows.
    for sp in spans:
        if sp.start < lo < sp.end:
            lo = sp.start
        if sp.start < hi < sp.end:
            hi = sp.end
    parts, pos = [], lo
    for j, sp in enumerate(spans):
        if sp.end <= lo or sp.start >= hi:
            continue
        parts.append(re.sub(r"\d", "#", text[pos : sp.start]))
        shape = mask_shape(sp.text)
        parts.append(f"[[{shape}]]" if j == i else PLACEHOLDERS[sp.type])
        pos = sp.end
    parts.append(re.sub(r"\d", "#", text[pos:hi]))
    return "".join(parts).replace("\n", " ")


def audit(
    texts: Iterable[str],
    *,
    types: Iterable[str] | None = None,
    examples_per_type: int = 3,
    context_chars: int = 30,
) -> PIIAudit:
    """Count the PII left in ``texts`` (e.g. a sample of a scrubbed corpus before its release).

    Streams ``texts`` once, keeping only counts and the first ``examples_per_type`` spans of each
    type as masked `PIIExample`s: the audit itself never holds or returns a raw value. ``types``
    as in :func:`find_pii` (default all). Raises ``ValueError`` on an unknown type.
    """
    wanted = tuple(dict.fromkeys(PII_TYPES if types is None else types))
    if unknown := set(wanted) - set(PII_TYPES):
        raise ValueError(f"unknown PII types {sorted(unknown)}; known: {list(PII_TYPES)}")
    result = PIIAudit(
        types=wanted, spans=dict.fromkeys(wanted, 0), documents_with=dict.fromkeys(wanted, 0)
    )
    shown: Counter[str] = Counter()
    for doc, text in enumerate(texts):
        spans = find_pii(text, types=wanted)
        result.documents += 1
        result.characters += len(text)
        if spans:
            result.documents_with_pii += 1
        for t in {sp.type for sp in spans}:
            result.documents_with[t] += 1
        for i, sp in enumerate(spans):
            result.spans[sp.type] += 1
            if shown[sp.type] < examples_per_type:
                shown[sp.type] += 1
                result.examples.append(
                    PIIExample(sp.type, doc, _masked_context(text, spans, i, context_chars))
                )
    return result


def pii_report(in_path: str | Path, out_path: str | Path | None = None) -> dict[str, int]:
    """Audit a JSONL corpus: for each document, the PII spans found in its ``text`` field.

    Reads JSON lines, plain or compressed (``.gz``, ``.zst``; ``kfm.data.readers``). Writes one
    JSON line per input document, ``{"id", "spans": [{"type", "start", "end", "text"}]}`` (``id``
    is the document's ``id`` or else its 1-based line number), to ``out_path`` atomically, or to
    stdout when ``out_path`` is None; an ``out_path`` that is not a regular file (``/dev/stdout``,
    a named pipe) is written in place. Blank lines are skipped. Returns the number of spans per
    type (every type present, zeros included).

    Raises:
        ReaderError: (a ``ValueError``) naming the file and line when a line is not UTF-8 or not
            a JSON object with a string ``text`` field, or the file is not readable as JSON lines.
        OSError: the output cannot be written (permission denied, no space left...).
    """
    in_path = Path(in_path)
    counts = dict.fromkeys(PII_TYPES, 0)
    out_lines: list[str] = []
    for lineno, doc in json_lines(in_path):
        if isinstance(doc, Rejection):
            if doc.reason == "invalid_utf8":
                raise ReaderError(f"{doc.where}: {doc.detail}; convert the file to UTF-8")
            raise ReaderError(f"{doc.where}: not valid JSON ({doc.detail})")
        if not isinstance(doc.get("text"), str):
            raise ReaderError(f"{in_path}:{lineno}: expected a JSON object with a string 'text'")
        spans = find_pii(doc["text"])
        for sp in spans:
            counts[sp.type] += 1
        rec = {
            "id": doc.get("id", lineno),
            "spans": [
                {"type": sp.type, "start": sp.start, "end": sp.end, "text": sp.text} for sp in spans
            ],
        }
        out_lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    text = "".join(out_lines)
    if out_path is None:
        sys.stdout.write(text)
    elif Path(out_path).exists() and not Path(out_path).is_file():
        # A device or pipe: an atomic write would replace it with a regular file.
        try:
            with open(out_path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:  # a failed write names no file: name it
            raise OSError(e.errno, e.strerror, str(out_path)) from e
    else:
        atomic_write_text(out_path, text)
    return counts
