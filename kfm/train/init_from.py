"""``checkpoint.init_from``: start a new run from another checkpoint's model weights.

Continued pretraining from an open model (a `kfm import-hf` folder) or from another kfm run:
the model weights are loaded, nothing else. The optimizer is fresh, the schedule starts at step
0 and the data loader at its first sample. DCP reshards on load, so the source may have been
written on any world size and mesh. Two guard rails, as for a resume (kfm/train/resume.py):
the weights must be of the run's architecture (`WEIGHT_KEYS`, each differing key named), and
the checkpoint's tokenizer must be the one the run's shards were packed with.

A run that already has a checkpoint of its own resumes from that instead (the trainer calls
`init_from_weights` only for a fresh start), so restarting an interrupted run never goes back
to the initial weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfm.checkpoint import (
    CheckpointError,
    agree_on_checkpoint,
    load_checkpoint,
    read_manifest,
    resume_candidates,
)
from kfm.checkpoint.stepdir import MANIFEST
from kfm.config import Config, ConfigError, ModelConfig
from kfm.config.loader import build_section
from kfm.model import ffn_hidden_dim
from kfm.train.backends import Backend
from kfm.train.dist import WorldInfo, broadcast_from_rank0

WEIGHT_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "rope_theta",
    "norm_eps",
    "qk_norm",
    "tie_embeddings",
)
"""The ModelConfig keys that define what the weights compute. The others (max_seq_len,
init_std, ffn_multiple_of, attn_backend, document_masking) may differ from the source's."""


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """``{key: value}`` of `WEIGHT_KEYS`, with ``ffn_hidden`` and ``n_kv_heads`` resolved to the
    widths the model builds (so ``ffn_hidden: null`` and its derived value compare equal)."""
    out = {k: getattr(cfg, k) for k in WEIGHT_KEYS}
    out["ffn_hidden"] = ffn_hidden_dim(cfg)
    out["n_kv_heads"] = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
    out["rope_theta"] = float(cfg.rope_theta)
    out["norm_eps"] = float(cfg.norm_eps)
    return out


def find_source(arg: str, cfg: Config, world: WorldInfo) -> Path:
    """The step dir ``checkpoint.init_from`` names, agreed on by every rank: a step dir as given,
    else the newest valid one under a `kfm import-hf` folder, a run dir or a checkpoints/ dir.
    Each rank hashes its share of the files (``checkpoint.verify``).

    Raises:
        ConfigError: the path does not exist or holds no valid checkpoint.
    """
    path = Path(arg)
    if not path.exists():
        raise ConfigError(
            f"checkpoint.init_from={arg} does not exist: pass a `kfm import-hf` folder, a run "
            "dir or a checkpoint step dir (set --checkpoint.init_from)"
        )
    if (path / MANIFEST).is_file():
        candidates = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        candidates = broadcast_from_rank0(resume_candidates(root) if world.rank == 0 else None)
    found = agree_on_checkpoint(candidates, verify_hashes=cfg.checkpoint.verify == "sha256")
    if found is None:
        raise ConfigError(
            f"checkpoint.init_from={arg} holds no valid checkpoint (see the warning above, if "
            "any): pass a `kfm import-hf` folder, a run dir or a checkpoint step dir"
        )
    return found


def check_source(path: Path, manifest: dict[str, Any], cfg: Config, tokenizer_hash: str) -> None:
    """Refuse weights of another architecture (each differing key listed with the value to set)
    or of another tokenizer than the run's data (``tokenizer_hash``: the shards').

    Raises:
        ConfigError: naming the keys, or both tokenizer hashes, and the fix.
    """
    saved = manifest.get("config", {}).get("model")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path / MANIFEST} records no model config; it cannot be started from")
    try:
        source = architecture(build_section(ModelConfig, saved, "model"))
    except ConfigError as e:
        raise ConfigError(f"{path / MANIFEST}: its model config does not load ({e})") from e
    ours = architecture(cfg.model)
    diffs = [k for k in WEIGHT_KEYS if source[k] != ours[k]]
    if diffs:
        lines = "\n".join(
            f"  model.{k}: the weights have {source[k]}, the config has {ours[k]}" for k in diffs
        )
        fixes = " ".join(f"--model.{k}={str(source[k]).lower()}" for k in diffs)
        raise ConfigError(
            f"checkpoint.init_from: {path} holds weights of another architecture:\n{lines}\n"
            f"Set {fixes} (a `kfm import-hf` folder has them in its train.yaml)"
        )
    recorded = manifest.get("tokenizer_hash")
    if recorded and recorded != tokenizer_hash:
        tok = manifest.get("config", {}).get("tokenizer", {}).get("path", "its tokenizer")
        raise ConfigError(
            f"checkpoint.init_from: {path} was made with tokenizer {recorded[:12]} ({tok}), "
            f"the run's shards with {tokenizer_hash[:12]}: its embeddings belong to its "
            f"tokenizer; pack the data with `kfm pack --tokenizer {tok}` and set "
            f"--tokenizer.path={tok}"
        )


def init_from_weights(
    cfg: Config, backend: Backend, world: WorldInfo, identity: dict[str, Any]
) -> list[str]:
    """Load the model weights of ``checkpoint.init_from`` into the backend's (possibly sharded)
    model, after `check_source`; the optimizer, schedule, RNG and loader stay fresh. Collective:
    every rank calls it. Returns the log lines.

    Raises:
        ConfigError: see `find_source` and `check_source`; DeepSpeed backend (not supported).
    """
    arg = cfg.checkpoint.init_from
    if cfg.parallel.backend == "deepspeed":
        raise ConfigError(
            "checkpoint.init_from works with parallel.backend=fsdp only (DeepSpeed loads its own "
            "checkpoint format); set --parallel.backend=fsdp"
        )
    path = find_source(arg, cfg, world)
    manifest = read_manifest(path)
    check_source(path, manifest, cfg, identity["tokenizer_hash"])
    try:
        # optimizer=None: only the "model.*" entries are read (a training checkpoint's optimizer
        # state stays on disk); DCP reshards them to this run's layout.
        load_checkpoint(
            path, model=backend.module, optimizer=None, restore_rng=False, verify_hashes=False
        )
    except CheckpointError as e:
        raise ConfigError(f"checkpoint.init_from={arg}: {e}") from e
    if backend.ema is not None:
        backend.ema.reset()  # average from the loaded weights, not the random init
    source = manifest.get("imported_from", {}).get("hf_dir")
    origin = f" (imported from {source})" if source else f" (step {manifest.get('step')})"
    return [
        f"started from the weights of {path}{origin}: fresh optimizer, schedule and data order "
        "from step 0"
    ]
