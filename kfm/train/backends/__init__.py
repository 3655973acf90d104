"""Training backends: FSDP2/TP (torch-native) and DeepSpeed ZeRO, behind one interface (base.py)."""

from __future__ import annotations

import torch

from kfm.config import Config
from kfm.train.backends.base import Backend, BatchSource, StepOutput
from kfm.train.dist import WorldInfo


def build_backend(cfg: Config, world: WorldInfo, device: torch.device) -> Backend:
    """The backend ``parallel.backend`` names, built (collective under torchrun)."""
    if cfg.parallel.backend == "deepspeed":
        from kfm.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, world, device)
    from kfm.train.backends.fsdp import FSDPBackend

    return FSDPBackend(cfg, world, device)


__all__ = ["Backend", "BatchSource", "StepOutput", "build_backend"]
