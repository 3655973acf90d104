"""`kfm plan --search`: every layout of a config on an allocation, ranked by predicted tokens/s.

A layout is (dp_replicate x dp_shard x tp, micro-batch, activation checkpointing, fp8 recipe);
the model, sequence length and global batch stay the config's. Each candidate is either ranked
(it fits the memory budget) or rejected with its reason: divisibility (tp must divide the heads,
the global batch must split into micro-batches over the data-parallel ranks), placement (tp
larger than an NVLink domain) or memory (the estimate exceeds the budget). Memory uses the analytic
sharding (equal to the fake-process-group one, tests/parallel/test_plan.py), so hundreds of
candidates take seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kfm.config import Config, ConfigError
from kfm.parallel.plan import GIB, _shards_analytic, estimate_memory, param_specs
from kfm.plan.model import Allocation, Prediction, predict


@dataclass(slots=True)
class Candidate:
    mesh: tuple[int, int, int]
    micro_batch_size: int
    ac: str
    fp8: str
    cfg: Config | None = None
    prediction: Prediction | None = None
    memory_gib: float | None = None
    rejected: str | None = None
    """Why it cannot run (None: it fits)."""

    def label(self) -> str:
        r, s, t = self.mesh
        return f"{r}x{s}x{t} mb={self.micro_batch_size} ac={self.ac} fp8={self.fp8}"

    def overrides(self) -> str:
        """The dotted flags that turn the searched config into this layout."""
        r, s, t = self.mesh
        flags = [
            f"--parallel.dp_replicate={r}",
            f"--parallel.dp_shard={s}",
            f"--parallel.tp={t}",
            f"--train.micro_batch_size={self.micro_batch_size}",
            f"--parallel.ac={self.ac}",
            f"--parallel.fp8={self.fp8}",
        ]
        if self.fp8 == "tensorwise" and s > 1:
            flags.append("--parallel.fp8_all_gather=true")
        return " ".join(flags)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fp8_recipes(alloc: Allocation) -> list[str]:
    """The parallel.fp8 values the GPU can run (mxfp8 needs Blackwell's block-scaled GEMMs)."""
    if "fp8" not in alloc.gpu.peak_flops:
        return ["none"]
    recipes = ["none", "tensorwise", "rowwise"]
    if alloc.gpu.generation.name == "blackwell":
        recipes.append("mxfp8")
    return recipes


def search(cfg: Config, alloc: Allocation) -> list[Candidate]:
    """Every candidate layout, fitting ones first by predicted tokens/s (best first), then the
    rejected ones."""
    world = alloc.world_size
    m = cfg.model
    kv = m.n_kv_heads or m.n_heads
    specs = param_specs(cfg)
    out: list[Candidate] = []
    micro_sizes = [b for b in _divisors(cfg.train.global_batch_size) if b <= 64]
    for tp in _divisors(world):
        across = tp > max(alloc.gpu.nvlink_domain, alloc.gpus_per_node)
        if across and tp > 2 * alloc.gpus_per_node:
            continue  # listed once below (the smallest such tp), not for every size
        for shard in _divisors(world // tp):
            mesh = (world // tp // shard, shard, tp)
            shards = None
            for mb in micro_sizes:
                for ac in ("none", "selective", "full"):
                    for fp8 in fp8_recipes(alloc):
                        c = Candidate(mesh=mesh, micro_batch_size=mb, ac=ac, fp8=fp8)
                        out.append(c)
                        if across:
                            c.rejected = (
                                f"placement: tp={tp} spans more than one NVLink domain "
                                f"({alloc.gpu.nvlink_domain} GPUs): its per-block collectives "
                                "would cross the network"
                            )
                            continue
                        if m.n_heads % tp or kv % tp:
                            c.rejected = (
                                f"divisibility: tp={tp} must divide n_heads={m.n_heads} and "
                                f"n_kv_heads={kv}"
                            )
                            continue
                        if cfg.train.global_batch_size % (mb * mesh[0] * shard):
                            c.rejected = (
                                f"divisibility: global_batch_size={cfg.train.global_batch_size} "
                                f"is not a multiple of micro-batch {mb} x data-parallel "
                                f"{mesh[0] * shard}"
                            )
                            continue
                        c.cfg = dataclasses.replace(
                            cfg,
                            parallel=dataclasses.replace(
                                cfg.parallel,
                                dp_replicate=mesh[0],
                                dp_shard=shard,
                                tp=tp,
                                ac=ac,
                                fp8=fp8,  # type: ignore[arg-type]
                                fp8_all_gather=fp8 == "tensorwise" and shard > 1,
                            ),
                            train=dataclasses.replace(cfg.train, micro_batch_size=mb),
                        )
                        try:
                            if shards is None:
                                shards = _shards_analytic(c.cfg, mesh, specs)
                            mem = estimate_memory(c.cfg, mesh, shards, gpu=alloc.gpu)
                            c.prediction = predict(c.cfg, alloc)
                        except (ConfigError, ValueError) as e:
                            c.rejected = f"divisibility: {e}"
                            continue
                        c.memory_gib = mem.total / GIB
                        if not mem.fits:
                            c.rejected = (
                                f"memory: {mem.total / GIB:.1f} GiB > budget "
                                f"{mem.budget / GIB:.1f} GiB"
                            )
    fits = [c for c in out if c.rejected is None and c.prediction is not None]
    fits.sort(key=lambda c: -c.prediction.tokens_per_s if c.prediction else 0.0)
    return fits + [c for c in out if c.rejected is not None]


def format_search(cands: list[Candidate], *, top: int = 15) -> str:
    """The ranked table (best `top` layouts) and the rejections, grouped by reason."""
    fits = [c for c in cands if c.rejected is None]
    rejected = [c for c in cands if c.rejected is not None]
    lines = [
        f"{len(cands)} layouts: {len(fits)} fit, {len(rejected)} rejected; best {min(top, len(fits))}"
        " by predicted tokens/s:",
        f"  {'#':>3} {'layout (replicate x shard x tp)':<44} {'step s':>7} {'tok/s/GPU':>10} "
        f"{'MFU':>6} {'GiB':>6}",
    ]
    for i, c in enumerate(fits[:top], 1):
        p = c.prediction
        assert p is not None and c.memory_gib is not None
        lines.append(
            f"  {i:>3} {c.label():<44} {p.step_s:>7.2f} {p.tokens_per_s_per_gpu:>10,.0f} "
            f"{p.mfu:>6.1%} {c.memory_gib:>6.1f}"
        )
    if fits:
        lines.append(f"  best: {fits[0].overrides()}")
    by_reason: dict[str, list[Candidate]] = {}
    for c in rejected:
        assert c.rejected is not None
        by_reason.setdefault(c.rejected.split(":")[0], []).append(c)
    for reason, group in by_reason.items():
        lines.append(f"rejected for {reason}: {len(group)}, e.g.")
        lines += [f"  {c.label()}: {c.rejected}" for c in group[:3]]
    return "\n".join(lines)


def search_dict(cands: list[Candidate]) -> list[dict]:
    """JSON rows of `search`'s result, in its order."""
    rows = []
    for c in cands:
        p = c.prediction
        rows.append(
            {
                "dp_replicate": c.mesh[0],
                "dp_shard": c.mesh[1],
                "tp": c.mesh[2],
                "micro_batch_size": c.micro_batch_size,
                "ac": c.ac,
                "fp8": c.fp8,
                "fits": c.rejected is None,
                "rejected": c.rejected,
                "memory_gib": c.memory_gib,
                "step_s": p.step_s if p else None,
                "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu if p else None,
                "mfu": p.mfu if p else None,
                "overrides": c.overrides(),
            }
        )
    return rows
