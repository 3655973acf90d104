"""Data-parallel scaling on CPU: tokens/s and memory per rank at 1, 2, 4 processes, FSDP2 vs
DeepSpeed ZeRO-3, through the real `kfm train` under torchrun on gloo.

    python benchmarks/scaling_cpu.py                       # packs a small corpus, then runs
    python benchmarks/scaling_cpu.py --procs 1 2 --steps 12

These are CPU figures for catching regressions in the distributed paths (communication overhead,
memory per rank), not GPU claims: on 2 cores, 4 processes oversubscribe the machine. Each run
uses the same global batch, so tokens/s compares like with like. Writes
benchmarks/results/scaling_cpu.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kfm.fs import atomic_write_text  # noqa: E402
from tests.conftest import pack_tiny_sources, tiny_overrides  # noqa: E402


def run(backend: str, procs: int, args: argparse.Namespace, sources: list[dict], root: Path):
    """One `kfm train` under torchrun; returns (median tokens/s after warm-up, peak GiB rank 0)."""
    name = f"{backend}_{procs}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={procs}", "-m", "kfm_cli", "train", "configs/tiny.yaml",
        *tiny_overrides(sources, root, name),
        f"--parallel.backend={backend}", f"--train.steps={args.steps}",
        f"--train.global_batch_size={args.global_batch}", "--train.micro_batch_size=2",
        f"--data.seq_len={args.seq_len}", f"--model.max_seq_len={args.seq_len}",
        f"--model.d_model={args.d_model}", f"--model.n_layers={args.n_layers}",
        "--eval.interval=0", "--checkpoint.interval=0", "--logging.interval=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    records = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s_global" in r][args.warmup :]
    return (
        statistics.median(r["tokens_per_s_global"] for r in steps),
        max(r["peak_memory_gb"] for r in steps),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("--backends", nargs="+", default=["fsdp", "deepspeed"], help="backends")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all ranks")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--n-layers", type=int, default=4, help="blocks")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to share")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/scaling_cpu.json"))
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = pack_tiny_sources(root)
        for procs in args.procs:
            for backend in args.backends:
                tps, mem = run(backend, procs, args, sources, root)
                results.append(
                    {
                        "backend": backend,
                        "procs": procs,
                        "tokens_per_second": tps,
                        "peak_memory_gb_rank0": mem,
                    }
                )
                print(
                    f"{backend:10s} procs={procs}  {tps:9.0f} tok/s  {mem:6.2f} GiB (rank 0)",
                    flush=True,
                )
    base = {r["backend"]: r["tokens_per_second"] for r in results if r["procs"] == args.procs[0]}
    print("\nbackend     procs   tok/s   vs 1st   GiB/rank")
    for r in results:
        ratio = r["tokens_per_second"] / base[r["backend"]]
        r["speedup_vs_first"] = ratio
        print(
            f"{r['backend']:10s} {r['procs']:5d} {r['tokens_per_second']:8.0f} {ratio:7.2f}x "
            f"{r['peak_memory_gb_rank0']:9.2f}"
        )
    for procs in args.procs:
        pair = {r["backend"]: r["tokens_per_second"] for r in results if r["procs"] == procs}
        if {"fsdp", "deepspeed"} <= pair.keys():
            print(
                f"procs={procs}: FSDP2 / DeepSpeed ZeRO-3 = {pair['fsdp'] / pair['deepspeed']:.2f}x"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
