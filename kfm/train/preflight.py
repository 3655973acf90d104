"""Pre-flight checks of a training config's inputs and outputs, for ``kfm train --dry-run``.

The dry run must catch what the run would hit in its first minute, without a GPU and without
reading the corpus: every data source is a shard set whose manifest and file sizes check out
(`ShardSet.open` with ``verify="size"``: a stat per file, no data read), the tokenizer loads, fits
``model.vocab_size`` and is the one the shards were packed with, and the run directory can be
created and written. Numbers are checked earlier, when the config loads (`kfm.config.validate`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kfm.config import Config
from kfm.data.shards import ShardError, ShardSet, load_manifest
from kfm.tokenizer import load_tokenizer, tokenizer_hash
from kfm.tokenizer.core import TokenizerNotFoundError
from kfm.tokenizer.identity import training_fit_problem


@dataclass(frozen=True, slots=True)
class Check:
    """One pre-flight finding: what was checked, whether it passed, and the detail or the fix."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def preflight(cfg: Config) -> list[Check]:
    """Check data sources, tokenizer and run directory of ``cfg``; never raises for a finding."""
    checks, hashes = _data_checks(cfg)
    checks.append(_tokenizer_check(cfg, hashes))
    checks.append(_run_dir_check(cfg))
    return checks


def _data_checks(cfg: Config) -> tuple[list[Check], dict[str, str]]:
    """One check per source, and the tokenizer hash recorded by each good source's manifest."""
    if not cfg.data.sources:
        return [
            Check(
                "data.sources",
                False,
                "empty: training needs at least one shard set (kfm pack / kfm data run output); "
                "add data.sources to the preset or pass --data.sources='[{name: x, path: DIR}]'",
            )
        ], {}
    checks, hashes, val_tokens = [], {}, {}
    window = cfg.data.seq_len + 1
    for src in cfg.data.sources:
        name = f"data {src.name}"
        try:
            manifest = load_manifest(src.path)
            tokens = {}
            for split in ["train", "val"] if cfg.eval.interval > 0 else ["train"]:
                ShardSet.open(src.path, split, verify="size")  # manifest, file sizes, indexes
                tokens[split] = int(manifest["splits"][split]["n_tokens"])
            if tokens["train"] < window:
                raise ShardError(
                    f"{src.path}: its train split holds {tokens['train']} tokens, fewer than one "
                    f"window of data.seq_len + 1 = {window}; pack more data or lower "
                    "--data.seq_len"
                )
        except (ShardError, OSError) as e:
            checks.append(Check(name, False, str(e)))
            continue
        hashes[src.name] = manifest["tokenizer_hash"]
        if "val" in tokens:
            val_tokens[src.name] = tokens["val"]
        counts = ", ".join(f"{split} {n:,} tokens" for split, n in tokens.items())
        checks.append(Check(name, True, f"{src.path}: {counts}"))
    if val_tokens:
        short = sorted(n for n, t in val_tokens.items() if t < window)
        if len(short) == len(val_tokens):
            checks.append(
                Check(
                    "validation",
                    False,
                    f"no source has a full validation window of {window} tokens; re-pack with "
                    "a larger --val-fraction, lower --data.seq_len or set --eval.interval=0",
                )
            )
        else:
            skipped = f"; skips {', '.join(short)} (no full window)" if short else ""
            checks.append(
                Check("validation", True, f"{len(val_tokens) - len(short)} source(s){skipped}")
            )
    return checks, hashes


def _tokenizer_check(cfg: Config, shard_hashes: dict[str, str]) -> Check:
    path = cfg.tokenizer.path
    try:
        tok = load_tokenizer(path)
        digest = tokenizer_hash(path)
    except TokenizerNotFoundError as e:
        return Check("tokenizer", False, str(e))  # names the path and the fix
    except (OSError, TypeError, ValueError) as e:
        return Check("tokenizer", False, f"{path} cannot be loaded ({e}); set --tokenizer.path")
    problem = training_fit_problem(
        path, len(tok), digest, vocab_size=cfg.model.vocab_size, shard_hashes=shard_hashes
    )
    if problem:
        return Check("tokenizer", False, problem)
    return Check("tokenizer", True, f"{path}: {len(tok):,} tokens, sha256 {digest[:12]}")


def _run_dir_check(cfg: Config) -> Check:
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check(
            "run directory",
            False,
            f"{run_dir}: {existing} exists and is not a directory; set --train.run_root",
        )
    try:  # a real write: permission bits say nothing for root, read-only mounts or quotas
        fd, probe = tempfile.mkstemp(prefix=".kfm-preflight-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return Check(
            "run directory",
            False,
            f"{run_dir}: cannot write in {existing} ({e.strerror}); set --train.run_root to a "
            "writable directory",
        )
    what = "exists (training resumes or continues it)" if run_dir.exists() else "will be created"
    return Check("run directory", True, f"{run_dir} {what}")
