"""Data: the shard format written by `kfm pack` and the packed training loader."""

from kfm.data.loader import Batch, PackedLoader, validation_batches
from kfm.data.shards import ShardError, ShardSet, ShardWriter, token_dtype, write_manifest

__all__ = [
    "Batch",
    "PackedLoader",
    "ShardError",
    "ShardSet",
    "ShardWriter",
    "token_dtype",
    "validation_batches",
    "write_manifest",
]
