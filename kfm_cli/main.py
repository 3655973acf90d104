"""`kfm` command line: train, plan, doctor, tokenizer, pack, eval, export, report, release,
import-hf, data.

The CLI is the composition root: it may import every package (kfm, eval, data_pipeline), and
nothing imports it.
Heavy imports happen inside each command so that `kfm --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kfm.config import ConfigError
from kfm.console import NORMAL, QUIET, VERBOSE, set_verbosity, verbosity
from kfm_cli.errors import debug_requested, report
from kfm_cli.output import quiet_libraries

if TYPE_CHECKING:
    from kfm.config import Config
    from kfm.tokenizer.identity import TokenizerCheck

_GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet", "--debug")
_OVERRIDES_HELP = "Config overrides as dotted flags after the other options, e.g. --optim.lr=3e-4 --train.steps 200."


def _add_config_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "config", nargs=None if required else "?", help="YAML preset under configs/ (see README)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the parameter count, then exit",
    )
    if required:  # kfm train
        p.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="with --dry-run: plan the mesh, sharding and memory per rank for this many GPUs "
            "(no GPU needed), e.g. 256 for 32 nodes x 8",
        )


def _load(args: argparse.Namespace, overrides: list[str]):
    from kfm.config import load_config

    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = _load(args, overrides)
    if args.dry_run:
        return _dry_run(cfg, world_size=args.world_size)
    if args.world_size is not None:
        raise ConfigError(
            "--world-size plans a run with --dry-run; a real run takes its world "
            "size from torchrun (launch/local.sh)"
        )
    from kfm.train.trainer import train

    hook = None
    if cfg.eval.tasks and cfg.eval.interval > 0:  # in-loop benchmarks (eval/inloop.py)
        from eval.inloop import build_hook
        from kfm.tokenizer import load_tokenizer

        hook = build_hook(cfg, load_tokenizer(cfg.tokenizer.path))
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the run
    try:
        summary = train(cfg, benchmark_hook=hook)
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the loop started)
        if rank0:
            print(
                "kfm train: interrupted (Ctrl-C) without saving a checkpoint for the current "
                "step; rerun the same command to resume from the last saved one",
                file=sys.stderr,
            )
        return 130
    if not rank0:
        return 0
    if "nothing_to_do" in summary:
        print(summary["nothing_to_do"])
        return 0
    first, last = summary.get("first_eval"), summary.get("last_eval")
    if first and last and first is not last:
        print(
            f"validation bits/byte: {first['val_bpb']:.4f} (step 0) -> {last['val_bpb']:.4f} "
            f"(step {summary['steps_done']})"
        )
    print(f"run directory: {summary['run_dir']}")
    return 0


def _dry_run(cfg, *, world_size: int | None) -> int:
    import torch

    from kfm.config import dump_yaml
    from kfm.model.flops import flops_per_token
    from kfm.model.transformer import Transformer

    with torch.device("meta"):  # no memory is allocated for the weights
        model = Transformer(cfg.model)
    n = model.num_params()
    n_body = model.num_params(exclude_embeddings=True)
    print(dump_yaml(cfg), end="")
    print("---")
    print(f"parameters: {n:,} ({n_body:,} without embeddings)")
    from kfm.train.ramp import describe_ramp, samples_through

    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    total = samples_through(cfg.train.steps, cfg.train) * cfg.data.seq_len
    print(f"tokens per step: {tokens:,}; total tokens: {total:,}")
    if ramp := describe_ramp(cfg.train):
        print(ramp)
    print(f"training FLOPs per token: {flops_per_token(cfg.model, cfg.data.seq_len):.4g}")
    if cfg.parallel.backend == "deepspeed":
        from kfm.parallel.deepspeed import ds_config_yaml

        print(f"--- DeepSpeed config for {world_size or 1} rank(s), generated from this config")
        print(ds_config_yaml(cfg, world_size=world_size or 1), end="")
    if world_size is None:
        print(
            f"gradient accumulation: {cfg.train.global_batch_size // cfg.train.micro_batch_size} "
            "micro-batches per step (1 process); add --world-size N to plan a distributed run"
        )
    else:
        from kfm.plan.report import dry_run_report

        print(f"--- plan for world size {world_size}")
        print(dry_run_report(cfg, world_size))
    return _preflight(cfg)


def _preflight(cfg) -> int:
    """Print the pre-flight checks; 1 if any fails (the run would stop on it), else 0."""
    from kfm.train.preflight import preflight

    checks = preflight(cfg)
    print("--- pre-flight: data, tokenizer, run directory")
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(
            f"kfm train: dry run found {len(failed)} problem(s) training would stop on: "
            f"{', '.join(failed)} (see FAIL above)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = _load(args, overrides)
    from kfm.doctor import run_doctor

    return run_doctor(
        cfg, gpus_per_node=args.gpus_per_node, probe_mib=args.probe_mib, json_path=args.json
    )


def cmd_tokenizer(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = _load(args, overrides)
    if args.dry_run:
        from kfm.config import to_dict

        print(json.dumps(to_dict(cfg.tokenizer), indent=2))
        return 0
    from kfm.tokenizer import train_from_files
    from kfm.tokenizer.core import METADATA_FILE

    t = cfg.tokenizer
    inputs = list(t.inputs)
    if not inputs:
        raise ConfigError(
            "tokenizer.inputs is empty: list the text files to train on in the preset or pass "
            "--tokenizer.inputs='[data/sample/a.jsonl.gz, ...]'"
        )
    report = train_from_files(
        inputs,
        t.path,
        vocab_size=t.vocab_size,
        min_frequency=t.min_frequency,
        n_reserved=t.n_reserved,
        text_field=t.text_field,
        max_chars=t.max_chars,
        overwrite=args.overwrite,
    )
    fert = report.get("fertility", {})
    print(
        f"tokenizer {t.path}: {report['vocab_size']:,} tokens, trained on "
        f"{report['train_docs']:,} documents; fertility (characters per token) "
        + ", ".join(f"{lang} {v:.2f}" for lang, v in fert.items() if v is not None)
    )
    print(f"  report: {Path(report['path']) / METADATA_FILE}")
    return 0


def cmd_pack(args: argparse.Namespace, overrides: list[str]) -> int:
    from kfm.data.pack import pack

    manifest = pack(
        args.inputs,
        args.tokenizer,
        args.out,
        source_name=args.source_name or Path(args.out).name,
        license=args.license,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    splits = manifest["splits"]
    print(
        f"packed {args.out}: "
        + ", ".join(
            f"{name} {s['n_docs']:,} docs / {s['n_tokens']:,} tokens" for name, s in splits.items()
        )
    )
    return 0


def _progress(line: str) -> None:
    """A line that `kfm -q` leaves out (checks that passed, intermediate results)."""
    if verbosity() > QUIET:
        print(line)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.tasks is not None:
        from kfm_cli.benchmarks import run as run_benchmarks

        return run_benchmarks(args)
    for flag, value in (
        ("--limit", args.limit),
        ("--num-fewshot", args.num_fewshot),
        ("--include-path", args.include_path),
        ("--batch-size", args.batch_size),
        ("--out", args.out),
    ):
        if value is not None:
            raise ConfigError(f"{flag} applies to benchmarks: add --tasks (e.g. --tasks kfm_all)")
    from eval.run import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, batches=args.batches, data=args.data, tokenizer=args.tokenizer
    )
    note = result["tokenizer_check"]
    if note.startswith("warning"):
        print(note, file=sys.stderr)
    else:
        _progress(note)
    print(
        f"checkpoint {result['checkpoint']}: validation loss {result['val_loss']:.4f} nats/token, "
        f"{result['val_bpb']:.4f} bits/byte over {result['val_tokens']:,} tokens"
    )
    for line in result["breakdown_lines"]:
        print(line)
    again = " (replaced the earlier result of the same settings)" if result["replaced"] else ""
    print(f"result: {result['result_file']}{again}")
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from kfm.checkpoint import load_model_state, resolve_checkpoint_arg
    from kfm.checkpoint.stepdir import read_manifest
    from kfm.config import config_from_dict
    from kfm.export.hf import check_exportable, export_hf
    from kfm.export.verify import export_logits_diff
    from kfm.fs import check_output_dir
    from kfm.tokenizer.identity import check_tokenizer_identity

    path = resolve_checkpoint_arg(args.checkpoint)
    cfg = config_from_dict(read_manifest(path).get("config", {}), source=f"{path}/manifest.json")
    check_exportable(cfg.model)  # e.g. a soft-capped head: refused before anything is read
    tokenizer = args.tokenizer or cfg.tokenizer.path
    # Before the weights are read or anything is written: the tokenizer shipped with the model
    # must be the one it was trained with (the logits check below cannot see a wrong one).
    check = check_tokenizer_identity(
        tokenizer, checkpoint=path, config=cfg, tokenizer_given=args.tokenizer is not None
    )
    # export_hf checks again; checking here refuses a bad OUT_DIR before the weights are read.
    check_output_dir(
        args.out_dir, "export", inputs=[path, tokenizer], overwrite=args.overwrite, flag="OUT_DIR"
    )
    if args.format == "gguf":
        return _export_gguf(args, path, cfg, tokenizer, check)
    if args.dtype not in ("fp32", "bf16"):
        raise ConfigError(
            f"--dtype {args.dtype} is for --format gguf; the Hugging Face export takes fp32 or bf16"
        )
    state, _ = load_model_state(path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = export_hf(
        state,
        cfg.model,
        args.out_dir,
        tokenizer_dir=tokenizer,
        dtype=dtype,
        overwrite=args.overwrite,
        source=path,
    )
    print(f"exported {path} -> {out}")
    _tokenizer_verdict(check, tokenizer)
    if not args.verify:
        _progress("export check: logits not compared with kfm's (--no-verify)")
        return 0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.data.seq_len)), generator=g)
    diff = export_logits_diff(state, cfg.model, out, tokens)
    # fp32 weights must reproduce kfm's logits; bf16 rounding of every weight moves them more.
    tol = 1e-4 if args.dtype == "fp32" else 5e-2
    line = f"export check: max |logits_kfm - logits_hf| = {diff:.2e} (tolerance {tol:.0e})"
    return _verdict(line, ok=diff <= tol)


def _tokenizer_verdict(check: TokenizerCheck, tokenizer: str | Path) -> None:
    """Print the export's tokenizer check: "ok", or on stderr what could not be checked."""
    from kfm.tokenizer.identity import describe

    note = describe(check, tokenizer)
    if check.unchecked is not None:
        print(f"export check: {note}", file=sys.stderr)
    else:
        _progress(f"export check: {note}: ok")


def _verdict(line: str, *, ok: bool) -> int:
    """Print an export check's line with its verdict; the exit code (1 on a mismatch)."""
    if not ok:
        print(f"{line}: MISMATCH", file=sys.stderr)
        return 1
    _progress(f"{line}: ok")
    return 0


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from eval.report import write_report

    labels = [x.strip() for x in args.labels.split(",")] if args.labels is not None else None
    report = write_report(args.run_dirs, out=args.out, labels=labels)
    for skipped in report.skipped:
        _progress(f"not drawn: {skipped.title} ({skipped.reason})")
    again = " (replaced the earlier report)" if report.replaced else ""
    print(f"report: {report.report} with {len(report.plots)} plot(s){again}")
    return 0


def _export_gguf(
    args: argparse.Namespace, path: Path, cfg: Config, tokenizer: str | Path, check: TokenizerCheck
) -> int:
    """`kfm export --format gguf`: OUT_DIR/model-<dtype>.gguf, then every tensor read back."""
    from kfm.checkpoint import load_model_state
    from kfm.export.gguf import (
        GGUF_TOLERANCE,
        check_gguf_request,
        export_gguf,
        gguf_vocab,
        gguf_weights_diff,
    )

    # Refusals that need no weights come before reading them (minutes for a large checkpoint).
    check_gguf_request(args.out_dir, args.dtype)
    gguf_vocab(tokenizer, cfg.model.vocab_size)
    state, _ = load_model_state(path)
    out = export_gguf(
        state,
        cfg.model,
        args.out_dir,
        tokenizer_dir=tokenizer,
        dtype=args.dtype,
        overwrite=args.overwrite,
        source=path,
        name=cfg.train.name,
    )
    print(f"exported {path} -> {out}")
    _tokenizer_verdict(check, tokenizer)
    if not args.verify:
        _progress("export check: GGUF tensors not compared with the checkpoint (--no-verify)")
        return 0
    diff = gguf_weights_diff(out, state, cfg.model)
    tol = GGUF_TOLERANCE[args.dtype]
    line = (
        f"export check: max |w_gguf - w_kfm| / max |w_kfm| = {diff:.2e} over all tensors "
        f"(tolerance {tol:.0e} for {args.dtype})"
    )
    return _verdict(line, ok=diff <= tol)


def cmd_import_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    from kfm.export.hf_import import import_hf

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        result = import_hf(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    else:
        # Under torchrun: every rank reads and writes only its shard of each tensor (gloo on the
        # CPU: the weights go from file to file, no GPU needed).
        import torch.distributed as dist

        dist.init_process_group("gloo")
        try:
            result = import_hf(args.hf_dir, args.out_dir, overwrite=args.overwrite)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    m, out = result.model, result.out
    print(f"imported {Path(args.hf_dir)} ({result.architecture}) -> {out}")
    total = sum(r.bytes_read for r in result.reports)
    largest = max(r.largest_read for r in result.reports)
    per_rank = f" over {len(result.reports)} ranks" if len(result.reports) > 1 else ""
    _progress(
        f"  model: n_layers={m.n_layers} d_model={m.d_model} n_heads={m.n_heads} "
        f"n_kv_heads={m.n_kv_heads or m.n_heads} vocab_size={m.vocab_size} qk_norm={m.qk_norm} "
        f"tie_embeddings={m.tie_embeddings}"
    )
    _progress(
        f"  weights: {result.checkpoint} (fp32, no optimizer state); read {total / 1e6:.1f} MB"
        f"{per_rank}, largest single read {largest / 1e6:.1f} MB"
    )
    _progress(f"  tokenizer: {out / 'tokenizer'} (hash {result.tokenizer_hash[:12]})")
    _progress(
        f"  train from it: kfm train {out / 'train.yaml'} --data.sources=... "
        f"(or --checkpoint.init_from={out} with the model settings of train.yaml)"
    )
    return 0


def cmd_data_pii_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from data_pipeline.pii import pii_report

    counts = pii_report(args.input, args.output)
    total = sum(counts.values())
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    print(
        f"PII spans found: {total} ({summary})",
        file=sys.stderr if args.output is None else sys.stdout,
    )
    return 0


def cmd_data_run(args: argparse.Namespace, overrides: list[str]) -> int:
    from data_pipeline.run import run_pipeline

    return run_pipeline(
        args.config,
        overrides,
        executor=args.executor,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
    )


def cmd_data_card(args: argparse.Namespace, overrides: list[str]) -> int:
    from data_pipeline.card import write_card

    path = write_card(args.run_dir, args.output)
    print(f"data card written: {path}")
    return 0


def cmd_data_verify(args: argparse.Namespace, overrides: list[str]) -> int:
    from kfm.data.verify import raise_verify_errors, verification_share, verify_shard_sets

    splits = args.splits or None  # None: every split of each manifest
    share = verification_share(args.shard_sets, splits=splits)
    errors = verify_shard_sets(args.shard_sets, splits=splits, workers=args.workers)
    raise_verify_errors([errors])  # ShardError -> "kfm data: error: ..." and exit 1
    print(
        f"ok: {share.total_files} shard files ({share.total_bytes / 1e9:.2f} GB) in "
        f"{len(args.shard_sets)} shard set(s): sizes, sha256 and document indexes match"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfm",
        description="Pretrain a Korean/English domain foundation model from scratch.",
        epilog=_OVERRIDES_HELP,
    )
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show library info messages and the curation pipeline's per-task logs",
    )
    loud.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only warnings, errors and each command's final result line",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the Python traceback too (same as KFM_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train (or resume) a model from a config",
        description="Train or resume a model. " + _OVERRIDES_HELP,
    )
    _add_config_args(p, required=True)
    p.set_defaults(func=cmd_train, takes_overrides=True)
    from kfm_cli.plan import add_parser as add_plan_parser  # kfm plan (kfm_cli/plan.py)

    add_plan_parser(sub)

    p = sub.add_parser(
        "doctor",
        help="pre-flight check: devices, disk, versions, all-reduce bandwidth",
        description="Check a launch before training: GPUs per node, memory and ECC health, free "
        "disk for the checkpoints, equal software on every rank, all-reduce bandwidth. Run it "
        "like `kfm train` (alone or under torchrun with the same config); rank 0 prints one "
        "line per check; exit code 1 if any check FAILs. " + _OVERRIDES_HELP,
    )
    p.add_argument("config", nargs="?", help="YAML preset under configs/ (see README)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs every node must have (default: at least LOCAL_WORLD_SIZE under torchrun)",
    )
    p.add_argument(
        "--probe-mib",
        type=float,
        default=None,
        help="all-reduce probe buffer in MiB (default 256 on GPU, 16 on CPU; 0 skips the probe)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=cmd_doctor, takes_overrides=True)

    p = sub.add_parser(
        "tokenizer",
        help="train the byte-level BPE tokenizer",
        description="Tokenizer commands. " + _OVERRIDES_HELP,
    )
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tp = tsub.add_parser(
        "train",
        help="train a tokenizer on tokenizer.inputs, save to tokenizer.path",
        description="Train a byte-level BPE (NFC, split digits, bos/eos/pad + "
        "reserved specials) and report fertility for Korean and English. " + _OVERRIDES_HELP,
    )
    _add_config_args(tp, required=False)
    tp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace tokenizer.path if it holds a tokenizer kfm trained (never an input or any "
        "other folder); the old one is removed once the new one is saved",
    )
    tp.set_defaults(func=cmd_tokenizer, takes_overrides=True)

    p = sub.add_parser(
        "pack",
        help="tokenize text into packed, memory-mappable token shards",
        description="Tokenize JSONL/Parquet/text into a shard set (train/val splits, "
        "document index, manifest with sha256).",
    )
    p.add_argument(
        "inputs", nargs="+", help="files or directories (.jsonl, .jsonl.gz, .parquet, .txt)"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (kfm tokenizer train)")
    p.add_argument("--out", required=True, help="output shard-set directory")
    p.add_argument(
        "--source-name", default=None, help="source name in the manifest (default: out dir name)"
    )
    p.add_argument(
        "--license",
        default=None,
        help="license of the input text for the manifest (default: the documents' "
        "own `license` fields, else 'unknown')",
    )
    p.add_argument("--text-field", default="text", help="field holding the text (JSONL/Parquet)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of documents held out for validation",
    )
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per .bin file")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a shard set kfm packed (never an input or any other "
        "folder); the old set is removed once the new one is complete",
    )
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "eval",
        help="validation loss and bits per byte of a checkpoint",
        description="Evaluate a checkpoint (step dir, checkpoints dir or run dir). The tokenizer "
        "and the shards must be the ones the checkpoint was trained with (checked first). The "
        "result goes to RUN/eval/step_N.json for the run's own settings, step_N-<hash>.json for "
        "other --data/--batches; an earlier result of other settings is never replaced. With "
        "--tasks: lm-eval benchmarks; the table is printed and the result goes to "
        "RUN/eval/STEP/results.json (results-<hash>.json beside a result of other settings).",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint step dir, checkpoints/ dir or run dir (newest valid); with --tasks "
        "also a Hugging Face model folder",
    )
    p.add_argument(
        "--batches", type=int, default=None, help="validation batches (default: eval.batches)"
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="shard sets to evaluate instead of the run's sources (packed with its tokenizer)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir instead of the run's tokenizer.path (must be the same tokenizer, "
        "e.g. a copy)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="benchmarks instead of validation loss: comma-separated lm-eval tasks or groups, "
        "e.g. kfm_all, kfm_medical_en, kfm_korean, pubmedqa (eval/README.md); CHECKPOINT may "
        "also be a Hugging Face model folder",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="with --tasks: first N documents per task"
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="with --tasks: examples per prompt, from each task's dev split (refused for a task "
        "without one)",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="with --tasks: a folder of your own lm-eval task YAML files (repeatable)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="with --tasks: rows per forward (16)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="with --tasks: results file instead of RUN/eval/STEP/results.json "
        "(HF folder: DIR/eval/results.json)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder or a llama.cpp GGUF",
        description="Export a checkpoint to a transformers folder (safetensors, config, "
        "generation config, tokenizer) and check logits against kfm, or with --format gguf to "
        "OUT_DIR/model-<dtype>.gguf for llama.cpp (tokenizer embedded; every tensor read back "
        "and compared). The tokenizer must be the one the checkpoint was trained with (checked "
        "before anything is written).",
    )
    p.add_argument(
        "checkpoint", help="checkpoint step dir, checkpoints/ dir or run dir (newest valid)"
    )
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: a transformers folder; gguf: OUT_DIR/model-<dtype>.gguf for llama.cpp, "
        "tokenizer embedded",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16", "q8_0"],
        default="fp32",
        help="weight dtype to save (fp16 and q8_0: --format gguf only)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir instead of the run's tokenizer.path (must be the same tokenizer, "
        "e.g. a copy)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds an earlier kfm export (never a run, checkpoint or any "
        "other folder); the old one is removed once the new one is written",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the export against the checkpoint (hf: logits via transformers; "
        "gguf: every tensor read back)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "report",
        help="plots and report.md comparing training runs",
        description="Plot training loss, lr, grad norm, throughput, validation bits/byte and "
        "benchmark scores against tokens seen, several runs overlaid, and write report.md: runs "
        "and compute (device-hours, FLOPs), config differences, scores with 95%% intervals, "
        "data. An earlier report in the output folder is replaced; any other folder is refused.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", default=None, help="report folder (default: FIRST_RUN_DIR/report)")
    p.add_argument(
        "--labels",
        default=None,
        help="legend names of the runs, comma-separated in RUN_DIR order (default: folder names)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "import-hf",
        help="make a kfm checkpoint from a Hugging Face Llama/Qwen3 folder",
        description="Convert a local transformers folder (LlamaForCausalLM, or Qwen3ForCausalLM "
        "with QK norm; safetensors + tokenizer.json) into a kfm checkpoint for continued "
        "pretraining: OUT/checkpoints/step_000000 (weights only), OUT/tokenizer (copied byte for "
        "byte) and OUT/train.yaml. Train from it with --checkpoint.init_from=OUT. Models kfm "
        "cannot compute exactly (scaled RoPE, biases, sliding window...) are refused naming the "
        "config.json key. Under torchrun each rank reads only its shard of every tensor.",
    )
    p.add_argument("hf_dir", help="local transformers model folder (config.json, *.safetensors)")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds an earlier kfm import (never a run, checkpoint or any "
        "other folder); the old one is removed once the new one is written",
    )
    p.set_defaults(func=cmd_import_hf)
    from kfm_cli.merge import add_parser as add_merge_parser  # kfm merge (kfm_cli/merge.py)

    add_merge_parser(sub)
    from kfm_cli.release import add_parser as add_release_parser  # kfm release (release.py)

    add_release_parser(sub)

    p = sub.add_parser(
        "data",
        help="curation pipeline (run, card, PII audit)",
        description="Curation tools for the corpus before training and release.",
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser(
        "pii-report",
        help="list the PII spans found in each document of a JSONL file",
        description="Audit a corpus for personal data: for each input document (one JSON object "
        "per line with a `text` field) write its PII spans (type, start, end, text) as one JSON "
        "line, to OUT or standard output.",
    )
    dp.add_argument("input", help="JSONL file with a `text` field per line")
    dp.add_argument("-o", "--output", default=None, help="output JSONL (default: standard output)")
    dp.set_defaults(func=cmd_data_pii_report)
    dp = dsub.add_parser(
        "run",
        help="run the curation pipeline of a configs/data/*.yaml (local or Slurm)",
        description="Read, normalise, language-filter, quality-filter, scrub PII, decontaminate, "
        "deduplicate, tokenize and pack the inputs of a pipeline config, then write stats.json, "
        "DATA_CARD.md and train.yaml into its output_dir. A rerun skips completed tasks. "
        "Overrides: --quality.enabled=false style, top-level keys as --pipeline.tasks=8.",
    )
    dp.add_argument("config", help="pipeline YAML, e.g. configs/data/sample.yaml")
    dp.add_argument(
        "--executor",
        choices=("local", "slurm", "ray"),
        default=None,
        help="override executor.kind: local runs here; slurm writes and submits sbatch job arrays",
    )
    dp.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the stage plan (for slurm also write the sbatch "
        "scripts without submitting), then exit",
    )
    dp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output_dir if it holds an earlier `kfm data run` output (needed to rerun "
        "with a changed config): it is moved aside and removed once the new run completes",
    )
    dp.set_defaults(func=cmd_data_run, takes_overrides=True)
    dp = dsub.add_parser(
        "card",
        help="(re)write DATA_CARD.md of a finished `kfm data run` output folder",
        description="Render DATA_CARD.md (composition, filters and thresholds, dedup and "
        "decontamination results, PII counts, licenses) from RUN_DIR/stats.json and "
        "RUN_DIR/pipeline.yaml.",
    )
    dp.add_argument("run_dir", help="the pipeline's output_dir")
    dp.add_argument(
        "-o", "--output", default=None, help="where to write (default RUN_DIR/DATA_CARD.md)"
    )
    dp.set_defaults(func=cmd_data_card)
    dp = dsub.add_parser(
        "verify",
        help="check shard sets in full: sizes, sha256 of every file, document indexes",
        description="Full verification of `kfm pack` / `kfm data run` shard sets, once, outside "
        "training (where data.verify=spread spreads the same checks over the ranks). Exits 1 "
        "listing every bad file.",
    )
    dp.add_argument("shard_sets", nargs="+", help="shard set directories (hold manifest.json)")
    dp.add_argument(
        "--splits", nargs="+", default=None, help="splits to check (default: every split)"
    )
    dp.add_argument("--workers", type=int, default=4, help="files hashed in parallel")
    dp.set_defaults(func=cmd_data_verify)
    return parser


_OVERRIDE = re.compile(r"--[A-Za-z_]\w*\.[\w.]+(=.*)?", re.DOTALL)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the dotted overrides ``--section.key=value`` / ``--section.key value``).

    Overrides are taken out before argparse sees them: argparse reads any argument holding a space
    (``'--data.sources=[{name: a, path: x}]'``) as a positional, which took the place of the config
    path of commands whose config is optional.
    """
    others: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            others += argv[i:]
            break
        if _OVERRIDE.fullmatch(arg):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            others.append(arg)
        i += 1
    return others, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    others, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args, rest = parser.parse_known_args(others)
    rest += overrides
    if misplaced := [a for a in rest if a in _GLOBAL_FLAGS]:
        parser.error(
            f"{misplaced[0]} is an option of kfm itself: put it before the command "
            f"(kfm {misplaced[0]} {_command(args)} ...)"
        )
    if rest and not getattr(args, "takes_overrides", False):
        # Only config-driven commands take --section.key=value; elsewhere it is a typo.
        parser.error(f"unrecognized arguments for kfm {_command(args)}: {' '.join(rest)}")
    level = VERBOSE if args.verbose else QUIET if args.quiet else NORMAL
    set_verbosity(level)
    quiet_libraries(level)
    # Under torchrun every rank runs this and reports its own failure, tagged with its rank.
    rank = int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        return args.func(args, rest)
    except (Exception, KeyboardInterrupt) as e:
        # One message naming the fix; the traceback only when asked for (kfm_cli/errors.py).
        return report(
            e,
            command=_command(args),
            debug=debug_requested(args.debug),
            rank=rank,
            stream=sys.stderr,
        )


def _command(args: argparse.Namespace) -> str:
    """The command as typed: "train", "tokenizer train", "data run"..."""
    sub = getattr(args, "tokenizer_command", None) or getattr(args, "data_command", None)
    return f"{args.command} {sub}" if sub else args.command


if __name__ == "__main__":
    sys.exit(main())
