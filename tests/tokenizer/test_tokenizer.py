"""The trained tokenizer: special-token layout, exact round trips, byte lengths, fertility."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kfm.tokenizer import (
    PII_TOKENS,
    TokenizerNotFoundError,
    fertility,
    lang_of,
    load_tokenizer,
    special_tokens,
    token_byte_lengths,
    tokenizer_hash,
)

CRAFTED = [
    "Hello, world! The patient's HbA1c was 7.2% on 2024-03-15.",
    "환자는 제2형 당뇨병 진단을 받았습니다. 혈압 120/80 mmHg, 메트포르민 500mg 1일 2회.",
    "BRCA1 변이 보인자는 유방암 위험이 높다 (OR 5.3, 95% CI 3.1-9.0).",
    "  leading spaces, double  spaces,\ttabs\n\nand blank lines\n",
    "é ü ß café naïve — “quotes” 🙂 ㄱㄴㄷ 漢字 العربية",
    "연락처: <|email|>, 전화 <|phone|>, 주민번호 <|rrn|>",
    "",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path, monkeypatch_module: pytest.MonkeyPatch):
    # Offline on purpose: the tokenizer must load from its directory alone.
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_special_token_ids_in_order(tok) -> None:
    expected = special_tokens(16)
    assert expected[:3] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert expected[3:11] == list(PII_TOKENS)
    assert expected[-1] == "<|reserved_15|>"
    assert tok.convert_ids_to_tokens(list(range(len(expected)))) == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) == 1000


def test_bos_prepended_no_eos(tok) -> None:
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert ids[1:] == tok("hello world", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", CRAFTED)
def test_round_trip_crafted(tok, text: str) -> None:
    assert unicodedata.is_normalized("NFC", text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_round_trip_heldout_documents(tok, heldout_texts: list[str]) -> None:
    assert {lang_of(t) for t in heldout_texts} == {"ko", "en"}
    for text in heldout_texts:
        text = unicodedata.normalize("NFC", text)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_digits_are_single_tokens(tok) -> None:
    ids = tok("2024년 1234567 mg", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("20241234567")


def test_pii_placeholders_stay_whole_and_survive_decode(tok) -> None:
    for i, placeholder in enumerate(PII_TOKENS, start=3):
        text = f"contact{placeholder}now"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert i in ids, placeholder
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Control tokens are dropped by skip_special_tokens; placeholders are text.
    assert tok.decode([0, 3, 1], skip_special_tokens=True) == "<|email|>"


def test_nfc_normalization(tok) -> None:
    composed = "한국어 의학 용어"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tok(decomposed)["input_ids"] == tok(composed)["input_ids"]


def test_token_byte_lengths_sum_to_utf8_bytes(tok, heldout_texts: list[str]) -> None:
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int32 and lengths.shape == (len(tok),)
    assert lengths[0] == lengths[1] == lengths[2] == 0  # bos, eos, pad
    assert lengths[3] == len("<|email|>")
    assert lengths[special_tokens(16).index("<|reserved_0|>")] == 0
    for text in [*CRAFTED, *heldout_texts]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        # With bos (and eos) added, the sum is unchanged: control tokens are 0 bytes.
        assert int(lengths[[0, *ids, 1]].sum()) == len(text.encode("utf-8"))


def test_fertility_is_chars_per_token(tok, heldout_texts: list[str]) -> None:
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in heldout_texts)
    expected = sum(len(t) for t in heldout_texts) / n_tokens
    assert fertility(tok, heldout_texts) == pytest.approx(expected)
    assert fertility(tok, iter(heldout_texts)) == pytest.approx(expected)  # any iterable
    with pytest.raises(ValueError, match="empty"):
        fertility(tok, ["", ""])


def test_lang_of() -> None:
    assert lang_of("환자는 두통을 호소했다.") == "ko"
    assert lang_of("The patient reported a headache.") == "en"
    # Korean clinical prose with Latin drug names is still Korean.
    assert lang_of("metformin 500 mg와 glimepiride를 병용 투여하였다.") == "ko"
    assert lang_of("") == "en"
    assert lang_of("12345 !!!") == "en"


def test_load_tokenizer_and_hash(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == 1000
    raw = (tokenizer_dir / "tokenizer.json").read_bytes()
    assert tokenizer_hash(tokenizer_dir) == hashlib.sha256(raw).hexdigest()
    assert tokenizer_hash(tokenizer_dir / "tokenizer.json") == tokenizer_hash(tokenizer_dir)
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["clean_up_tokenization_spaces"] is False


def test_load_tokenizer_missing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="kfm tokenizer train"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        tokenizer_hash(tmp_path)


def test_lang_of_mostly_english_with_a_korean_word() -> None:
    assert (
        lang_of("The study enrolled patients at Seoul (서울) National University Hospital.") == "en"
    )
