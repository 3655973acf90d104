"""`kfm eval CKPT --tasks ...`: lm-eval benchmarks on a native checkpoint or a Hugging Face folder.

One process: a native checkpoint is scored by `eval.lm.KfmLM` (no export needed), an HF folder by
lm-eval's HFLM. Under torchrun (WORLD_SIZE > 1) the model is sharded over every rank with FSDP2
(KfmLM ``parallel=``; an HF Llama/Qwen3 folder through `KfmLM.from_hf`), so a model larger than one
device's memory is evaluated without any rank holding it whole; all ranks score in lockstep and
rank 0 prints the table and writes the results.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kfm.config import ConfigError, ParallelConfig


def run(args: argparse.Namespace) -> int:
    """Parse ``--tasks`` and friends, then score in one process or under torchrun."""
    import torch

    from kfm.train.dist import process_group, world_from_env

    if args.batches is not None or args.data is not None:
        raise ConfigError(
            "--batches and --data set the validation-loss evaluation; run it without --tasks"
        )
    world = world_from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not world.distributed:
        return _score(args, device, parallel=None, rank=0)
    parallel = ParallelConfig()  # FSDP2 over every rank (dp_shard=-1)
    with process_group(parallel, world, device) as local_device:
        return _score(args, local_device, parallel=parallel, rank=world.rank)


def _score(
    args: argparse.Namespace,
    device: Any,
    *,
    parallel: ParallelConfig | None,
    rank: int,
) -> int:
    from eval.bench import markdown_table, run_benchmarks, write_results
    from eval.lm import KfmLM
    from kfm.checkpoint.stepdir import read_manifest
    from kfm.tokenizer.core import tokenizer_hash

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch_size = args.batch_size or 16
    ckpt = Path(args.checkpoint)
    lm: Any
    if (ckpt / "config.json").is_file():  # a Hugging Face model folder (kfm export's output)
        tokenizer = Path(args.tokenizer or ckpt)
        if parallel is None:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(
                pretrained=str(ckpt),
                tokenizer=str(tokenizer),
                batch_size=batch_size,
                device=str(device),
            )
        else:  # sharded: kfm's model streams the folder's tensors, each rank its own slices
            lm = KfmLM.from_hf(ckpt, device=device, batch_size=batch_size, parallel=parallel)
        run_dir, step_dir, step, tokens = ckpt, "", None, None
        meta: dict[str, Any] = {
            "checkpoint": ".",
            "model": "hf",
            "tokenizer_hash": tokenizer_hash(tokenizer),
        }
    else:
        lm = KfmLM.from_checkpoint(
            ckpt,
            device=device,
            batch_size=batch_size,
            tokenizer_dir=args.tokenizer,
            parallel=parallel,
        )
        # from_checkpoint always sets these (None only for from_model)
        assert lm.checkpoint is not None and lm.config is not None and lm.tokenizer_hash
        if rank == 0 and lm.tokenizer_check:
            print(lm.tokenizer_check, flush=True)
        step_path = lm.checkpoint
        run_dir, step_dir = step_path.parent.parent, step_path.name
        step = int(read_manifest(step_path)["step"])
        cfg = lm.config
        tokens = step * cfg.train.global_batch_size * cfg.data.seq_len
        meta = {
            "checkpoint": str(step_path.relative_to(run_dir)),
            "model": "native",
            "tokenizer_hash": lm.tokenizer_hash,
        }
        if cfg.data.sources:  # bits per byte per source and language on the run's val split
            from eval.run import checkpoint_bpb

            # every rank joins (the sharded model's forwards are collectives), each with its share
            meta["bpb"] = checkpoint_bpb(
                step_path,
                model=lm.model,
                device=str(device),
                dp_rank=lm.dp_rank,
                dp_size=lm.dp_size,
            )
    results = run_benchmarks(
        lm,
        tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path or (),
        batch_size=batch_size,
    )
    if rank != 0 or results is None:  # KfmLM gives every rank the results; rank 0 reports
        return 0
    results["kfm"] = {"step": step, "tokens": tokens, **meta, **results["kfm"]}
    if parallel is not None:
        results["kfm"]["world_size"] = _world_size()
    print(markdown_table(results))
    path, replaced = write_results(run_dir, step_dir, results, out=args.out)
    again = " (replaced the earlier result of the same settings)" if replaced else ""
    print(f"result: {path}{again}")
    return 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()
