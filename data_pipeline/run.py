"""`kfm data run`: load a pipeline config, plan its stages, run them on the chosen executor."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from data_pipeline.card import CARD_NAME, CONFIG_NAME
from data_pipeline.config import PipelineConfig, config_to_dict, load_pipeline_config
from data_pipeline.report import STATS_NAME, load_report
from kfm.config.loader import ConfigError
from kfm.fs import atomic_write_text, check_output_dir, fsync_dir

_RERUN_FREE = ("executor",)
"""Sections that may change between a run and its rerun (they do not change the output)."""


def _identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RERUN_FREE}


def _input_paths(cfg: PipelineConfig) -> list[str]:
    """The local files and folders the run reads (globs expanded), for the output checks."""
    paths: list[str] = []
    for item in cfg.inputs:
        for spec in item.paths:
            paths += sorted(glob.glob(spec, recursive=True)) if set("*?[") & set(spec) else [spec]
    return paths


def _check_outputs(cfg: PipelineConfig) -> Path:
    """Refuse an output_dir (or trained tokenizer path) that holds anything but this pipeline's
    own earlier output, or is, contains or lies inside an input, a checkpoint or a training run
    (kfm.fs.check_output_dir). Returns output_dir with symlinks resolved."""
    inputs = _input_paths(cfg)
    # overwrite=True: an earlier data run there is fine here; run_pipeline decides between
    # resuming it and (with --overwrite) replacing it.
    out = check_output_dir(cfg.out, "data run", inputs=inputs, overwrite=True, flag="output_dir")
    if cfg.pack.train_tokenizer:
        work = out / "work"  # the tokenizer is trained on the curated documents in there
        check_output_dir(
            cfg.pack.tokenizer,
            "tokenizer",
            inputs=[*inputs, work],
            overwrite=True,
            flag="pack.tokenizer",
        )
    return out


def _replaced_path(out: Path) -> Path:
    """Where --overwrite keeps the previous output until the new run completes."""
    return out.with_name(f".{out.name}.replaced")


def _move_aside(out: Path) -> Path:
    """Move the previous output of ``out`` to :func:`_replaced_path` (one rename, nothing deleted
    but an unfinished replacement); returns that path."""
    kept = _replaced_path(out)
    if kept.exists():
        # An earlier --overwrite whose new run has not completed here: `kept` holds the last
        # complete output. If `out` did complete since (a Slurm run), it becomes the one to keep;
        # if not, `out` is that unfinished run, started over now.
        if (out / STATS_NAME).is_file():
            shutil.rmtree(kept)
            os.replace(out, kept)
        else:
            shutil.rmtree(out)
    else:
        os.replace(out, kept)
    fsync_dir(out.parent)
    return kept


def _drop_replaced(out: Path) -> None:
    """Remove the output an --overwrite moved aside, once the new one has its stats.json."""
    kept = _replaced_path(out)
    if kept.exists() and (out / STATS_NAME).is_file():
        shutil.rmtree(kept)


def run_pipeline(
    config_path: str | Path,
    overrides: list[str] | None = None,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
) -> int:
    """Run (or with ``dry_run`` only plan) the pipeline of ``config_path``; returns an exit code.

    A rerun with the same config resumes: datatrove skips every task whose completion marker
    exists under ``<output_dir>/logs/<stage>/completions``. A rerun with a different config
    (ignoring ``executor``) is refused unless ``overwrite``, because completed tasks of the old
    config would otherwise be mixed with new ones. ``overwrite`` moves the old output aside to
    ``.<output_dir name>.replaced`` and removes it only once the new run has written its
    stats.json (here for the local executor; for Slurm at the next ``kfm data run`` that finds
    it); a new run that fails leaves it there, and its rerun resumes as usual.

    Raises:
        ConfigError: bad config, or an output folder holding a run of another config.
        OutputError: output_dir (or a trained pack.tokenizer) holds something that is not this
            pipeline's output, or is, contains or lies inside an input, a checkpoint or a run.
    """
    from data_pipeline.executor import plan_text, run_stages
    from data_pipeline.plan import build_stages, work_dirs

    cfg = load_pipeline_config(config_path, overrides)
    if executor is not None:
        cfg.executor.kind = executor  # type: ignore[assignment]
    config = config_to_dict(cfg)
    target = _check_outputs(cfg)  # output_dir, symlinks resolved: what is moved aside
    stages = build_stages(cfg)
    logs = work_dirs(cfg)["logs"]
    if dry_run:
        print(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        run_stages(stages, cfg.executor, logging_dir=logs, dry_run=True)
        print(plan_text(stages, cfg.executor, logs))
        return 0

    out = cfg.out
    saved = out / CONFIG_NAME
    previous_output = _replaced_path(target)
    if overwrite and target.is_dir() and any(target.iterdir()):
        _move_aside(target)
    elif saved.is_file():
        previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
        if _identity(previous) != _identity(config):
            raise ConfigError(
                f"{out} holds a run of a different config ({saved}); finishing it with this "
                "config would mix outputs. Use a new output_dir, or pass --overwrite to replace "
                "it (the old output is kept aside until the new run completes)"
            )
        _drop_replaced(target)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    try:
        run_stages(stages, cfg.executor, logging_dir=logs)
    except BaseException:
        if previous_output.exists():
            print(
                f"kfm data run: the previous output of {out} is kept at {previous_output}; rerun this "
                "command without --overwrite to finish the new run (which then removes it)",
                file=sys.stderr,
            )
        raise
    if cfg.executor.kind != "local":
        print(f"submitted; when the report stage finishes, see {out / CARD_NAME}")
        if previous_output.exists():
            print(
                f"the previous output is kept at {previous_output} until a `kfm data run` of this config "
                "finds the new one complete (stats.json), or delete it yourself"
            )
        return 0
    _drop_replaced(target)
    report = load_report(out)
    kept = sum(r.get("pack_docs", 0) for r in report["sources"].values())
    tokens = sum(r.get("pack_tokens", 0) for r in report["sources"].values())
    read = sum(r.get("input_docs", 0) for r in report["sources"].values())
    train_line = (
        f"\n  train: kfm train {out / 'train.yaml'}" if cfg.card.train_preset is not None else ""
    )
    print(
        f"kfm data run {cfg.name}: {read:,} documents read, {kept:,} kept, {tokens:,} tokens in "
        f"{out / 'shards'}\n  stats: {out / STATS_NAME}\n  card:  {out / CARD_NAME}{train_line}",
        file=sys.stdout,
    )
    if cfg.pack.train_tokenizer:
        _print_tokenizer(cfg.pack.tokenizer)
    return 0 if report["reconciled"] else 1


def _print_tokenizer(path: str) -> None:
    """One line on the tokenizer trained by the run: size and fertility per language."""
    meta = json.loads((Path(path) / "kfm_tokenizer.json").read_text(encoding="utf-8"))
    fert = meta.get("fertility") or {}
    print(
        f"  tokenizer {path}: {meta.get('vocab_size')} tokens; fertility (characters per token) "
        + ", ".join(f"{lang} {v:.2f}" for lang, v in fert.items() if v is not None)
    )
