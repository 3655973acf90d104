"""Fixtures for the export tests: a tiny byte-level BPE tokenizer trained on Korean + English."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0, 1, 2, as in kfm's tokenizer

SENTENCES = [
    "The patient presented with acute myocardial infarction and elevated troponin.",
    "Metformin is a first-line treatment for type 2 diabetes mellitus.",
    "환자는 급성 심근경색으로 응급실에 내원하였다.",
    "제2형 당뇨병의 일차 치료제로 메트포르민을 사용한다.",
    "혈압은 120/80 mmHg, 맥박은 분당 72회였다.",
    "CRISPR-Cas9 enables targeted genome editing in human cells.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved PreTrainedTokenizerFast dir (< 320 tokens) whose post-processor prepends <|bos|>."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False so decode(encode(text)) reproduces the text byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(out))
    return out
