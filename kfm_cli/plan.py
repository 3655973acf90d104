"""`kfm plan`: the capacity planner's command (kfm/plan/README.md explains the model)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from kfm.config import ConfigError

DESCRIPTION = (
    "Predict step time, tokens/s, MFU, memory per GPU and days for a config on an allocation "
    "(no GPU needed): the same config tree and dotted overrides as `kfm train`. --search ranks "
    "every layout that fits; --gpu-hours with --data reports compute-optimal and over-trained "
    "choices; --validate prints the check against published runs; --sbatch-args prints the "
    "Slurm allocation of the preset. Overrides: --parallel.tp=2 style, after the options."
)


def add_parser(sub: Any) -> None:
    """Register `kfm plan` on the `kfm` subparsers."""
    p = sub.add_parser("plan", help="capacity planner: step time, tokens/s, MFU, memory, days",
                       description=DESCRIPTION)  # fmt: skip
    p.add_argument("config", nargs="?", help="YAML preset (e.g. configs/pretrain/8b.yaml)")
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes (default: the config's mesh size / --gpus-per-node, else 1)",
    )
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (default: the GPU's node)"
    )
    p.add_argument(
        "--gpu",
        default="b200",
        help="b200 (default), gb200, h200, h100, h100-pcie or a100 (kfm/plan/hardware.py)",
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="training tokens for the days line, e.g. 2e12 (default: train.steps x tokens/step)",
    )
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--top", type=int, default=15, help="layouts --search prints (default 15)")
    p.add_argument(
        "--gpu-hours", type=float, default=None, help="budget: GPU-hours of the allocation"
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="budget: curated data (kfm data run output dirs or stats.json, shard-set dirs, "
        "or an inventory YAML of projected tokens)",
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        help="budget: more presets to compare with CONFIG on the same allocation",
    )
    p.add_argument(
        "--save-s",
        type=float,
        default=None,
        help="failure budget: seconds a checkpoint save stalls the loop (default: estimated)",
    )
    p.add_argument(
        "--gemm-efficiency",
        type=float,
        default=None,
        help="replace the GPU generation's fitted GEMM efficiency (what-if, e.g. 0.483 = Hopper's)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="print predicted vs published tokens/s/GPU and MFU of the validation runs",
    )
    p.add_argument(
        "--sbatch-args",
        action="store_true",
        help="print only --nodes=N --gpus-per-node=G for sbatch (launch/slurm/README.md)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=cmd_plan, takes_overrides=True)


def _allocation(args: argparse.Namespace, cfg: Any) -> Any:
    import dataclasses

    from kfm.plan.hardware import get_gpu
    from kfm.plan.model import Allocation

    try:
        gpu = get_gpu(args.gpu)
    except ValueError as e:
        raise ConfigError(f"--gpu: {e}") from None
    if args.gemm_efficiency is not None:
        gen = dataclasses.replace(gpu.generation, gemm_efficiency=args.gemm_efficiency)
        gpu = dataclasses.replace(gpu, generation=gen)
    per_node = args.gpus_per_node or gpu.gpus_per_node
    nodes = args.nodes
    if nodes is None:
        p = cfg.parallel
        sizes = (p.dp_replicate, p.dp_shard, p.tp)
        world = math.prod(sizes) if -1 not in sizes else per_node
        if world % per_node:
            raise ConfigError(
                f"the config's mesh {sizes[0]} x {sizes[1]} x {sizes[2]} = {world} GPUs is not a "
                f"whole number of {per_node}-GPU nodes: pass --nodes and --gpus-per-node"
            )
        nodes = world // per_node
    if nodes < 1 or per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={per_node} must be >= 1")
    return Allocation(gpu=gpu, nodes=nodes, gpus_per_node=per_node)


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    out: dict[str, Any] = {}
    texts: list[str] = []
    if args.validate:
        from kfm.plan.validation import format_validation, validation_table

        rows = validation_table()
        texts.append(format_validation(rows))
        out["validation"] = rows
    if args.config is None:
        if not args.validate:
            raise ConfigError("kfm plan needs a CONFIG (or --validate alone)")
    else:
        from kfm.config import load_config

        cfg = load_config(args.config, overrides)
        alloc = _allocation(args, cfg)
        if args.sbatch_args:
            print(f"--nodes={alloc.nodes} --gpus-per-node={alloc.gpus_per_node}")
            return 0
        texts.append(_plan_one(args, cfg, alloc, out, overrides))
    print("\n\n".join(texts))
    if args.json:
        from kfm.fs import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def _plan_one(
    args: argparse.Namespace, cfg: Any, alloc: Any, out: dict[str, Any], overrides: list[str]
) -> str:
    from kfm.plan import budget as bud
    from kfm.plan.model import predict
    from kfm.plan.report import parameter_counts, plan_text

    tokens = args.tokens or cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    text, data = plan_text(cfg, alloc, tokens=tokens)
    out.update(data)
    parts = [text]
    pred = predict(cfg, alloc)
    local = data["parameters"] / (pred.mesh[1] * pred.mesh[2])
    save_s = args.save_s
    if save_s is None:
        save_s = bud.save_blocking_s(local, async_save=cfg.checkpoint.async_save)
    fb = bud.failure_budget(gpus=alloc.world_size, save_blocking_s=save_s, restart_s=bud.RESTART_S)
    parts.append(
        bud.format_failure_budget(
            fb, step_s=pred.step_s, configured_interval=cfg.checkpoint.interval
        )
    )
    out["failure_budget"] = {
        "interruptions_per_week": fb.interruptions_per_week,
        "mtbf_hours": fb.mtbf_hours,
        "save_blocking_s": fb.save_blocking_s,
        "checkpoint_interval_s": fb.interval_s,
        "checkpoint_interval_steps": max(1, round(fb.interval_s / pred.step_s)),
        "lost_fraction": fb.lost_fraction,
    }
    if args.search:
        from kfm.plan.search import format_search, search, search_dict

        cands = search(cfg, alloc)
        parts.append(format_search(cands, top=args.top))
        out["search"] = search_dict(cands)
    if args.gpu_hours is not None or args.data or args.candidates:
        if args.gpu_hours is None:
            raise ConfigError("--data / --candidates report a budget: add --gpu-hours H")
        from kfm.config import load_config

        sources = bud.read_inventory(args.data or [])
        rows = [
            (cfg.train.name, data["parameters"], pred.flops_per_token, pred.tokens_per_s_per_gpu)
        ]
        for path in args.candidates or []:
            other = load_config(path, overrides)
            p = predict(other, alloc)
            rows.append((other.train.name, parameter_counts(other)[0], p.flops_per_token,
                         p.tokens_per_s_per_gpu))  # fmt: skip
        choices = bud.budget_choices(
            rows, gpus=alloc.world_size, gpu_hours=args.gpu_hours, sources=sources
        )
        parts.append(
            bud.format_budget(
                choices, gpus=alloc.world_size, gpu_hours=args.gpu_hours, sources=sources
            )
        )
        out["budget"] = bud.budget_dict(choices)
    return "\n\n".join(parts)
