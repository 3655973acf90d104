"""Tokenize documents into a packed shard set (``kfm pack``); format in ``kfm.data.shards``.

Pipeline: readers.iter_documents -> batches of ``batch_docs`` texts -> tokenizer worker processes
-> ``[bos] + ids + [eos]`` per document -> ShardWriter("train") or ShardWriter("val") -> manifest.

Bad input: reading is the stack the curation pipeline uses (``kfm.data.readers``), in its strict
face: a record the pipeline would count as rejected (not UTF-8, not a JSON object, no string text
field) stops the pack with a ReaderError naming file, line and fix, and nothing is written. Empty
(whitespace-only or null) texts are skipped and counted in ``skipped_empty``.

Determinism: batches are returned in submission order, and the train/val decision hashes only the
document text, so the shards are byte-identical for any number of workers. Atomicity: everything
is written into ``OUT.tmp-<pid>`` and renamed to ``OUT`` at the end; a killed pack leaves only the
temp directory, which has no manifest and so never passes for a shard set.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import kfm
from kfm.data.readers import check_input, iter_documents
from kfm.data.shards import FORMAT, VERSION, ShardWriter, token_dtype, write_manifest
from kfm.fs import check_output_dir, publish_dir
from kfm.tokenizer import encode
from kfm.tokenizer.core import load_tokenizer, tokenizer_file, tokenizer_hash

log = logging.getLogger(__name__)

_HASH_DENOM = float(1 << 64)
_INFLIGHT_PER_WORKER = 4
"""Batches queued per worker: keeps workers busy while bounding memory to a few batches."""


def is_val(text: str, val_fraction: float) -> bool:
    """True if `text` belongs to the validation split.

    A 64-bit blake2b of the UTF-8 text, read as a fraction of 2**64, is compared to
    `val_fraction`: stable across runs, machines and worker counts, and exact duplicates always
    land in the same split (no train/val leakage through copies).
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _HASH_DENOM < val_fraction


def _batches(inputs: list[str], text_field: str, batch_docs: int, stats: dict) -> Iterator[list]:
    """Batches of non-empty document texts in input order; counts skipped empty documents, the
    characters and UTF-8 bytes of the packed ones, and the documents' own ``license`` fields."""
    batch: list[str] = []
    for path in inputs:
        for doc in iter_documents(path, text_field=text_field):
            text = doc["text"]
            if not text.strip():
                stats["skipped_empty"] += 1
                continue
            batch.append(text)
            stats["chars"] += len(text)
            stats["bytes"] += len(text.encode("utf-8"))
            lic = doc.get("license")
            if isinstance(lic, str) and lic:
                stats["licenses"][lic] = stats["licenses"].get(lic, 0) + 1
            if len(batch) == batch_docs:
                yield batch
                batch = []
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list[str]], tokenizer_dir: str, bos_id: int, eos_id: int, workers: int
) -> Generator[tuple[list[str], list[np.ndarray]], None, None]:
    """(texts, encoded) per batch, in input order, tokenized on `workers` processes."""
    if workers == 1:
        encode.init_worker(tokenizer_dir, bos_id, eos_id)
        for texts in batches:
            yield texts, encode.encode_batch(texts)
        return
    # spawn, not fork: the parent may hold threads (tokenizers' thread pool, torch) that a
    # forked child would inherit in a locked state. ProcessPoolExecutor rather than
    # multiprocessing.Pool: a worker that dies (or fails to load the tokenizer) raises
    # BrokenProcessPool here, where Pool would respawn it forever and hang.
    ctx = mp.get_context("spawn")
    init_args = (tokenizer_dir, bos_id, eos_id, False)
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=encode.init_worker, initargs=init_args
    ) as pool:
        # A bounded FIFO of futures instead of pool.map: map submits the whole input at once,
        # unbounded in memory for a large corpus. Popping in submission order keeps the output
        # order independent of which worker finishes first.
        pending: deque[tuple[list[str], Future]] = deque()
        try:
            for texts in batches:
                pending.append((texts, pool.submit(encode.encode_batch, texts)))
                if len(pending) >= _INFLIGHT_PER_WORKER * workers:
                    t, fut = pending.popleft()
                    yield t, fut.result()
            while pending:
                t, fut = pending.popleft()
                yield t, fut.result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"a tokenizer worker process died (its traceback is printed above) while loading "
                f"{tokenizer_dir} or encoding; run with --workers 1 to see the error directly"
            ) from e
        finally:
            for _, fut in pending:
                fut.cancel()


def _license_summary(counts: dict[str, int]) -> str:
    if not counts:
        return "unknown"
    return "; ".join(sorted(counts, key=lambda k: (-counts[k], k)))


def pack(
    inputs: list[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    source_name: str,
    license: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 27,
    workers: int = 1,
    batch_docs: int = 256,
    overwrite: bool = False,
) -> dict:
    """Tokenize the documents of `inputs` into a shard set at `out_dir`; returns its manifest.

    Each non-empty document becomes ``[bos] + ids + [eos]`` in split "val" if
    ``is_val(text, val_fraction)`` else "train"; empty (whitespace-only) documents are skipped
    and counted in ``skipped_empty``. Output is byte-identical for any `workers`.

    Args:
        inputs: files, directories or ``hf://NAME`` (see ``kfm.data.readers``), read in order.
        tokenizer_path: tokenizer directory; its tokenizer.json sha256 goes in the manifest.
        source_name, license: recorded in the manifest's ``sources`` entry. Without `license`,
            the documents' own ``license`` fields are recorded ("; "-joined, most common
            first), or "unknown" when they have none.
        val_fraction: expected share of documents in "val", in [0, 1).
        shard_tokens: soft maximum tokens per .bin file.
        workers: tokenizer processes (1 tokenizes in this process).
        batch_docs: documents per task sent to a worker.
        overwrite: replace `out_dir` if it holds a shard set kfm packed (never anything else,
            see ``kfm.fs.check_output_dir``); the old set is removed once the new one is complete.

    Raises:
        OutputError: `out_dir` is not a new or empty directory, or a shard set with `overwrite`;
            or it is, contains or lies inside an input, the tokenizer, a checkpoint or a run.
        InputNotFoundError / ReaderError: an input is missing or unreadable, or holds a bad
            record (file and line named; before any work for missing files).
        TokenizerNotFoundError: no tokenizer at `tokenizer_path`.
        ValueError: bad arguments, a tokenizer without bos/eos, or no documents at all.
    """
    if not inputs:
        raise ValueError("pack: no inputs given; pass files or directories to tokenize")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1) (--val-fraction)")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1 (--workers)")
    if batch_docs < 1:
        raise ValueError(f"batch_docs={batch_docs} must be >= 1")
    for path in inputs:  # a typo in the last input should fail now, not after hours of work
        check_input(path)
    tok_path = str(tokenizer_path)
    out = check_output_dir(
        out_dir, "shard set", inputs=[*inputs, tok_path], overwrite=overwrite, flag="--out"
    )
    tok_hash = tokenizer_hash(tok_path)
    tok = load_tokenizer(tok_path)
    tok_dir = str(tokenizer_file(tok_path).parent)
    bos_id, eos_id, vocab_size = tok.bos_token_id, tok.eos_token_id, len(tok)
    if bos_id is None or eos_id is None:
        raise ValueError(
            f"{tok_path}: tokenizer defines no bos_token or eos_token; pack stores each document "
            "as [bos] + ids + [eos], so train one with `kfm tokenizer train`"
        )
    del tok

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed pack that had this same pid
    stats: dict = {"skipped_empty": 0, "chars": 0, "bytes": 0, "licenses": {}}
    try:
        with (
            ShardWriter(tmp, "train", vocab_size=vocab_size, shard_tokens=shard_tokens) as train,
            ShardWriter(tmp, "val", vocab_size=vocab_size, shard_tokens=shard_tokens) as val,
        ):
            batches = _batches([str(p) for p in inputs], text_field, batch_docs, stats)
            # closing(): on an error, shut the worker pool down now rather than at garbage
            # collection of the half-consumed generator.
            with closing(_encoded(batches, tok_dir, bos_id, eos_id, workers)) as encoded_batches:
                for texts, encoded in encoded_batches:
                    for text, ids in zip(texts, encoded, strict=True):
                        (val if is_val(text, val_fraction) else train).add_document(ids)
            splits = {"train": train.close(), "val": val.close()}
        n_docs = sum(s["n_docs"] for s in splits.values())
        if n_docs == 0:
            empty = stats["skipped_empty"]
            found = f"{empty} with empty text only" if empty else "the input is empty"
            raise ValueError(
                f"{', '.join(map(str, inputs))}: no documents to pack ({found}); give inputs "
                f"that hold text, or set --text-field to the field holding it"
            )
        if val_fraction > 0 and splits["val"]["n_docs"] == 0:
            log.warning(
                "%s (source %s): val split is empty: %d documents and val_fraction=%g; raise "
                "--val-fraction",
                out,
                source_name,
                n_docs,
                val_fraction,
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": token_dtype(vocab_size).name,
            "vocab_size": vocab_size,
            "tokenizer_hash": tok_hash,
            "bos_id": bos_id,
            "eos_id": eos_id,
            "sources": [
                {
                    "name": source_name,
                    "license": license or _license_summary(stats["licenses"]),
                    "document_licenses": stats["licenses"],
                    "inputs": [str(p) for p in inputs],
                    "n_docs": n_docs,
                    "n_tokens": sum(s["n_tokens"] for s in splits.values()),
                }
            ],
            "splits": splits,
            "val_fraction": val_fraction,
            "text_field": text_field,
            "skipped_empty": stats["skipped_empty"],
            "n_chars": stats["chars"],
            "n_bytes": stats["bytes"],
            "created_by": f"kfm {kfm.__version__}",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, manifest)
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
