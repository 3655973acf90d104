"""Encode documents as ``[bos] + ids + [eos]`` in tokenizer worker processes (used by ``kfm pack``).

Workers use the ``tokenizers`` library directly rather than ``transformers``: the ids are the
same (transformers' fast tokenizers call this backend), and a spawned worker then starts in a
fraction of a second instead of importing transformers and torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kfm.tokenizer.core import TOKENIZER_FILE

# Per-process state, set once by init_worker.
_TOKENIZER: Any = None
_BOS_ID = -1
_EOS_ID = -1


def init_worker(tokenizer_dir: str, bos_id: int, eos_id: int, threads: bool = True) -> None:
    """Load ``tokenizer_dir/tokenizer.json`` into this process for `encode_batch`.

    Args:
        threads: let tokenizers use its own thread pool; False when several worker processes
            already use every core (threads on top of processes only oversubscribe).
    """
    global _TOKENIZER, _BOS_ID, _EOS_ID
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at first use of the thread pool
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(os.path.join(tokenizer_dir, TOKENIZER_FILE))
    _BOS_ID, _EOS_ID = bos_id, eos_id


def encode_batch(texts: list[str]) -> list[np.ndarray]:
    """``[bos] + ids + [eos]`` for each text, as uint32 arrays; needs `init_worker` first.

    Raises:
        RuntimeError: init_worker was not called in this process.
    """
    if _TOKENIZER is None:
        raise RuntimeError("encode_batch: call init_worker(tokenizer_dir, bos_id, eos_id) first")
    out = []
    for enc in _TOKENIZER.encode_batch(texts, add_special_tokens=True):
        ids = enc.ids
        # A tokenizer whose post-processor adds no bos (GPT-2 style) gets it here, so every
        # stored document has the same layout.
        if not ids or ids[0] != _BOS_ID:
            ids = [_BOS_ID, *ids]
        ids.append(_EOS_ID)
        out.append(np.asarray(ids, dtype=np.uint32))
    return out
