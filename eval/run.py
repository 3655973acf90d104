"""`kfm eval CKPT`: validation loss and bits per byte of a checkpoint on held-out packed text.

Before anything is computed, the tokenizer is checked against the checkpoint and the shards
(kfm.tokenizer.identity), as `kfm train` does. Results go to ``<run>/eval/``, one file per
checkpoint and settings, so that a result is never replaced by one computed differently:

- ``step_000123.json``: the run's own settings (its data.sources, its tokenizer, eval.batches);
- ``step_000123-<8 hex>.json``: other settings (``--data``, ``--batches``), the hex a hash of them.

A rerun with the same settings replaces its file (same checkpoint, same numbers) and says so; a
file of that name holding other or unrecorded settings is never replaced (an error names it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kfm.checkpoint import load_model_state, resolve_checkpoint_arg
from kfm.checkpoint.stepdir import read_manifest
from kfm.config import DataSourceConfig, config_from_dict
from kfm.data import validation_batches
from kfm.fs import atomic_write_text
from kfm.model.transformer import Transformer
from kfm.tokenizer import token_byte_lengths
from kfm.tokenizer.identity import check_tokenizer_identity, describe
from kfm.train.validation import evaluate


class EvalResultExistsError(RuntimeError):
    """An earlier eval result with other (or unrecorded) settings holds the result file's name."""


def result_name(step_dir: str, settings: dict[str, Any], *, run_defaults: bool) -> str:
    """File name of the result of ``step_dir`` under ``settings``: ``<step_dir>.json`` for the
    run's own settings, else ``<step_dir>-<first 8 hex of sha256(settings)>.json``."""
    if run_defaults:
        return f"{step_dir}.json"
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"{step_dir}-{hashlib.sha256(blob).hexdigest()[:8]}.json"


def _check_earlier(out: Path, settings: dict[str, Any]) -> bool:
    """True if ``out`` holds a result of the same settings (to replace); False if absent.

    Raises:
        EvalResultExistsError: ``out`` holds a result of other or unrecorded settings.
    """
    if not out.exists():
        return False
    try:
        earlier = json.loads(out.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier == settings:
        return True
    what = (
        "records no settings (written by an earlier kfm)"
        if earlier is None
        else (f"was computed with other settings ({json.dumps(earlier, sort_keys=True)})")
    )
    raise EvalResultExistsError(
        f"{out} {what}; it is kept, not replaced: move or delete it, then rerun `kfm eval`"
    )


def evaluate_checkpoint(
    ckpt: str | Path,
    *,
    batches: int | None = None,
    data: list[str] | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load ``ckpt`` (step dir, checkpoints dir or run dir) and evaluate it on the val split.

    data: shard-set directories to evaluate on instead of the run's data.sources; tokenizer:
    tokenizer dir instead of the run's tokenizer.path; batches: instead of eval.batches. The
    tokenizer must be the one the checkpoint was trained with and the shards' tokenizer (checked
    first; nothing is computed or written otherwise). Writes the result to
    ``<run_dir>/eval/`` (file name: see the module docstring) and returns it, plus
    ``result_file`` (where it went) and ``replaced`` (an earlier result of the same settings
    was replaced), which are not saved.

    Raises:
        TokenizerMismatchError: the tokenizer or the shards belong to another tokenizer.
        EvalResultExistsError: the result's file name holds a result of other settings.
        ValueError: batches < 1.
        CheckpointError, ShardError: a bad checkpoint or shard set.
    """
    path = resolve_checkpoint_arg(ckpt)
    cfg = config_from_dict(read_manifest(path).get("config", {}), source=f"{path}/manifest.json")
    n_batches = cfg.eval.batches if batches is None else batches
    if n_batches < 1:
        raise ValueError(f"--batches={n_batches} must be >= 1 (validation batches to evaluate)")
    sources = (
        [DataSourceConfig(name=Path(d).name, path=d) for d in data] if data else cfg.data.sources
    )
    check = check_tokenizer_identity(
        tokenizer or cfg.tokenizer.path,
        checkpoint=path,
        config=cfg,
        tokenizer_given=tokenizer is not None,
        shard_sets=[s.path for s in sources],
        shards_given=bool(data),
    )
    settings = {
        "data": [str(Path(s.path).resolve()) for s in sources],
        "tokenizer_hash": check.tokenizer_hash,
        "batches": n_batches,
    }
    run_data = [str(Path(s.path).resolve()) for s in cfg.data.sources]
    run_defaults = (
        settings["data"] == run_data
        and n_batches == cfg.eval.batches
        and (tokenizer is None or check.unchecked is None)
    )
    out = path.parent.parent / "eval" / result_name(path.name, settings, run_defaults=run_defaults)
    replaced = _check_earlier(out, settings)  # before the costly part: refuse early

    state, _ = load_model_state(path)
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    model.to(device)
    val = validation_batches(
        sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        n_batches=n_batches,
        verify=cfg.data.verify,
    )
    metrics = evaluate(
        model,
        val,
        token_bytes=token_byte_lengths(check.tokenizer),
        bos_id=check.tokenizer.bos_token_id,
        device=torch.device(device),
    )
    result = {
        "checkpoint": str(path),
        "sources": [s.path for s in sources],
        "tokenizer": str(tokenizer or cfg.tokenizer.path),
        "tokenizer_check": describe(check, tokenizer or cfg.tokenizer.path),
        "settings": settings,
        **metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return {**result, "result_file": str(out), "replaced": replaced}
