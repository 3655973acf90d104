"""`kfm eval CKPT`: validation loss and bits per byte of a checkpoint on held-out packed text,
overall, per source (val_bpb/<source>) and per language (val_bpb/lang/<code>, from
data.sources[].language), as `kfm train` logs them (kfm.train.validation).

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
from torch import nn

from kfm.checkpoint import load_model_state, resolve_checkpoint_arg
from kfm.checkpoint.stepdir import read_manifest
from kfm.config import Config, DataSourceConfig, config_from_dict
from kfm.data import validation_batches
from kfm.fs import atomic_write_text
from kfm.model.transformer import Transformer
from kfm.tokenizer import token_byte_lengths
from kfm.tokenizer.identity import check_tokenizer_identity, describe
from kfm.train.validation import evaluate, language_groups


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
    sources = eval_sources(cfg, data)
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
    metrics = validation_metrics(
        model, cfg, check.tokenizer, sources=sources, batches=n_batches, device=device
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
    lines = breakdown_lines(metrics, sources)
    return {**result, "result_file": str(out), "replaced": replaced, "breakdown_lines": lines}


def breakdown_lines(metrics: dict[str, Any], sources: list[DataSourceConfig]) -> list[str]:
    """Two console lines: bits per byte per source, and per language (naming the sources that
    have no data.sources[].language and so count in no language)."""
    per_source = [
        f"{s.name} {metrics[f'val_bpb/{s.name}']:.4f}"
        for s in sources
        if f"val_bpb/{s.name}" in metrics
    ]
    groups, unknown = language_groups(sources)
    per_lang = [
        f"{lang} {metrics[f'val_bpb/lang/{lang}']:.4f}"
        for lang in groups
        if f"val_bpb/lang/{lang}" in metrics
    ]
    lang_line = "bits/byte per language: " + (", ".join(per_lang) or "none")
    if unknown:
        lang_line += f" (no data.sources[].language: {', '.join(unknown)})"
    return ["bits/byte per source: " + (", ".join(per_source) or "none"), lang_line]


def eval_sources(cfg: Config, data: list[str] | None) -> list[DataSourceConfig]:
    """The run's data.sources, or one source per ``data`` directory (named after it), with the
    language of the run's source at the same path, if any."""
    if not data:
        return list(cfg.data.sources)
    known = {str(Path(s.path).resolve()): s.language for s in cfg.data.sources}
    return [
        DataSourceConfig(name=Path(d).name, path=d, language=known.get(str(Path(d).resolve())))
        for d in data
    ]


def validation_metrics(
    model: nn.Module,
    cfg: Config,
    tokenizer: Any,
    *,
    sources: list[DataSourceConfig] | None = None,
    batches: int | None = None,
    device: str | torch.device = "cpu",
    dp_rank: int = 0,
    dp_size: int = 1,
) -> dict[str, float]:
    """val_loss, val_bpb, val_tokens, val_bpb/<source> and val_bpb/lang/<code> of ``model`` (a
    kfm Transformer) on the validation set ``kfm train`` uses: the first ``batches`` (default
    eval.batches) batches of ``sources`` (default data.sources) in cfg's seq_len and
    micro_batch_size. ``tokenizer``: the run's (token byte lengths, bos id). A model sharded over
    ``dp_size`` data-parallel ranks: each evaluates its share and the sums are all-reduced."""
    sources = cfg.data.sources if sources is None else sources
    val = validation_batches(
        sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        n_batches=cfg.eval.batches if batches is None else batches,
        verify=cfg.data.verify,
    )
    return evaluate(
        model,
        val,
        token_bytes=token_byte_lengths(tokenizer),
        bos_id=tokenizer.bos_token_id,
        device=torch.device(device),
        sources=sources,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def bpb_breakdown(metrics: dict[str, Any]) -> dict[str, float]:
    """The bits-per-byte figures of ``metrics`` (`validation_metrics`, a kfm eval result or an
    evaluation line of metrics.jsonl) as results.json's ``kfm.bpb``: {"<source>": ...,
    "lang/<code>": ..., "all": ...}."""
    out = {k.removeprefix("val_bpb/"): v for k, v in metrics.items() if k.startswith("val_bpb/")}
    if "val_bpb" in metrics:
        out["all"] = metrics["val_bpb"]
    return out


def checkpoint_bpb(
    ckpt: str | Path,
    *,
    model: nn.Module | None = None,
    batches: int | None = None,
    device: str = "cpu",
    dp_rank: int = 0,
    dp_size: int = 1,
) -> dict[str, float]:
    """`bpb_breakdown` of checkpoint ``ckpt`` (step dir, checkpoints dir or run dir) on its run's
    validation set, with its run's tokenizer; ``model``: the checkpoint's weights already loaded
    (a kfm Transformer, possibly sharded over ``dp_size`` data-parallel ranks: each evaluates its
    share), to skip loading them again. Nothing is written.

    Raises:
        TokenizerMismatchError: the run's tokenizer or shards are not the checkpoint's.
        CheckpointError, ShardError: a bad checkpoint or shard set.
    """
    path = resolve_checkpoint_arg(ckpt)
    cfg = config_from_dict(read_manifest(path).get("config", {}), source=f"{path}/manifest.json")
    check = check_tokenizer_identity(
        cfg.tokenizer.path,
        checkpoint=path,
        config=cfg,
        tokenizer_given=False,
        shard_sets=[s.path for s in cfg.data.sources],
        shards_given=False,
    )
    if model is None:
        state, _ = load_model_state(path)
        model = Transformer(cfg.model)
        model.load_state_dict(state, strict=True)
        model.to(device)
    return bpb_breakdown(
        validation_metrics(
            model,
            cfg,
            check.tokenizer,
            batches=batches,
            device=device,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
    )
