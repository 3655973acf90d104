"""Resume: what a checkpoint records about the data it was trained on, and what may change.

Every checkpoint's ``manifest.json`` carries, besides the run's config:

- ``tokenizer_hash``: `kfm.tokenizer.tokenizer_hash` of ``tokenizer.path`` (``kfm eval`` and
  ``kfm export`` check it, as training checks the shards' hash);
- ``data_fingerprint``: ``{source name: fingerprint of its shard set}`` (`shard_set_fingerprint`),
  so that shards re-packed with other content under the same path are noticed at resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kfm.config import DataSourceConfig
from kfm.data.shards import MANIFEST_NAME, ShardError


def shard_set_fingerprint(path: str | Path) -> str:
    """sha256 over what defines a shard set's content: its tokenizer hash, vocab size and, per
    split, every file's name and sha256 (from its ``manifest.json``; no shard is read).

    Re-packing the same documents with the same tokenizer gives the same fingerprint (the
    manifest's creation time is left out); any changed token changes it.

    Raises:
        ShardError: no readable ``manifest.json`` in ``path``.
    """
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        content = {
            "tokenizer_hash": manifest["tokenizer_hash"],
            "vocab_size": manifest["vocab_size"],
            "splits": {
                split: [
                    [f["bin"], f["sha256_bin"], f["idx"], f["sha256_idx"]] for f in entry["files"]
                ]
                for split, entry in sorted(manifest["splits"].items())
            },
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{manifest_path} is not a readable shard-set manifest ({e}); re-run `kfm pack`"
        ) from e
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def data_fingerprint(sources: list[DataSourceConfig]) -> dict[str, str]:
    """``{source name: shard_set_fingerprint(source.path)}`` for every data source."""
    return {s.name: shard_set_fingerprint(s.path) for s in sources}


def manifest_identity(*, tokenizer_hash: str, sources: list[DataSourceConfig]) -> dict[str, Any]:
    """The keys training adds to every checkpoint manifest: ``tokenizer_hash`` and
    ``data_fingerprint``."""
    return {"tokenizer_hash": tokenizer_hash, "data_fingerprint": data_fingerprint(sources)}
