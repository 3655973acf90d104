"""Checkpoints: DCP model/optimizer state + per-rank trainer state + a manifest, saved atomically."""

from kfm.checkpoint.manager import (
    CheckpointError,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    resolve_checkpoint_arg,
    save_checkpoint,
    step_dir_name,
    validate_checkpoint,
)
from kfm.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "resolve_checkpoint_arg",
    "restore_rng_state",
    "save_checkpoint",
    "step_dir_name",
    "validate_checkpoint",
]
