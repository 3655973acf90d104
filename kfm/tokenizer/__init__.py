"""kfm's tokenizer: byte-level BPE training, loading, identity hash and per-token statistics."""

from kfm.tokenizer.core import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    PII_TOKENS,
    TokenizerNotFoundError,
    fertility,
    lang_of,
    load_tokenizer,
    special_tokens,
    token_byte_lengths,
    tokenizer_hash,
)
from kfm.tokenizer.train import train_from_files, train_tokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PII_TOKENS",
    "TokenizerNotFoundError",
    "fertility",
    "lang_of",
    "load_tokenizer",
    "special_tokens",
    "token_byte_lengths",
    "tokenizer_hash",
    "train_from_files",
    "train_tokenizer",
]
