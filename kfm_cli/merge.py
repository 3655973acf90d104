"""`kfm merge RUN_DIR --last K | --steps S1,S2 [--ema] --out OUT`: average checkpoints' weights
into a new checkpoint folder (kfm/checkpoint/merge.py)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from kfm.config import ConfigError

DESCRIPTION = (
    "Average the model weights of a run's last K checkpoints (--last K) or of chosen steps "
    "(--steps), or with --ema take the weight EMA of train.ema_decay (default: the newest "
    "checkpoint's), into OUT/checkpoints/step_N: a weights-only kfm checkpoint that kfm eval, "
    "kfm export and --checkpoint.init_from take like a training checkpoint. Checkpoints of "
    "another model config or tokenizer are refused. One checkpoint is read at a time into an "
    "fp32 running sum (two model copies in memory); under torchrun each rank reads and averages "
    "only its shard of every tensor."
)


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of steps, e.g. 800,900,1000"
        ) from None
    if not steps:
        raise argparse.ArgumentTypeError("give at least one step, e.g. --steps 800,900,1000")
    return steps


def add_parser(sub: Any) -> None:
    """Register `kfm merge` on the `kfm` subparsers."""
    p = sub.add_parser(
        "merge",
        help="average the weights of a run's last checkpoints (or take its weight EMA)",
        description=DESCRIPTION,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run dir (or its checkpoints/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--last", type=int, default=None, help="average the newest K complete checkpoints"
    )
    which.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="average the checkpoints of these steps, comma-separated, e.g. 800,900,1000",
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoints' weight EMA (train.ema_decay) instead of their weights; "
        "without --last/--steps: the newest checkpoint's EMA",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier kfm merge (never a run, checkpoint or any "
        "other folder); the old one is removed once the new one is written",
    )
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> int:
    from kfm.checkpoint.merge import merge_checkpoints, select_checkpoints

    last, steps = args.last, args.steps
    if last is None and steps is None:
        if not args.ema:
            raise ConfigError(
                "choose the checkpoints to average: --last K (the newest K) or --steps S1,S2; "
                "or --ema for the newest checkpoint's weight EMA"
            )
        last = 1
    paths = select_checkpoints(args.run_dir, last=last, steps=steps)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        result = merge_checkpoints(paths, args.out, ema=args.ema, overwrite=args.overwrite)
    else:
        # Under torchrun: every rank reads and averages only its shard of each tensor (gloo on
        # the CPU: the weights go from file to file, no GPU needed).
        import torch.distributed as dist

        dist.init_process_group("gloo")
        try:
            result = merge_checkpoints(paths, args.out, ema=args.ema, overwrite=args.overwrite)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    what = "weight EMA" if result.ema else "model weights"
    steps_text = ", ".join(p.name.removeprefix("step_").lstrip("0") or "0" for p in result.sources)
    print(
        f"averaged the {what} of {len(result.sources)} checkpoint(s) (steps {steps_text}) "
        f"-> {result.checkpoint}"
    )
    return 0
