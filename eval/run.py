"""`kfm eval CKPT`: validation loss and bits per byte of a checkpoint on held-out packed text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kfm.checkpoint import load_model_state, resolve_checkpoint_arg
from kfm.config import DataSourceConfig, config_from_dict
from kfm.data import validation_batches
from kfm.fs import atomic_write_text
from kfm.model.transformer import Transformer
from kfm.tokenizer import load_tokenizer, token_byte_lengths
from kfm.train.validation import evaluate


def evaluate_checkpoint(
    ckpt: str | Path,
    *,
    batches: int | None = None,
    data: list[str] | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load ``ckpt`` (step dir, checkpoints dir or run dir) and evaluate it on the val split.

    data: shard-set directories to evaluate on instead of the run's data.sources;
    tokenizer: tokenizer dir instead of the run's tokenizer.path. Writes
    <run_dir>/eval/<step dir>.json and returns the metrics.
    """
    path = resolve_checkpoint_arg(ckpt)
    state, config = load_model_state(path)
    cfg = config_from_dict(config, source=f"{path}/manifest.json")
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    model.to(device)
    tok = load_tokenizer(tokenizer or cfg.tokenizer.path)
    sources = (
        [DataSourceConfig(name=Path(d).name, path=d) for d in data] if data else cfg.data.sources
    )
    val = validation_batches(
        sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        n_batches=batches or cfg.eval.batches,
        verify=cfg.data.verify,
    )
    metrics = evaluate(
        model,
        val,
        token_bytes=token_byte_lengths(tok),
        bos_id=tok.bos_token_id,
        device=torch.device(device),
    )
    result = {"checkpoint": str(path), "sources": [s.path for s in sources], **metrics}
    out_dir = path.parent.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{path.name}.json", json.dumps(result, indent=2) + "\n")
    return result
