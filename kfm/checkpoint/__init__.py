"""Checkpoints: the step-directory protocol (atomic, per-rank integrity) and DCP model/optimizer
state on it; asynchronous saving through `Checkpointer`. See README.md."""

from kfm.checkpoint.manager import (
    Checkpointer,
    load_checkpoint,
    load_model_state,
    model_optimizer_state,
    save_checkpoint,
)
from kfm.checkpoint.rng import capture_rng_state, restore_rng_state
from kfm.checkpoint.stepdir import (
    CheckpointError,
    PendingSave,
    agree_on_checkpoint,
    find_latest_valid,
    list_checkpoints,
    read_manifest,
    resolve_checkpoint_arg,
    resume_candidates,
    step_dir_name,
    validate_checkpoint,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "PendingSave",
    "agree_on_checkpoint",
    "capture_rng_state",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "model_optimizer_state",
    "read_manifest",
    "resolve_checkpoint_arg",
    "restore_rng_state",
    "resume_candidates",
    "save_checkpoint",
    "step_dir_name",
    "validate_checkpoint",
]
