"""The training data loader: a deterministic, resumable, rank-sharded mixture of packed shard sets.

Semantics:

- Windows. Each source's split is one continuous token stream (`ShardSet`) cut into
  non-overlapping windows of ``seq_len + 1`` tokens: window k is tokens
  ``[k * (seq_len + 1), (k + 1) * (seq_len + 1))``; the trailing partial window is dropped.
  A sample is ``tokens = window[:-1]``, ``labels = window[1:]``, and ``doc_ids`` = the document
  index of each input position, relabelled to start at 0 in every row (so it is non-decreasing and
  a change marks a document boundary, for document-masked attention).
- Mixture. Global sample i = 0, 1, 2, ... goes to a source drawn with probabilities proportional
  to the weights, in blocks of 4096: block b's draw is
  ``np.random.default_rng([seed, 0, b]).choice(n_sources, 4096, p=weights)``, so the source of
  sample i is a pure function of (seed, i, weights).
- Order within a source. The j-th sample drawn from source s is window ``perm_{s,e}[j mod n_s]``
  with epoch ``e = j // n_s``, n_s the source's window count and ``perm_{s,e}`` a shuffle seeded by
  ``[seed, 1, s, e]``: every epoch visits each window exactly once, in a fresh order, and finding
  the window of any j costs one permutation, never a re-read.
- Ranks. Each step consumes ``micro_batch_size * world_size`` consecutive global samples; rank r
  takes the r-th contiguous slice of ``micro_batch_size``. The global stream does not depend on
  world_size, so a state saved at one world size resumes at another.
- State. ``state_dict()`` holds the global samples consumed and the per-source counts (plus the
  seed, seq_len, source names and weights it is only valid for). Resuming costs one mixture block
  and one permutation per source, and reads no tokens.

Costs: a source's permutation is n_s int32 (4 bytes per window: 2e9 tokens at seq_len 2048 is
~4 MB) and is rebuilt once per epoch of that source.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kfm.config import DataSourceConfig
from kfm.data.shards import ShardError, ShardSet

MIX_BLOCK = 4096
"""Samples per mixture draw; part of the stream's definition, so changing it changes every run."""

STATE_VERSION = 1

# Seed-sequence tags keep the mixture draw and the per-source shuffles independent streams.
_MIX_TAG = 0
_PERM_TAG = 1


@dataclass
class Batch:
    """One micro-batch of packed sequences.

    Attributes:
        tokens: (B, T) int64 inputs.
        labels: (B, T) int64 targets, the next token of each input.
        doc_ids: (B, T) int64 document index of each input position, 0 at the start of each row and
            non-decreasing along it.
        source_ids: (B,) int64 index into data.sources of each row's source (validation batches,
            for bits per byte per source), or None.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    source_ids: torch.Tensor | None = None


def _window(shards: ShardSet, window: int, seq_len: int) -> tuple[np.ndarray, ...]:
    """(tokens, labels, doc_ids) of one window, each (seq_len,) int64."""
    n = seq_len + 1
    toks = shards.read(window * n, n)
    docs = shards.doc_index(window * n, seq_len)
    return toks[:-1], toks[1:], docs - docs[0]


def _stack(rows: list[tuple[np.ndarray, ...]], source_ids: list[int] | None = None) -> Batch:
    tokens, labels, docs = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
    ids = None if source_ids is None else torch.tensor(source_ids, dtype=torch.int64)
    return Batch(tokens=tokens, labels=labels, doc_ids=docs, source_ids=ids)


def _open_sources(
    sources: list[DataSourceConfig], split: str, seq_len: int, verify: str
) -> list[ShardSet]:
    """Open every source's split; check names are unique and tokenizers agree."""
    if not sources:
        raise ValueError("no data sources: set data.sources to at least one `kfm pack` directory")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1 (set --data.seq_len)")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"data.sources names must be unique; repeated: {dupes}")
    sets = [ShardSet.open(s.path, split, verify=verify) for s in sources]
    for src, ss in zip(sources[1:], sets[1:], strict=True):
        if ss.tokenizer_hash != sets[0].tokenizer_hash:
            raise ShardError(
                f"sources {sources[0].name!r} ({sources[0].path}) and {src.name!r} ({src.path}) "
                f"were packed with different tokenizers (tokenizer_hash {sets[0].tokenizer_hash} "
                f"vs {ss.tokenizer_hash}); re-pack them with the same tokenizer"
            )
    return sets


class PackedLoader:
    """Infinite, deterministic, resumable micro-batches from a weighted mixture of shard sets.

    See the module docstring for the exact sample order. Every rank builds its own loader with the
    same arguments except ``rank``; they all track the same global stream and read only their own
    slice of it.
    """

    def __init__(
        self,
        sources: list[DataSourceConfig],
        *,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        verify: str = "spread",
    ) -> None:
        """Open the sources' ``split`` and position the loader at the first sample.

        Args:
            sources: shard sets to mix (name, path, weight).
            seq_len: tokens per sequence T; each sample reads T + 1 tokens.
            micro_batch_size: sequences per rank per step B.
            seed: non-negative seed of the mixture draw and the shuffles.
            split: split of every source to read.
            rank, world_size: this process's slice of each global step.
            verify: "size", "spread" or "sha256" (the ``data.verify`` setting). "spread" opens
                like "size" here (manifest, file sizes, first and last .idx offsets; no data
                read): its hashing part, each file hashed by one rank, is
                `kfm.data.verify.verify_shard_sets`, which the trainer runs. "sha256" hashes
                every file of every source on this rank (slow at scale).

        Raises:
            ShardError: a source is not a valid shard set, has no full window of seq_len + 1
                tokens, or the sources' tokenizers differ.
            ValueError: bad sizes, rank, seed or weights.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (set --data.seed)")
        weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        if sources and (not np.all(np.isfinite(weights)) or np.any(weights < 0)):
            raise ValueError(f"data.sources weights {weights.tolist()} must be finite and >= 0")
        if sources and weights.sum() <= 0:
            raise ValueError("data.sources weights sum to 0; give at least one source weight > 0")
        self._sets = _open_sources(sources, split, seq_len, verify)
        self.sources = list(sources)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self._weights = [float(s.weight) for s in sources]
        self._probs = weights / weights.sum()
        self._n_windows = [ss.n_tokens // (seq_len + 1) for ss in self._sets]
        for src, ss, n in zip(sources, self._sets, self._n_windows, strict=True):
            if n == 0 and src.weight > 0:
                raise ShardError(
                    f"{ss.path}: source {src.name!r} split {split!r} has {ss.n_tokens} tokens, "
                    f"fewer than seq_len + 1 = {seq_len + 1}; pack more data, lower "
                    "--data.seq_len, or set its weight to 0"
                )
        self._consumed = 0
        self._per_source = np.zeros(len(sources), dtype=np.int64)
        self._block = -1
        self._block_src = np.empty(0, dtype=np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def tokenizer_hash(self) -> str:
        """sha256 of the tokenizer.json every source was packed with."""
        return self._sets[0].tokenizer_hash

    @property
    def manifests(self) -> dict[str, dict]:
        """Each source's shard-set manifest, as checked when the loader opened it, by name."""
        return {src.name: ss.manifest for src, ss in zip(self.sources, self._sets, strict=True)}

    @property
    def vocab_size(self) -> int:
        """Largest vocab_size over the sources' manifests."""
        return max(ss.vocab_size for ss in self._sets)

    @property
    def samples_consumed(self) -> int:
        """Global samples consumed so far, over all ranks."""
        return self._consumed

    def _block_sources(self, block: int) -> np.ndarray:
        if block != self._block:
            rng = np.random.default_rng([self.seed, _MIX_TAG, block])
            self._block_src = rng.choice(len(self._sets), size=MIX_BLOCK, p=self._probs)
            self._block = block
        return self._block_src

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            n = self._n_windows[source]
            perm = np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64)
            np.random.default_rng([self.seed, _PERM_TAG, source, epoch]).shuffle(perm)
            self._perms[source] = (epoch, perm)
            cached = self._perms[source]
        return cached[1]

    def _advance(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Consume the next ``count`` global samples; return each one's source and within-source j."""
        srcs = np.empty(count, dtype=np.int64)
        js = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            block, offset = divmod(self._consumed, MIX_BLOCK)
            take = min(count - done, MIX_BLOCK - offset)
            chunk = self._block_sources(block)[offset : offset + take]
            for s in range(len(self._sets)):
                hit = chunk == s
                n_hit = int(hit.sum())
                js[done : done + take][hit] = self._per_source[s] + np.arange(n_hit)
                self._per_source[s] += n_hit
            srcs[done : done + take] = chunk
            self._consumed += take
            done += take
        return srcs, js

    def next_batch(self) -> Batch:
        """The next (micro_batch_size, seq_len) batch of this rank; advances the global stream."""
        b = self.micro_batch_size
        srcs, js = self._advance(b * self.world_size)
        mine = slice(self.rank * b, (self.rank + 1) * b)
        rows = []
        for s, j in zip(srcs[mine].tolist(), js[mine].tolist(), strict=True):
            epoch, k = divmod(j, self._n_windows[s])
            rows.append(_window(self._sets[s], int(self._perm(s, epoch)[k]), self.seq_len))
        return _stack(rows)

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches forever; epochs of each source reshuffle."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable position in the global stream (same on every rank)."""
        return {
            "version": STATE_VERSION,
            "samples_consumed": self._consumed,
            "per_source_consumed": self._per_source.tolist(),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": [s.name for s in self.sources],
            "weights": list(self._weights),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the next batch is the one an uninterrupted run would give.

        A state saved at any world_size can be loaded: samples_consumed counts global samples.

        Raises:
            ValueError: the state is malformed, or its seed, seq_len, source names or weights differ
                from this loader's (changing the mixture mid-run needs a fresh loader state).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"loader state version {got!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "sources", "weights"):
            if key not in state:
                raise ValueError(f"loader state lacks {key!r}")
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this run has {key}={mine[key]!r}; "
                    "the data order is only defined for the settings it was saved with. To change "
                    "the mixture or seq_len mid-run, start from a fresh loader state"
                )
        consumed = state.get("samples_consumed")
        per_source = state.get("per_source_consumed")
        if (
            not isinstance(consumed, int)
            or consumed < 0
            or not isinstance(per_source, list)
            or len(per_source) != len(self._sets)
            or sum(per_source) != consumed
        ):
            raise ValueError(
                f"loader state is inconsistent: samples_consumed={consumed!r}, "
                f"per_source_consumed={per_source!r} (must be {len(self._sets)} counts summing to "
                "samples_consumed)"
            )
        # Per-source counts at the start of the current block = saved counts minus the samples of
        # the block already consumed; one block draw, O(1) in the run length.
        block, offset = divmod(consumed, MIX_BLOCK)
        head = np.bincount(self._block_sources(block)[:offset], minlength=len(self._sets))
        at_block_start = np.asarray(per_source, dtype=np.int64) - head
        if np.any(at_block_start < 0):
            raise ValueError(
                f"loader state per_source_consumed={per_source} does not match the mixture draw "
                f"of seed={self.seed} at samples_consumed={consumed}; the state is corrupt"
            )
        self._consumed = consumed
        self._per_source = np.asarray(per_source, dtype=np.int64)


def validation_batches(
    sources: list[DataSourceConfig],
    *,
    seq_len: int,
    micro_batch_size: int,
    n_batches: int,
    verify: str = "spread",
) -> list[Batch]:
    """The fixed validation set: the first ``n_batches * micro_batch_size`` windows of the sources'
    "val" splits, unshuffled, round-robin over sources (window 0 of each source, then window 1...).

    A source that runs out of windows drops out of the round-robin; the set never wraps, so it can
    hold fewer windows than asked, and the last batch can then be smaller than micro_batch_size.
    Every call returns the same batches. Weights are ignored: each source counts equally. Each
    batch's ``source_ids`` names the source of every row (index into ``sources``).
    ``verify`` is as in `PackedLoader`: "spread" opens like "size" (the trainer hashes the files
    with `kfm.data.verify.verify_shard_sets`), "sha256" hashes every val file here.

    Raises:
        ShardError: a source has no "val" split, no source has a full window of seq_len + 1 val
            tokens, or the sources' tokenizers differ. Sources with too few val tokens are
            skipped with a warning while at least one other source has some.
        ValueError: bad sizes.
    """
    if micro_batch_size < 1 or n_batches < 0:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must be >= 1 and n_batches={n_batches} >= 0"
        )
    sets = _open_sources(sources, "val", seq_len, verify)
    n_windows = [ss.n_tokens // (seq_len + 1) for ss in sets]
    short = [
        f"{src.name!r} ({ss.n_tokens} val tokens, {ss.path})"
        for src, ss, n in zip(sources, sets, n_windows, strict=True)
        if n == 0
    ]
    if len(short) == len(sets):
        raise ShardError(
            f"no source has a full validation window of seq_len + 1 = {seq_len + 1} tokens: "
            f"{', '.join(short)}; re-run `kfm pack` with a larger --val-fraction or lower "
            "--data.seq_len"
        )
    if short:
        # Small sources (a handful of long articles) often get no held-out document; validating
        # on the others is more useful than refusing to train. Said once, at start-up.
        warnings.warn(
            f"validation skips sources without a full val window: {', '.join(short)}",
            stacklevel=2,
        )
    want = n_batches * micro_batch_size
    order: list[tuple[int, int]] = []
    k = 0
    while len(order) < want and k < max(n_windows):
        order.extend((s, k) for s in range(len(sets)) if k < n_windows[s])
        k += 1
    order = order[:want]
    rows = [_window(sets[s], k, seq_len) for s, k in order]
    srcs = [s for s, _ in order]
    return [
        _stack(rows[i : i + micro_batch_size], srcs[i : i + micro_batch_size])
        for i in range(0, len(rows), micro_batch_size)
    ]
