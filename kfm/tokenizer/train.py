"""Train kfm's byte-level BPE tokenizer (``kfm tokenizer train``).

Design:
- NFC normalization, so composed and decomposed Hangul give the same ids (and Korean text
  written either way costs the same tokens).
- Digits are split one per token before BPE (as in Llama/DeepSeek tokenizers): numbers in lab
  values and doses are then tokenized consistently, which helps arithmetic-like patterns.
- Byte-level BPE whose initial alphabet is all 256 bytes: any input encodes, nothing maps to
  <unk>, and decode(encode(text)) == text for NFC text.
- Special tokens at fixed ids from 0 (see ``kfm.tokenizer.core.special_tokens``); the post-processor
  prepends <|bos|>; eos is appended by the packer, so generation code sees the same layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kfm.fs import check_output_dir, publish_dir
from kfm.tokenizer.core import (
    BOS_TOKEN,
    EOS_TOKEN,
    METADATA_FILE,
    PAD_TOKEN,
    PII_TOKENS,
    TOKENIZER_FILE,
    fertility,
    lang_of,
    special_tokens,
    tokenizer_hash,
)

log = logging.getLogger(__name__)

N_BYTES = 256
HELDOUT_EVERY = 50
"""train_from_files holds out every 50th document (not trained on) to measure fertility."""
HELDOUT_MAX_CHARS = 2_000_000
"""Per-language cap on held-out characters; once reached, those documents are trained on."""


def _build(vocab_size: int, min_frequency: int, n_reserved: int) -> tuple[Any, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # normalized=False: the tokens are matched on the raw text, before NFC and byte mapping.
        special_tokens=[AddedToken(t, normalized=False) for t in special_tokens(n_reserved)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _finish(tok: Any) -> Any:
    """Mark PII placeholders non-special and add the bos post-processor; returns a new Tokenizer."""
    from tokenizers import Tokenizer, processors

    # BpeTrainer registers every token it is given as special; PII placeholders are text the
    # model should read and write (kept by decode(skip_special_tokens=True)), so flip the flag.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        if t["content"] in PII_TOKENS:
            t["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    n_reserved: int = 64,
    heldout_texts: Sequence[str] = (),
    metadata: dict | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir` atomically.

    The directory holds ``tokenizer.json`` + ``tokenizer_config.json`` (loadable offline with
    ``transformers.AutoTokenizer.from_pretrained(out_dir)``) and ``kfm_tokenizer.json`` with the
    training metadata. Output is deterministic for the same texts and settings.

    Args:
        texts: training documents; consumed once.
        vocab_size: target vocabulary size including the special tokens; fewer if the text
            has too few distinct pairs (the metadata records the real size).
        min_frequency: a merge needs its pair seen at least this often.
        n_reserved: number of ``<|reserved_N|>`` spare special tokens.
        heldout_texts: documents not in `texts` to measure fertility on, per language. Read only
            after training, so a list still being filled while `texts` is consumed is fine.
        metadata: extra fields merged into kfm_tokenizer.json.
        overwrite: replace `out_dir` if it holds a tokenizer kfm trained (never anything else, see
            ``kfm.fs.check_output_dir``); the old one is removed once the new one is saved.
        inputs: the files `texts` come from: `out_dir` must not be, contain or lie inside one.

    Raises:
        OutputError: `out_dir` is not a new or empty directory, or a kfm tokenizer with
            `overwrite`; or it is, contains or lies inside an input, a checkpoint or a run.
        ValueError: vocab_size too small for the special tokens plus the 256 bytes, or no text.
    """
    from transformers import PreTrainedTokenizerFast

    n_special = len(special_tokens(n_reserved))
    if n_reserved < 0:
        raise ValueError(f"n_reserved={n_reserved} must be >= 0 (--tokenizer.n_reserved)")
    if vocab_size < n_special + N_BYTES + 1:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: {n_special} special tokens + "
            f"{N_BYTES} bytes need at least {n_special + N_BYTES + 1} "
            "(raise --tokenizer.vocab_size or lower --tokenizer.n_reserved)"
        )
    out = check_output_dir(
        out_dir, "tokenizer", inputs=inputs, overwrite=overwrite, flag="--tokenizer.path"
    )

    n_chars = n_docs = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars, n_docs
        for t in texts:
            n_chars += len(t)
            n_docs += 1
            yield t

    tok, trainer = _build(vocab_size, min_frequency, n_reserved)
    tok.train_from_iterator(counted(), trainer=trainer)
    if n_chars == 0:
        raise ValueError("train_tokenizer: no training text (all inputs empty)")
    tok = _finish(tok)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    if len(hf) < vocab_size:
        log.warning(
            "tokenizer has %d tokens, fewer than vocab_size=%d: the training text has too "
            "few distinct pairs (min_frequency=%d)",
            len(hf),
            vocab_size,
            min_frequency,
        )

    by_lang: dict[str, list[str]] = {"ko": [], "en": []}
    for t in heldout_texts:
        if t:
            by_lang[lang_of(t)].append(t)
    meta: dict[str, Any] = {
        "vocab_size": len(hf),
        "vocab_size_requested": vocab_size,
        "min_frequency": min_frequency,
        "n_reserved": n_reserved,
        "special_tokens": special_tokens(n_reserved),
        "pii_tokens": list(PII_TOKENS),
        "bos_id": hf.bos_token_id,
        "eos_id": hf.eos_token_id,
        "pad_id": hf.pad_token_id,
        "train_docs": n_docs,
        "train_chars": n_chars,
        "heldout_docs": {k: len(v) for k, v in by_lang.items()},
        # chars per token on held-out text; None when no held-out text of that language
        "fertility": {k: (fertility(hf, v) if v else None) for k, v in by_lang.items()},
        **(metadata or {}),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier run of this same pid that was killed
    try:
        hf.save_pretrained(str(tmp))
        # transformers 5 writes its own class name, which 4.x cannot resolve; the 4.x name
        # loads the same fast tokenizer in both.
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        meta["tokenizer_hash"] = tokenizer_hash(tmp)
        (tmp / METADATA_FILE).write_text(
            json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if not (tmp / TOKENIZER_FILE).is_file():
            raise RuntimeError(f"save_pretrained wrote no {TOKENIZER_FILE} in {tmp}")
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def train_from_files(
    inputs: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    n_reserved: int = 64,
    text_field: str = "text",
    max_chars: int = 200_000_000,
    overwrite: bool = False,
) -> dict:
    """Train the tokenizer on documents read from `inputs` (see ``kfm.data.readers``).

    Every HELDOUT_EVERY-th non-empty document (up to HELDOUT_MAX_CHARS per language) is held
    out of training and used to measure fertility separately for Korean and English. Reading
    stops once `max_chars` characters of training text were taken.

    Returns:
        The report also written to ``out_dir/kfm_tokenizer.json``: vocab_size, fertility
        {"ko", "en"} (chars per token, None without held-out text), train_chars, train_docs,
        heldout_docs, tokenizer_hash, inputs, path.

    Raises:
        InputNotFoundError / ReaderError: an input is missing or unreadable.
        OutputError: see train_tokenizer (checked before training).
        ValueError: see train_tokenizer.
    """
    from kfm.data.readers import check_input, iter_documents

    if not inputs:
        raise ValueError("no tokenizer inputs; set --tokenizer.inputs (files or directories)")
    for path in inputs:  # fail on a missing input before minutes of training
        check_input(path)
    if max_chars <= 0:
        raise ValueError(f"max_chars={max_chars} must be > 0 (--tokenizer.max_chars)")

    heldout: list[str] = []
    heldout_chars = {"ko": 0, "en": 0}

    def texts() -> Iterator[str]:
        taken = 0
        n = 0
        for path in inputs:
            for doc in iter_documents(path, text_field=text_field):
                text = doc["text"]
                if not text:
                    continue
                n += 1
                if n % HELDOUT_EVERY == 0:
                    lang = lang_of(text)
                    if heldout_chars[lang] < HELDOUT_MAX_CHARS:
                        heldout_chars[lang] += len(text)
                        heldout.append(text)
                        continue
                yield text
                taken += len(text)
                if taken >= max_chars:
                    return

    out = train_tokenizer(
        texts(),
        out_dir,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        n_reserved=n_reserved,
        heldout_texts=heldout,
        metadata={"inputs": list(inputs), "text_field": text_field, "max_chars": max_chars},
        overwrite=overwrite,
        inputs=inputs,
    )
    report = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    report["path"] = str(out)
    return report
