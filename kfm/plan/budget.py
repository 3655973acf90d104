"""Token budget and data: what an allocation of GPU-hours buys, and how often it repeats the data.

`budget_choices` turns each candidate config's predicted tokens/s/GPU into the tokens a GPU-hour
allocation trains, and says for each whether it is near compute-optimal or over-trained, and how
many epochs of each curated source the mixture implies:

- Compute-optimal: ~20 training tokens per parameter (Hoffmann et al. 2022, "Training
  Compute-Optimal Large Language Models", the Chinchilla result), with compute C = 6 N D:
  N_opt = sqrt(C / 120), D_opt = 20 N_opt. A model far smaller than N_opt trained on the same
  compute is over-trained: worse loss per FLOP, cheaper to serve (Llama 3 8B saw ~1,900 tokens
  per parameter).
- Repetition: up to ~4 epochs of the same data are nearly as good as fresh data; returns then
  fall and vanish around 16 epochs (Muennighoff et al. 2023, "Scaling Data-Constrained Language
  Models"). Sources above 4 epochs are flagged, above 16 marked as wasted compute.

`failure_budget` is the scale plan's interruption arithmetic: the failure rate Meta reported for
Llama 3 405B pretraining (466 job interruptions in 54 days on 16,384 H100s, Llama 3 paper
section 3.3.4), scaled to this allocation, and the checkpoint interval that minimises the
expected lost time (Young 1974; Daly 2006: sqrt(2 x save time x MTBF)).

The data side reads the files `kfm data run` and `kfm pack` write (kfm imports nothing from
data_pipeline): a run's stats.json, a shard set's manifest.json, or an inventory YAML that
states projected token counts before the data exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHINCHILLA_TOKENS_PER_PARAM = 20.0
"""Hoffmann et al. 2022: compute-optimal training tokens per parameter."""
FRESH_EPOCHS = 4.0
"""Muennighoff et al. 2023: up to ~4 epochs of repeated data are nearly as good as unique data."""
USELESS_EPOCHS = 16.0
"""Muennighoff et al. 2023: around 16 epochs further repetition adds almost nothing."""
LLAMA3_INTERRUPTIONS = 466
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16384
"""Llama 3 paper (Dubey et al. 2024, section 3.3.4): 466 job interruptions (419 unexpected) in a
54-day snapshot of 405B pretraining on 16,384 H100 GPUs."""


class DataInventoryError(ValueError):
    """A data inventory path that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class DataSource:
    name: str
    tokens: float
    language: str = "unknown"
    domain: str = "unknown"
    weight: float = 1.0
    """Mixture weight (normalised over the sources)."""


def _from_stats(path: Path) -> list[DataSource]:
    report = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for name, row in report.get("sources", {}).items():
        out.append(
            DataSource(
                name=name,
                tokens=float(row.get("pack_tokens", 0)),
                language=row.get("language") or "unknown",
                domain=row.get("domain") or "unknown",
                weight=float(row.get("weight", 1.0)),
            )
        )
    return out


def _from_manifest(path: Path) -> list[DataSource]:
    manifest = json.loads(path.read_text(encoding="utf-8"))
    train = manifest.get("splits", {}).get("train", {})
    sources = manifest.get("sources") or [{"name": path.parent.name}]
    total = float(train.get("n_tokens", 0))
    # one shard set holds one source in kfm pack; split evenly if a manifest lists several
    return [DataSource(name=s["name"], tokens=total / len(sources)) for s in sources]


def _from_inventory(path: Path) -> list[DataSource]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    rows = data.get("sources")
    if not isinstance(rows, list):
        raise DataInventoryError(
            f"{path}: an inventory YAML needs a top-level 'sources:' list of "
            "{name, tokens, language, domain, weight}"
        )
    out = []
    for i, row in enumerate(rows):
        if "name" not in row or "tokens" not in row:
            raise DataInventoryError(f"{path}: sources[{i}] needs 'name' and 'tokens'")
        out.append(
            DataSource(
                name=str(row["name"]),
                tokens=float(row["tokens"]),
                language=str(row.get("language", "unknown")),
                domain=str(row.get("domain", "unknown")),
                weight=float(row.get("weight", 1.0)),
            )
        )
    return out


def read_inventory(paths: list[str | Path]) -> list[DataSource]:
    """Curated tokens per source from `kfm data run` output dirs or their stats.json, shard-set
    dirs (manifest.json) or inventory YAML files.

    Raises:
        DataInventoryError: a path that is none of these.
    """
    out: list[DataSource] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if (path / "stats.json").is_file():
                out += _from_stats(path / "stats.json")
            elif (path / "manifest.json").is_file():
                out += _from_manifest(path / "manifest.json")
            else:
                raise DataInventoryError(
                    f"{path}: neither stats.json (a `kfm data run` output_dir) nor manifest.json "
                    "(a `kfm pack` shard set) is in it"
                )
        elif path.name == "stats.json":
            out += _from_stats(path)
        elif path.name == "manifest.json":
            out += _from_manifest(path)
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            out += _from_inventory(path)
        else:
            raise DataInventoryError(
                f"{path}: not found or not a data inventory (give a `kfm data run` output_dir, "
                "its stats.json, a shard-set dir or manifest.json, or an inventory YAML)"
            )
    return out


@dataclass(slots=True)
class BudgetChoice:
    name: str
    params: float
    tokens_per_s_per_gpu: float
    tokens: float
    """Tokens the allocation trains at the predicted rate."""
    flops_per_token: float
    epochs: dict[str, float] = field(default_factory=dict)
    """Epochs over each source the mixture weights imply."""

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def compute(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def optimal_params(self) -> float:
        """Chinchilla N_opt for this choice's compute (C = 6 N D, D = 20 N)."""
        return math.sqrt(self.compute / (6 * CHINCHILLA_TOKENS_PER_PARAM))

    @property
    def verdict(self) -> str:
        ratio = self.tokens_per_param / CHINCHILLA_TOKENS_PER_PARAM
        if ratio < 0.5:
            return "under-trained (fewer than 10 tokens/param)"
        if ratio <= 2.0:
            return "compute-optimal (Chinchilla ~20 tokens/param)"
        return f"over-trained ({ratio:.0f}x Chinchilla tokens: smaller, cheaper to serve)"


def budget_choices(
    candidates: list[tuple[str, float, float, float]],
    *,
    gpus: int,
    gpu_hours: float,
    sources: list[DataSource],
) -> list[BudgetChoice]:
    """One `BudgetChoice` per candidate (name, parameters, FLOPs/token, tokens/s/GPU) for
    `gpu_hours` spread over `gpus` GPUs."""
    total_weight = sum(s.weight for s in sources) or 1.0
    out = []
    for name, params, fpt, tps_gpu in candidates:
        tokens = tps_gpu * gpu_hours * 3600.0
        epochs = {
            s.name: tokens * s.weight / total_weight / s.tokens if s.tokens else math.inf
            for s in sources
        }
        out.append(BudgetChoice(name, params, tps_gpu, tokens, fpt, epochs))
    return out


def format_budget(
    choices: list[BudgetChoice], *, gpus: int, gpu_hours: float, sources: list[DataSource]
) -> str:
    days = gpu_hours / gpus / 24
    lines = [
        f"budget: {gpu_hours:,.0f} GPU-hours = {days:.1f} days on {gpus} GPUs",
        f"  {'candidate':<22} {'params':>8} {'tok/s/GPU':>10} {'tokens':>9} {'tok/param':>9} "
        f"{'N_opt':>8}  verdict",
    ]
    for c in choices:
        lines.append(
            f"  {c.name:<22} {c.params / 1e9:>7.2f}B {c.tokens_per_s_per_gpu:>10,.0f} "
            f"{c.tokens / 1e9:>8.0f}B {c.tokens_per_param:>9.0f} {c.optimal_params / 1e9:>7.1f}B"
            f"  {c.verdict}"
        )
    if sources:
        total = sum(s.tokens for s in sources)
        lines.append(f"data: {total / 1e9:,.2f} B curated tokens in {len(sources)} sources")
        for key in ("language", "domain"):
            groups: dict[str, float] = {}
            for s in sources:
                groups[getattr(s, key)] = groups.get(getattr(s, key), 0.0) + s.tokens
            lines.append(
                f"  by {key}: "
                + ", ".join(f"{g} {t / 1e9:,.2f} B" for g, t in sorted(groups.items()))
            )
        lines.append("epochs per source (mixture weights as given; >4 flagged, >16 wasted):")
        header = "  " + f"{'source':<24}" + "".join(f"{c.name[:12]:>13}" for c in choices)
        lines.append(header)
        for s in sources:
            cells = []
            for c in choices:
                e = c.epochs[s.name]
                mark = "!!" if e > USELESS_EPOCHS else "!" if e > FRESH_EPOCHS else ""
                cells.append(f"{e:>11.1f}{mark:<2}")
            lines.append(f"  {s.name[:24]:<24}" + "".join(cells))
    lines.append(
        "  compute-optimal: Hoffmann et al. 2022 (~20 tokens/param, C = 6ND); repetition: "
        "Muennighoff et al. 2023 (<= 4 epochs ~ fresh data; ~16 epochs: no further value)"
    )
    return "\n".join(lines)


def budget_dict(choices: list[BudgetChoice]) -> list[dict[str, Any]]:
    return [
        {
            "name": c.name,
            "params": c.params,
            "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu,
            "tokens": c.tokens,
            "tokens_per_param": c.tokens_per_param,
            "chinchilla_optimal_params": c.optimal_params,
            "verdict": c.verdict,
            "epochs": c.epochs,
        }
        for c in choices
    ]


@dataclass(frozen=True, slots=True)
class FailureBudget:
    gpus: int
    interruptions_per_week: float
    mtbf_hours: float
    """Mean time between job interruptions at this scale."""
    save_blocking_s: float
    restart_s: float
    interval_s: float
    """Young/Daly optimum sqrt(2 * save_blocking_s * MTBF)."""
    lost_fraction: float
    """Expected share of wall time lost: save stalls + half an interval + restart per failure."""


def failure_budget(*, gpus: int, save_blocking_s: float, restart_s: float) -> FailureBudget:
    """Interruptions and the checkpoint interval minimising lost time for `gpus` GPUs, at the
    Llama 3 per-GPU interruption rate."""
    rate = LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 24 * LLAMA3_GPUS)  # per GPU-hour
    mtbf_h = 1.0 / (rate * gpus)
    mtbf_s = mtbf_h * 3600
    interval = math.sqrt(2 * max(save_blocking_s, 1e-3) * mtbf_s)
    lost = save_blocking_s / interval + (interval / 2 + restart_s) / mtbf_s
    return FailureBudget(
        gpus=gpus,
        interruptions_per_week=rate * gpus * 168,
        mtbf_hours=mtbf_h,
        save_blocking_s=save_blocking_s,
        restart_s=restart_s,
        interval_s=interval,
        lost_fraction=lost,
    )


def format_failure_budget(fb: FailureBudget, *, step_s: float, configured_interval: int) -> str:
    steps = max(1, round(fb.interval_s / step_s))
    return "\n".join(
        [
            f"failure budget ({fb.gpus} GPUs at the Llama 3 rate of {LLAMA3_INTERRUPTIONS} "
            f"interruptions / {LLAMA3_DAYS} days / {LLAMA3_GPUS:,} GPUs):",
            f"  {fb.interruptions_per_week:.2f} interruptions/week, MTBF {fb.mtbf_hours:.0f} h; "
            f"save stalls the loop {fb.save_blocking_s:.1f} s, restart {fb.restart_s / 60:.0f} min",
            f"  checkpoint every {fb.interval_s / 60:.1f} min = {steps:,} steps (Young/Daly "
            f"sqrt(2 x save x MTBF)); configured checkpoint.interval={configured_interval}; "
            f"expected time lost {fb.lost_fraction:.2%}",
        ]
    )


HOST_COPY_BANDWIDTH = 25e9
"""Bytes/s one GPU copies its checkpoint shard to host memory (an asynchronous save blocks the
loop only for this copy): about half of PCIe Gen5 x16's 64 GB/s per direction. Assumed."""
STORAGE_WRITE_BANDWIDTH = 1e9
"""Bytes/s per GPU a synchronous save writes to the shared file system (8 GB/s per node).
Assumed: measure yours (kfm/checkpoint/README.md) and pass --save-s."""
RESTART_S = 600.0
"""Seconds from an interruption to training again: Slurm's requeue hold (~2 min), start-up,
kfm doctor, checkpoint load, compile warm-up. Assumed."""


def save_blocking_s(local_params: float, *, async_save: bool) -> float:
    """Seconds a checkpoint save stalls the training loop: the rank's fp32 params and AdamW
    state (12 bytes per local parameter) at `HOST_COPY_BANDWIDTH` (async) or
    `STORAGE_WRITE_BANDWIDTH` (sync)."""
    nbytes = 12 * local_params
    return nbytes / (HOST_COPY_BANDWIDTH if async_save else STORAGE_WRITE_BANDWIDTH)
