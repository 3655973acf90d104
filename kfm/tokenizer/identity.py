"""Is a tokenizer the one a checkpoint was trained with, and the one its shards were packed with?

A tokenizer is identified by `tokenizer_hash` (sha256 of its tokenizer.json). Shard sets record
the hash they were packed with in their manifest.json; checkpoints record the training run's in
their manifest.json (top-level ``tokenizer_hash``). `kfm eval` and `kfm export` take a
checkpoint and optionally another tokenizer (``--tokenizer``) or other shards (``--data``); with
the wrong one the loss is meaningless and the export decodes to the wrong text, so both check
here before they compute or write anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kfm.checkpoint.stepdir import MANIFEST, read_manifest
from kfm.config import Config
from kfm.data.shards import MANIFEST_NAME, ShardError, load_manifest
from kfm.tokenizer.core import load_tokenizer, tokenizer_file, tokenizer_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class TokenizerMismatchError(ValueError):
    """A tokenizer does not belong with a checkpoint or shard set; the message names both hashes'
    files and the fix."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerCheck:
    """What `check_tokenizer_identity` compared, for the caller to report."""

    tokenizer: PreTrainedTokenizerFast
    """The tokenizer, loaded."""
    tokenizer_hash: str
    """sha256 of its tokenizer.json."""
    checkpoint_source: str | None
    """The file the checkpoint's tokenizer hash was read from; None if it records none."""
    shard_sets: tuple[str, ...]
    """Shard sets whose manifests matched the tokenizer."""

    @property
    def unchecked(self) -> str | None:
        """Why identity against the checkpoint could not be checked, or None if it was."""
        if self.checkpoint_source is not None:
            return None
        return (
            "the checkpoint records no tokenizer_hash (saved by an older kfm) and the run's "
            "shard sets (data.sources) are gone: cannot check that the tokenizer is the one it "
            "was trained with"
        )


def _short(h: str) -> str:
    return h[:12]


def training_fit_problem(
    path: str | Path, n_tokens: int, digest: str, *, vocab_size: int, shard_hashes: dict[str, str]
) -> str | None:
    """Why the tokenizer at ``path`` (``n_tokens`` tokens, hash ``digest``) cannot train a model
    of ``vocab_size`` rows on shard sets that record ``shard_hashes`` ({source: tokenizer hash}),
    naming the fix; None when it can. `kfm train` raises it, `kfm train --dry-run` reports it."""
    if n_tokens > vocab_size:
        return (
            f"tokenizer {path} has {n_tokens} tokens but model.vocab_size={vocab_size} (set "
            f"--model.vocab_size to at least {n_tokens})"
        )
    other = sorted(name for name, h in shard_hashes.items() if h != digest)
    if other:
        return (
            f"tokenizer.path={path} is not the tokenizer the shards of {', '.join(other)} were "
            "packed with: re-run `kfm pack` with it or point --tokenizer.path at the one used for "
            "packing"
        )
    return None


def checkpoint_tokenizer_hash(checkpoint: str | Path, config: Config) -> tuple[str, str] | None:
    """The hash of the tokenizer ``checkpoint`` (a step dir) was trained with, and its file.

    From the checkpoint's manifest.json; for checkpoints saved before it recorded one, from the
    manifest of the first of the run's own shard sets (``config.data.sources``) that still
    exists (training refuses shards of another tokenizer, so theirs is the run's, unless they
    were re-packed since). None when neither is available.

    Raises:
        CheckpointError: the checkpoint's manifest is missing or invalid.
    """
    path = Path(checkpoint)
    recorded = read_manifest(path).get("tokenizer_hash")
    if isinstance(recorded, str) and recorded:
        return recorded, str(path / MANIFEST)
    for source in config.data.sources:
        try:
            return str(load_manifest(source.path)["tokenizer_hash"]), str(
                Path(source.path) / MANIFEST_NAME
            )
        except ShardError:
            continue
    return None


def check_tokenizer_identity(
    tokenizer: str | Path,
    *,
    checkpoint: str | Path,
    config: Config,
    tokenizer_given: bool,
    shard_sets: Sequence[str | Path] = (),
    shards_given: bool = False,
) -> TokenizerCheck:
    """Check that ``tokenizer`` is the one ``checkpoint`` was trained with, that every shard set
    in ``shard_sets`` was packed with it, and that it fits ``config.model.vocab_size``.

    ``config`` is the checkpoint's config. ``tokenizer_given``: the tokenizer came from
    ``--tokenizer`` (else from the run's tokenizer.path); ``shards_given``: the shard sets came
    from ``--data`` (else from the run's data.sources). Both only choose the fix the message
    names. A checkpoint that records no hash, of a run whose shard sets are gone, cannot be
    checked: the result's ``unchecked`` says so and the caller must tell the user.

    Raises:
        TokenizerMismatchError: a hash or the size does not match; names both files and the fix.
        TokenizerNotFoundError: no tokenizer.json at ``tokenizer``.
        ShardError: a shard set has no valid manifest.
        CheckpointError: the checkpoint's manifest is missing or invalid.
    """
    tok_file = tokenizer_file(tokenizer)
    tok_hash = tokenizer_hash(tok_file)
    origin = f"--tokenizer {tokenizer}" if tokenizer_given else f"tokenizer.path={tokenizer}"
    run_tokenizer = config.tokenizer.path
    expected = checkpoint_tokenizer_hash(checkpoint, config)
    if expected is not None and expected[0] != tok_hash:
        want, source = expected
        fix = (
            f"pass the run's tokenizer (tokenizer.path={run_tokenizer}) or omit --tokenizer"
            if tokenizer_given
            else "it was replaced after training: pass the original with --tokenizer DIR"
        )
        raise TokenizerMismatchError(
            f"{origin} is not the tokenizer this checkpoint was trained with: {tok_file} has "
            f"tokenizer_hash {_short(tok_hash)}, {source} records {_short(want)}; {fix}"
        )
    checked = []
    for shard_set in shard_sets:
        manifest_path = Path(shard_set) / MANIFEST_NAME
        packed = str(load_manifest(shard_set)["tokenizer_hash"])
        if packed != tok_hash:
            fix = (
                f"re-pack it with `kfm pack ... --tokenizer {tokenizer}`, or evaluate on shards "
                "packed with it"
                if shards_given
                else f"it was re-packed after training: re-pack it with {tokenizer}, or pass "
                "--data with shards packed with it"
            )
            raise TokenizerMismatchError(
                f"shard set {shard_set} was packed with another tokenizer than {origin}: "
                f"{manifest_path} records tokenizer_hash {_short(packed)}, {tok_file} has "
                f"{_short(tok_hash)}; {fix}"
            )
        checked.append(str(shard_set))
    tok = load_tokenizer(tok_file.parent)
    if len(tok) > config.model.vocab_size:
        raise TokenizerMismatchError(
            f"{origin} has {len(tok)} tokens but this checkpoint's model.vocab_size="
            f"{config.model.vocab_size}: it cannot be the tokenizer the model was trained with; "
            f"pass the run's tokenizer (tokenizer.path={run_tokenizer})"
        )
    return TokenizerCheck(
        tokenizer=tok,
        tokenizer_hash=tok_hash,
        checkpoint_source=None if expected is None else expected[1],
        shard_sets=tuple(checked),
    )


def describe(check: TokenizerCheck, tokenizer: str | Path) -> str:
    """One line for the user: what the tokenizer was checked against, or why it was not."""
    if check.unchecked is not None:
        return f"warning: tokenizer {tokenizer} NOT checked: {check.unchecked}"
    against = str(check.checkpoint_source)
    if check.shard_sets:
        against += f" and {len(check.shard_sets)} shard set manifest(s)"
    return f"tokenizer {tokenizer} (hash {_short(check.tokenizer_hash)}) matches {against}"
