"""Reading checkpoints written by the DeepSpeed backend (kfm/train/backends/deepspeed.py) without an
engine: validation against the manifest, and a consolidated full state dict for eval and export.

It lives in kfm.checkpoint so that `load_model_state` can dispatch on the manifest's "backend"
without kfm.checkpoint importing the training backends.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kfm.checkpoint.stepdir import MANIFEST, CheckpointError, validate_checkpoint
from kfm.config import ModelConfig, config_from_dict
from kfm.model.transformer import Transformer

log = logging.getLogger(__name__)

BACKEND = "deepspeed"
"""Value of ``"backend"`` in the manifest of a checkpoint written by this module."""


_INSTALL_HINT = "DeepSpeed is not installed: pip install 'kfm[deepspeed]'"


def import_deepspeed() -> Any:
    """Import deepspeed quietly, or raise an ImportError naming the extra to install."""
    if not torch.cuda.is_available():
        # Without this DeepSpeed probes for accelerators and warns that it fell back to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    # DeepSpeed logs every engine setting at INFO on every rank; kfm's logger reports what matters.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


# -- reading checkpoints without an engine -----------------------------------------------------


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether the step dir's manifest says it was written by this backend (no validation)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("backend") == BACKEND


def validate_deepspeed_checkpoint(path: str | Path, *, verify_hashes: bool = True) -> dict:
    """`kfm.checkpoint.validate_checkpoint`, plus: the manifest says the DeepSpeed backend wrote it.

    Raises:
        CheckpointError: naming the missing, truncated or altered file, or a checkpoint that is
            not a DeepSpeed one.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() and not is_deepspeed_checkpoint(path):
        raise CheckpointError(
            f"{path} was not written by the DeepSpeed backend: load it with "
            "kfm.checkpoint.load_checkpoint (--parallel.backend=fsdp)"
        )
    return validate_checkpoint(path, verify_hashes=verify_hashes)


def load_model_state_from_deepspeed(
    path: str | Path, *, verify_hashes: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's full fp32 state dict on CPU, consolidated from ZeRO shards, and its config.

    Works for ZeRO stages 1-3 and any world size, in one process without a process group:
    DeepSpeed's zero_to_fp32 rebuilds every parameter from the fp32 master partitions in the
    optimizer files. Keys are those of the kfm model's ``state_dict()`` (the same as
    kfm.checkpoint.load_model_state gives; non-persistent buffers such as the RoPE tables are
    dropped). Cost: the whole model in CPU memory, plus reading every optimizer shard.

    Raises:
        CheckpointError: invalid checkpoint, or consolidated keys that do not match the config's
            model.
        ImportError: deepspeed is not installed (names the extra).
    """
    path = Path(path)
    manifest = validate_deepspeed_checkpoint(path, verify_hashes=verify_hashes)
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidate: Callable[..., dict[str, Tensor]] = get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # it print()s its progress
        full = consolidate(str(path.parent), tag=path.name)
    log.debug("zero_to_fp32 on %s: %s", path, printed.getvalue())
    config = manifest["config"]
    model_cfg: ModelConfig = config_from_dict(config, source=f"{path}/{MANIFEST}").model
    with torch.device("meta"):  # only the key set is needed: no memory, no init
        expected = Transformer(model_cfg).state_dict().keys()
    missing = [k for k in expected if k not in full]
    if missing:
        raise CheckpointError(
            f"{path} lacks {missing[:3]} after consolidation: it does not hold this model "
            f"({len(missing)} tensors missing)"
        )
    return {k: full[k].float().contiguous() for k in expected}, config
