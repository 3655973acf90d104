"""The text and JSON of `kfm plan` and of the timing lines in `kfm train --dry-run --world-size`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kfm.config import Config
from kfm.model.transformer import Transformer
from kfm.parallel.plan import Plan, build_plan, format_plan
from kfm.plan.hardware import GIB, GPUS
from kfm.plan.model import Allocation, Prediction, predict


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def timing_lines(pred: Prediction, *, tokens: float | None = None) -> list[str]:
    """Step time by component, throughput, MFU and days, as report lines."""
    lines = ["step time (kfm.plan.model; per optimizer step, all micro-batches):"]
    for name, sec in pred.compute.items():
        if sec:
            lines.append(f"  compute  {name:<24} {sec:8.3f} s")
    for name, sec in pred.comm.items():
        if sec:
            lines.append(f"  comm     {name:<24} {sec:8.3f} s on its link")
    for name, sec in pred.exposed_comm.items():
        lines.append(f"  exposed  {name:<24} {sec:8.3f} s not hidden behind compute")
    lines += [
        f"  step {pred.step_s:.3f} s = compute {pred.compute_s:.3f} s + exposed communication "
        f"{pred.step_s - pred.compute_s:.3f} s",
        f"  {pred.tokens_per_s / 1e6:.3f} M tokens/s, {pred.tokens_per_s_per_gpu:,.0f} tokens/s/GPU,"
        f" MFU {pred.mfu:.1%} (of the {pred.peak_flops / 1e12:,.0f} TFLOP/s peak the loop uses;"
        f" {pred.mfu_bf16:.1%} of bf16), {pred.tokens_per_day / 1e9:.2f} B tokens/day",
    ]
    if tokens:
        lines.append(
            f"  {tokens / 1e9:,.1f} B tokens: {pred.days_for(tokens):.2f} days "
            f"({tokens / pred.tokens_per_step:,.0f} steps) without interruptions"
        )
    lines += [f"  note: {n}" for n in pred.notes]
    return lines


def prediction_dict(pred: Prediction, *, tokens: float | None) -> dict[str, Any]:
    """The JSON form of a prediction (the same figures `timing_lines` prints)."""
    return {
        "mesh": dict(zip(("dp_replicate", "dp_shard", "tp"), pred.mesh, strict=True)),
        "grad_accum": pred.grad_accum,
        "micro_batch_tokens": pred.micro_batch_tokens,
        "tokens_per_step": pred.tokens_per_step,
        "compute_s": pred.compute,
        "comm_s": pred.comm,
        "exposed_comm_s": pred.exposed_comm,
        "step_s": pred.step_s,
        "tokens_per_s": pred.tokens_per_s,
        "tokens_per_s_per_gpu": pred.tokens_per_s_per_gpu,
        "mfu": pred.mfu,
        "mfu_bf16": pred.mfu_bf16,
        "flops_per_token": pred.flops_per_token,
        "tokens_per_day": pred.tokens_per_day,
        "tokens": tokens,
        "days": pred.days_for(tokens) if tokens else None,
        "notes": pred.notes,
    }


def memory_dict(plan: Plan) -> dict[str, Any]:
    mem = plan.memory
    return {
        "params": mem.params,
        "grads": mem.grads,
        "optimizer": mem.optimizer,
        "gathered": mem.gathered,
        "activations": mem.activations,
        "activations_no_ac": mem.activations_no_ac,
        "activations_full_ac": mem.activations_full_ac,
        "fp8": mem.fp8,
        "tp_buffers": mem.tp_buffers,
        "total": mem.total,
        "budget": mem.budget,
        "fits": mem.fits,
    }


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(total, without embeddings) parameters, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return model.num_params(), model.num_params(exclude_embeddings=True)


def plan_text(
    cfg: Config, alloc: Allocation, *, tokens: float | None = None
) -> tuple[str, dict[str, Any]]:
    """`kfm plan` for one config: (the report, the same as a JSON-ready dict).

    Raises:
        ConfigError: see `kfm.parallel.plan.build_plan`.
        ValueError: see `kfm.plan.model.predict`.
    """
    plan = build_plan(cfg, alloc.world_size, gpu=alloc.gpu)
    pred = predict(cfg, alloc)
    n, n_body = parameter_counts(cfg)
    gpu = alloc.gpu
    head = [
        f"allocation: {alloc.nodes} nodes x {alloc.gpus_per_node} {gpu.name.upper()} = "
        f"{alloc.world_size} GPUs ({gpu.generation.name}: gemm_efficiency "
        f"{gpu.generation.gemm_efficiency:.3f} fitted on "
        f"{', '.join(gpu.generation.calibrated_on) or 'nothing (not calibrated)'})",
        f"parameters: {n:,} ({n_body:,} without embeddings); training FLOPs per token "
        f"{pred.flops_per_token:.4g} (kfm.model.flops.flops_per_token, the loop's MFU formula)",
    ]
    text = "\n".join(head) + "\n" + format_plan(cfg, plan, timing=timing_lines(pred, tokens=tokens))
    data = {
        "gpu": gpu.name,
        "nodes": alloc.nodes,
        "gpus_per_node": alloc.gpus_per_node,
        "world_size": alloc.world_size,
        "gemm_efficiency": gpu.generation.gemm_efficiency,
        "parameters": n,
        "parameters_without_embeddings": n_body,
        "sharding_method": plan.method,
        "memory_bytes": memory_dict(plan),
        **prediction_dict(pred, tokens=tokens),
    }
    return text, data


def dry_run_report(cfg: Config, world_size: int) -> str:
    """Text of ``kfm train CONFIG --dry-run --world-size N``: mesh, sharding, the predicted step
    time and memory per rank, on B200 nodes of 8 (`kfm plan` takes other GPUs).

    Raises:
        ConfigError: see `kfm.parallel.plan.build_plan`.
    """
    gpu = GPUS["b200"]
    plan = build_plan(cfg, world_size, gpu=gpu)
    per_node = min(gpu.gpus_per_node, world_size)
    alloc = Allocation(gpu=gpu, nodes=max(1, world_size // per_node), gpus_per_node=per_node)
    if alloc.world_size != world_size:  # not whole nodes: one node per rank, as a lower bound
        alloc = dataclasses.replace(alloc, nodes=world_size, gpus_per_node=1)
    timing = timing_lines(predict(cfg, alloc))
    timing[0] = f"step time on {alloc.nodes} x {alloc.gpus_per_node} B200 (kfm plan for others):"
    return format_plan(cfg, plan, timing=timing)


PRESET_PREFIX = "# plan: "


def preset_block(cfg: Config, alloc: Allocation) -> list[str]:
    """The comment block a configs/pretrain preset carries: its plan, rounded so that only a
    real change of the model or the config moves it (tests/plan/test_presets.py compares)."""
    pred = predict(cfg, alloc)
    mem = build_plan(cfg, alloc.world_size, gpu=alloc.gpu, analytic=True).memory
    tokens = cfg.train.steps * pred.tokens_per_step
    r, s, t = pred.mesh
    return [
        PRESET_PREFIX + f"{alloc.nodes} x {alloc.gpus_per_node} {alloc.gpu.name.upper()}, mesh "
        f"{r} x {s} x {t}, micro-batch {cfg.train.micro_batch_size}, accumulation "
        f"{pred.grad_accum}, ac={cfg.parallel.ac}, fp8={cfg.parallel.fp8}",
        PRESET_PREFIX + f"step {pred.step_s:.2f} s, {pred.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
        f"MFU {pred.mfu:.0%}, {pred.tokens_per_day / 1e9:,.0f} B tokens/day",
        PRESET_PREFIX
        + f"{tokens / 1e9:,.0f} B tokens in {_duration(pred.days_for(tokens) * 86400)}"
        f" ({alloc.world_size * 24 * pred.days_for(tokens):,.0f} GPU-hours) without interruptions",
        PRESET_PREFIX + f"memory {mem.total / GIB:.0f} of {mem.budget / GIB:.0f} GiB per GPU "
        f"({'fits' if mem.fits else 'DOES NOT FIT'})",
    ]
