"""Data: the shard format written by `kfm pack` and the packed training loader.

The loader (which imports torch) is loaded on first use, so the curation pipeline's worker
processes, which only read and write shards, start without importing torch.
"""

from typing import Any

from kfm.data.shards import ShardError, ShardSet, ShardWriter, token_dtype, write_manifest
from kfm.data.verify import (
    VerifyShare,
    raise_verify_errors,
    verification_share,
    verify_shard_sets,
)

_LOADER_NAMES = ("Batch", "PackedLoader", "validation_batches")

__all__ = [
    "Batch",
    "PackedLoader",
    "ShardError",
    "ShardSet",
    "ShardWriter",
    "VerifyShare",
    "raise_verify_errors",
    "token_dtype",
    "validation_batches",
    "verification_share",
    "verify_shard_sets",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from kfm.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'kfm.data' has no attribute {name!r}")
