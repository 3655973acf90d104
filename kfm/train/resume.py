"""Resume: what a checkpoint records about the data it was trained on, and what may change.

Every checkpoint's ``manifest.json`` carries, besides the run's config:

- ``tokenizer_hash``: `kfm.tokenizer.tokenizer_hash` of ``tokenizer.path`` (``kfm eval`` and
  ``kfm export`` check it, as training checks the shards' hash);
- ``data_fingerprint``: ``{source name: fingerprint of its shard set}`` (`shard_set_fingerprint`),
  so that shards re-packed with other content under the same path are noticed at resume.

`resume` compares the run's config with the checkpoint's, key by key (`config_changes`), and
lists every difference in the log. Each one is classified (`classify`):

- ``applies``: logging, eval, checkpoint, health, debug, guard settings, the parallel layout
  (DCP reshards), batch sizes, ``train.steps`` upwards...;
- ``schedule``: ``optim.*`` and ``schedule.*`` and ``train.steps``: the optimizer and the
  schedule follow the new config from the resume step (`kfm.train.optim.apply_optim_config`):
  the way to start a cooldown or change the learning rate;
- ``refused``: what the checkpoint or the data order cannot follow: ``model.*`` (except the
  attention kernel), ``data.seq_len``, ``data.seed``, the sources' names and weights,
  ``train.seed``, ``parallel.backend`` (and the ZeRO stage under DeepSpeed), another tokenizer,
  and shards whose content changed under the same path. Refused unless
  ``checkpoint.force_resume``.

A checkpoint at or past ``train.steps`` leaves nothing to do (`NothingToDo`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kfm.checkpoint import (
    agree_on_checkpoint,
    read_manifest,
    resolve_checkpoint_arg,
    resume_candidates,
)
from kfm.checkpoint.stepdir import MANIFEST
from kfm.config import Config, ConfigError, to_dict
from kfm.data import PackedLoader
from kfm.train.backends import Backend
from kfm.train.dist import WorldInfo, broadcast_from_rank0

Kind = Literal["applies", "schedule", "refused"]


def shard_set_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over what defines a shard set's content: its tokenizer hash, vocab size and, per
    split, every file's name and sha256, from its checked ``manifest.json`` (no shard is read).

    Re-packing the same documents with the same tokenizer gives the same fingerprint (the
    manifest's creation time is left out); any changed token changes it.
    """
    content = {
        "tokenizer_hash": manifest["tokenizer_hash"],
        "vocab_size": manifest["vocab_size"],
        "splits": {
            split: [[f["bin"], f["sha256_bin"], f["idx"], f["sha256_idx"]] for f in entry["files"]]
            for split, entry in sorted(manifest["splits"].items())
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def manifest_identity(loader: PackedLoader) -> dict[str, Any]:
    """The keys training adds to every checkpoint manifest: ``tokenizer_hash`` and
    ``data_fingerprint`` (``{source name: shard_set_fingerprint}``), from the manifests the loader
    already opened."""
    return {
        "tokenizer_hash": loader.tokenizer_hash,
        "data_fingerprint": {
            name: shard_set_fingerprint(m) for name, m in loader.manifests.items()
        },
    }


# -- what changed since the checkpoint -----------------------------------------------------------

_SCHEDULE = ("optim.", "schedule.", "train.steps")
_REFUSED_WHY = {
    "model.": "the checkpoint's weights have this architecture",
    "data.seq_len": "the data order depends on it",
    "data.seed": "the data order depends on it",
    "data.sources": "the data order depends on the sources and their weights",
    "train.seed": "the RNG states come from the checkpoint",
    "parallel.backend": "FSDP and DeepSpeed checkpoints have different files",
    "optim.name": "the checkpoint's optimizer state is the other optimizer's",
}
_APPLIES_ANYWAY = ("model.attn_backend", "optim.impl")
"""Keys under a refused or schedule prefix that only choose a kernel."""


@dataclass
class Change:
    """One config key that differs from the checkpoint's."""

    key: str
    old: Any
    new: Any
    kind: Kind
    why: str = ""

    def describe(self) -> str:
        note = {
            "applies": "applies",
            "schedule": "applies from the resume step",
            "refused": f"cannot change mid-run: {self.why}",
        }[self.kind]
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)} ({note})"


_ABSENT = "<absent>"


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if prefix == "data.sources" and isinstance(value, list):
        # By name, so a reordered or re-pathed source reads as one key per field.
        value = {str(s.get("name")): s for s in value if isinstance(s, dict)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def classify(key: str, *, backend: str) -> tuple[Kind, str]:
    """(kind, why refused) of a change of config key ``key`` (dotted)."""
    if key in _APPLIES_ANYWAY:
        return "applies", ""
    if key.startswith("data.sources.") and key.endswith(".path"):
        return "applies", ""  # a moved shard set; its content is compared by fingerprint
    if key.startswith("data.sources.") and key.endswith(".language"):
        return "applies", ""  # labels validation metrics only
    if key == "parallel.zero_stage":
        return (
            ("refused", "ZeRO shards are per stage") if backend == "deepspeed" else ("applies", "")
        )
    for prefix, why in _REFUSED_WHY.items():
        if key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + "."):
            return "refused", why
    if key.startswith(_SCHEDULE):
        return "schedule", ""
    return "applies", ""


def config_changes(saved: dict[str, Any], cfg: Config) -> list[Change]:
    """Every key whose value in ``cfg`` differs from the checkpoint's config ``saved``, sorted."""
    current = json.loads(json.dumps(to_dict(cfg)))  # as the manifest stored it
    old, new = _flatten(saved, ""), _flatten(current, "")
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            kind, why = classify(key, backend=cfg.parallel.backend)
            if a == _ABSENT and not key.startswith("data.sources."):
                kind, why = "applies", ""  # a key added to kfm since: its default keeps behaviour
            changes.append(Change(key, a, b, kind, why))
    return changes


def identity_changes(manifest: dict[str, Any], identity: dict[str, Any]) -> list[Change]:
    """A different tokenizer, or shards with other content under a source's name (checkpoints
    written before these keys existed are not compared)."""
    changes = []
    saved_hash = manifest.get("tokenizer_hash")
    if saved_hash is not None and saved_hash != identity["tokenizer_hash"]:
        changes.append(
            Change(
                "tokenizer (tokenizer.json sha256)",
                saved_hash[:12],
                identity["tokenizer_hash"][:12],
                "refused",
                "the checkpoint's embeddings belong to its tokenizer",
            )
        )
    saved_data = manifest.get("data_fingerprint") or {}
    for name, now in identity["data_fingerprint"].items():
        was = saved_data.get(name)
        if was is not None and was != now:
            changes.append(
                Change(
                    f"data.sources.{name} (shard content)",
                    was[:12],
                    now[:12],
                    "refused",
                    "its shards were re-packed with other content under the same path",
                )
            )
    return changes


# -- resuming ------------------------------------------------------------------------------------


class NothingToDo(Exception):
    """The checkpoint is already at or past ``train.steps``."""


@dataclass
class Resumed:
    """Where a run starts, and what the log should say about it."""

    step: int = 0
    path: Path | None = None
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def log_lines(self) -> list[str]:
        if self.path is None:
            return self.notes  # a fresh start (checkpoint.init_from says where it started from)
        lines = [f"resumed from {self.path} at step {self.step}"]
        if self.changes:
            lines.append(f"config changes since the checkpoint ({len(self.changes)}):")
            lines += [f"  {c.describe()}" for c in self.changes]
        return lines + self.notes


def find_checkpoint(cfg: Config, world: WorldInfo) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names (auto: this run's newest valid one), agreed on
    by every rank, or None for a fresh start.

    Rank 0 lists the candidates; every rank checks its share of their hashes
    (`kfm.checkpoint.agree_on_checkpoint`), so no rank reads the whole checkpoint.

    Raises:
        ConfigError: an explicit ``checkpoint.resume`` path that is not a valid checkpoint.
    """
    if cfg.checkpoint.resume == "never":
        return None
    arg = cfg.checkpoint.resume
    if arg == "auto":
        root: Path | None = Path(cfg.train.run_root) / cfg.train.name / "checkpoints"
    elif (Path(arg) / MANIFEST).is_file() or Path(arg).name == "latest":
        root = None  # one named step dir
    else:  # a run dir or a checkpoints dir: its newest valid checkpoint
        root = Path(arg) / "checkpoints" if (Path(arg) / "checkpoints").is_dir() else Path(arg)
    if root is None:
        candidates = [resolve_checkpoint_arg(arg)]
    else:
        candidates = broadcast_from_rank0(resume_candidates(root) if world.rank == 0 else None)
    path = agree_on_checkpoint(candidates, verify_hashes=cfg.checkpoint.verify == "sha256")
    if path is None and arg != "auto":
        raise ConfigError(
            f"checkpoint.resume={arg} is not a valid checkpoint (see the warning above): pass "
            "another step dir or --checkpoint.resume=never"
        )
    return path


def resume(
    cfg: Config,
    backend: Backend,
    loader: PackedLoader,
    world: WorldInfo,
    identity: dict[str, Any],
) -> Resumed:
    """Load the checkpoint `find_checkpoint` picks into the backend and the loader, after
    comparing its config and data with this run's (``identity``: `manifest_identity`).

    Raises:
        NothingToDo: the checkpoint's step is >= ``train.steps`` (nothing is loaded).
        ConfigError: refused changes (each listed, old -> new), unless
            ``checkpoint.force_resume``.
    """
    path = find_checkpoint(cfg, world)
    if path is None:
        return Resumed()
    manifest = read_manifest(path)
    if not manifest.get("has_optimizer", True):
        raise ConfigError(
            f"{path} holds model weights only (e.g. a `kfm import-hf` folder), nothing to resume: "
            f"start a new run from it with --checkpoint.init_from={path}"
        )
    step = int(manifest["step"])
    if step >= cfg.train.steps:
        raise NothingToDo(
            f"nothing to do: the checkpoint {path} is at step {step} >= train.steps="
            f"{cfg.train.steps} (raise --train.steps to train further)"
        )
    changes = config_changes(manifest.get("config", {}), cfg) + identity_changes(manifest, identity)
    refused = [c for c in changes if c.kind == "refused"]
    if refused and not cfg.checkpoint.force_resume:
        lines = "\n".join(f"  {c.describe()}" for c in refused)
        raise ConfigError(
            f"cannot resume {path}: {len(refused)} change(s) from its config or data cannot "
            f"apply mid-run:\n{lines}\nUse the checkpoint's values, start a new run "
            "(another --train.name, or --checkpoint.resume=never), or pass "
            "--checkpoint.force_resume=true to resume anyway"
        )
    resumed = Resumed(step=step, path=path, changes=changes)
    if refused:
        resumed.notes.append(
            f"checkpoint.force_resume=true: resuming despite {len(refused)} refused change(s)"
        )
    state = backend.load(path)  # RNG states restored by the backend
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as e:
        if not cfg.checkpoint.force_resume:
            raise
        # Forced past a change of the data order: the saved position means nothing in it.
        resumed.notes.append(f"the data order restarts from its first sample ({e})")
    saved_numpy = state.get("numpy_version")
    if saved_numpy and saved_numpy != np.__version__:
        # The sample order comes from numpy's default_rng, which numpy does not promise to keep
        # across versions: the run continues, but the data order may differ.
        warnings.warn(
            f"{path} was saved with numpy {saved_numpy}, this is {np.__version__}: the data "
            "order after resume may differ from an uninterrupted run",
            stacklevel=1,
        )
    resumed.step = int(state["step"])
    return resumed
