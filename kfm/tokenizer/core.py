"""The kfm tokenizer's special tokens, loading, identity hash and per-token statistics.

Training lives in ``kfm.tokenizer.train``; this module only needs a trained tokenizer directory
(anything ``transformers.AutoTokenizer`` loads), so the data and training code can import it
without pulling in the trainer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
CONTROL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
"""Ids 0, 1, 2. Control tokens: never produced from text by decode(skip_special_tokens=True)."""
PII_TOKENS = (
    "<|email|>",
    "<|phone|>",
    "<|rrn|>",  # Korean resident registration number
    "<|frn|>",  # Korean foreigner registration number
    "<|health_insurance|>",
    "<|credit_card|>",
    "<|ip|>",
    "<|url_cred|>",  # credentials embedded in a URL
)
"""Placeholders the curation pipeline writes in place of personal data. They are kept whole by
the tokenizer (one id each) but are ordinary text: decoding keeps them and they count their
UTF-8 bytes, because they stand in the training text like any word."""
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "kfm_tokenizer.json"


def reserved_tokens(n_reserved: int) -> list[str]:
    """The `n_reserved` spare special tokens ``<|reserved_0|>`` .. ``<|reserved_{n-1}|>``."""
    return [f"<|reserved_{i}|>" for i in range(n_reserved)]


def special_tokens(n_reserved: int) -> list[str]:
    """All added tokens in id order from 0: control, PII placeholders, reserved."""
    return [*CONTROL_TOKENS, *PII_TOKENS, *reserved_tokens(n_reserved)]


class TokenizerNotFoundError(FileNotFoundError):
    """A tokenizer directory (or its tokenizer.json) does not exist."""


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` of tokenizer directory `path` (or `path` itself if it is the file).

    Raises:
        TokenizerNotFoundError: the file does not exist.
    """
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() or not p.suffix else p
    if not f.is_file():
        raise TokenizerNotFoundError(
            f"{f}: no tokenizer here; train one with `kfm tokenizer train` or set "
            "--tokenizer.path to a directory holding tokenizer.json"
        )
    return f


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory with ``transformers.AutoTokenizer`` (local files only).

    Raises:
        TokenizerNotFoundError: `path` has no tokenizer.json (a FileNotFoundError).
        TypeError: the directory holds a slow (Python) tokenizer; kfm needs a fast one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = tokenizer_file(path).parent
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"{d}: loaded a {type(tok).__name__}; kfm needs a fast tokenizer")
    return tok


def tokenizer_hash(path: str | Path) -> str:
    """sha256 hex digest of the bytes of ``tokenizer.json`` (in directory `path`, or the file).

    Shard sets record it so that training refuses data tokenized with another vocabulary.

    Raises:
        TokenizerNotFoundError: no tokenizer.json at `path`.
    """
    return hashlib.sha256(tokenizer_file(path).read_bytes()).hexdigest()


def _byte_level_alphabet() -> set[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return set(ByteLevel.alphabet())


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """UTF-8 bytes each token id stands for: int32 array of length ``len(tokenizer)``.

    Used to turn per-token losses into bits per byte: for NFC text, the lengths of a text's
    tokens (without bos/eos) sum to ``len(text.encode("utf-8"))``. Special tokens count 0;
    non-special added tokens (PII placeholders) count the bytes of their content.

    Raises:
        ValueError: a vocabulary token is not byte-level (the tokenizer was not trained with a
            ByteLevel pre-tokenizer, so token lengths in bytes are not defined).
    """
    alphabet = _byte_level_alphabet()
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = np.zeros(len(tokens), dtype=np.int32)
    for i, tok in enumerate(tokens):
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif tok is None:
            continue  # a hole in the id range: never produced by encode
        elif all(c in alphabet for c in tok):
            out[i] = len(tok)  # each ByteLevel alphabet character stands for exactly one byte
        else:
            raise ValueError(
                f"token id {i} ({tok!r}) is not byte-level; token_byte_lengths needs a "
                "byte-level BPE tokenizer such as one trained by `kfm tokenizer train`"
            )
    return out


def _is_hangul(c: str) -> bool:
    o = ord(c)
    return 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F


KO_HANGUL_SHARE = 0.2
"""A text is Korean if at least this share of its letters are Hangul. Korean medical prose is
full of Latin drug and gene names, and one Hangul syllable carries about as much as two or three
Latin letters, so the cut is well below one half."""


def lang_of(text: str) -> Literal["ko", "en"]:
    """``"ko"`` if Hangul makes up at least KO_HANGUL_SHARE of the letters, else ``"en"``.

    A deliberately simple, dependency-free split for reporting fertility per language.
    """
    letters = hangul = 0
    for c in text:
        if c.isalpha():
            letters += 1
            hangul += _is_hangul(c)
    return "ko" if letters and hangul >= KO_HANGUL_SHARE * letters else "en"


def fertility(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> float:
    """Characters per token over `texts` (bos/eos not counted); higher means better compression.

    Raises:
        ValueError: `texts` holds no tokens (empty or all empty strings).
    """
    n_chars = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
        n_tokens += sum(len(ids) for ids in enc)
        batch.clear()

    for t in texts:
        n_chars += len(t)
        batch.append(t)
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    if n_tokens == 0:
        raise ValueError("fertility: the texts are empty, nothing to measure")
    return n_chars / n_tokens
