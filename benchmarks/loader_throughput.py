"""Training-loader throughput: `PackedLoader` tokens/s per rank vs what one B200 consumes at 8B.

One measured step is what training does on the host per micro-batch: ``loader.next_batch()``
(tokens, labels and document ids, (B, T) int64, from a weighted mixture of shard sets) plus the
attention-mask inputs built from the document ids for flash-attn varlen
(``kfm.model.attention.cu_seqlens_from_doc_ids``; timed here on the CPU, in training it runs on
the GPU; flex's block mask is built on the GPU and is not timed). The loader is one rank of a
256-rank job (rank r, world_size 256): it draws the global step of B * 256 samples and reads its
own B windows.

The shard sets are built in a temporary directory with kfm's own `ShardWriter` / `write_manifest`
from synthetic token ids: vocab 128256 (uint32 on disk), three sources with lognormal document
lengths of mean ~1.2-2.1k tokens, ``[bos] + ids + [eos]`` per document like the packer.

    python benchmarks/loader_throughput.py                  # ~320 MB of shards, under a minute
    python benchmarks/loader_throughput.py --tokens 2e8 --batches 1000 --keep /tmp/loader_sets

The loader must stay at least 100x ahead of one GPU: PASS/FAIL compares each setting's tokens/s
(best round, warm page cache, and a round after dropping the shard files from the page cache)
with 100 x 30,624 tokens/s. Writes benchmarks/results/loader_throughput.json (atomically); exits
1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import run_env  # noqa: E402
from kfm.config import DataSourceConfig  # noqa: E402
from kfm.data.loader import PackedLoader  # noqa: E402
from kfm.data.shards import ShardWriter, token_dtype, write_manifest  # noqa: E402
from kfm.fs import atomic_write_text  # noqa: E402
from kfm.model.attention import cu_seqlens_from_doc_ids  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "loader_throughput.json"

# What one GPU consumes: Llama 3 8B pre-training, FP8, 8 x B200, seq 8192, reported by NVIDIA's
# Megatron-Bridge performance summary as 30,624 tokens/s/GPU
# (https://docs.nvidia.com/nemo/megatron-bridge/latest/performance-summary.html). First
# principles agree on the order of magnitude: B200 dense BF16 ~2.25e15 FLOP/s at ~40% MFU over
# 6 * 8e9 FLOP/token (+ attention at seq 8192) is ~17-19k tokens/s; FP8 raises it towards 30k.
# We take the higher, published figure as the reference, so the margin is not flattered.
REFERENCE_TOKENS_PER_S_PER_GPU = 30_624
REFERENCE_SOURCE = (
    "Megatron-Bridge performance summary, Llama 3 8B pre-training, FP8, 8 x B200, seq 8192: "
    "30,624 tokens/s/GPU (https://docs.nvidia.com/nemo/megatron-bridge/latest/"
    "performance-summary.html)"
)
REQUIRED_RATIO = 100.0

VOCAB = 128_256  # Llama 3 vocabulary: > 65536, so uint32 on disk
BOS, EOS = 128_000, 128_001

# (name, share of the tokens, mixture weight, median document length in tokens); lengths are
# lognormal with sigma 1, so the means are 1.65x the medians: ~1.2k / 2.1k / 1.6k tokens.
SOURCES = (
    ("ko_web", 0.50, 0.5, 700),
    ("en_pubmed", 0.30, 0.3, 1300),
    ("ko_medical", 0.20, 0.2, 1000),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=150e6, help="tokens over all sources (x4 bytes)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence T")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2], help="B settings")
    p.add_argument("--world-size", type=int, default=256, help="ranks of the simulated job")
    p.add_argument("--rank", type=int, default=137, help="the rank this process plays")
    p.add_argument("--batches", type=int, default=2000, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (best counts)")
    p.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the loader")
    p.add_argument("--keep", type=Path, default=None, help="build (or reuse) the sets here")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return p.parse_args(argv)


def build_sources(root: Path, total_tokens: int, shard_tokens: int, seed: int) -> list[dict]:
    """Write the synthetic shard sets under ``root`` (reusing complete ones); describe each."""
    out = []
    for i, (name, share, weight, median) in enumerate(SOURCES):
        path = root / name
        mpath = path / "manifest.json"
        if not mpath.is_file():
            rng = np.random.default_rng([seed, i])
            want = int(total_tokens * share)
            with ShardWriter(path, "train", vocab_size=VOCAB, shard_tokens=shard_tokens) as w:
                done = 0
                while done < want:
                    n = int(np.clip(rng.lognormal(np.log(median), 1.0), 8, 65_536))
                    doc = np.empty(n + 2, dtype=np.uint32)
                    doc[0], doc[-1] = BOS, EOS
                    doc[1:-1] = rng.integers(0, BOS, size=n, dtype=np.uint32)
                    w.add_document(doc)
                    done += n + 2
            write_manifest(
                path,
                {
                    "format": "kfm-shards",
                    "version": 1,
                    "dtype": token_dtype(VOCAB).name,
                    "vocab_size": VOCAB,
                    "tokenizer_hash": "0" * 64,
                    "bos_id": BOS,
                    "eos_id": EOS,
                    "sources": [{"name": name, "license": "synthetic", "inputs": []}],
                    "splits": {"train": w.close()},
                    "created_by": "benchmarks/loader_throughput.py",
                },
            )
        split = json.loads(mpath.read_text())["splits"]["train"]
        out.append(
            {
                "name": name,
                "path": str(path),
                "weight": weight,
                "n_tokens": split["n_tokens"],
                "n_docs": split["n_docs"],
                "n_files": len(split["files"]),
                "mean_doc_tokens": split["n_tokens"] / split["n_docs"],
                "bytes": sum(
                    (path / f[k]).stat().st_size for f in split["files"] for k in ("bin", "idx")
                ),
            }
        )
    return out


def drop_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to drop the files' cached pages (no root needed); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def timed_round(loader: PackedLoader, n: int) -> dict[str, object]:
    """n steps of next_batch + cu_seqlens; wall seconds of each part and per-step seconds."""
    step_s, mask_s = [], []
    b, t = loader.micro_batch_size, loader.seq_len
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        batch = loader.next_batch()
        t1 = time.perf_counter()
        cu_seqlens_from_doc_ids(batch.doc_ids)
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        mask_s.append(t2 - t1)
    cpu = time.process_time() - cpu0
    assert batch.tokens.shape == batch.labels.shape == batch.doc_ids.shape == (b, t)
    assert batch.tokens.dtype == batch.doc_ids.dtype == torch.int64
    total = sum(step_s)
    return {
        "seconds": total,
        "tokens_per_s": n * b * t / total,
        # CPU seconds of this process: what other processes on shared cores do not inflate (but
        # also without I/O waits, so only meaningful with the page cache warm).
        "tokens_per_cpu_s": n * b * t / cpu if cpu > 0 else None,
        "mask_share": sum(mask_s) / total,
        "step_ms_p50": 1e3 * statistics.median(step_s),
        "step_ms_p99": 1e3 * float(np.percentile(step_s, 99)),
    }


def measure(cfgs: list[DataSourceConfig], files: list[Path], b: int, args) -> dict[str, object]:
    def make() -> PackedLoader:
        return PackedLoader(
            cfgs,
            seq_len=args.seq_len,
            micro_batch_size=b,
            seed=args.seed,
            rank=args.rank,
            world_size=args.world_size,
            verify="size",
        )

    t0 = time.perf_counter()
    loader = make()
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loader.next_batch()  # builds each source's permutation
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        loader.next_batch()
    rounds = [timed_round(loader, args.batches) for _ in range(args.rounds)]
    best = max(rounds, key=lambda r: float(r["tokens_per_s"]))  # type: ignore[arg-type]
    # Cold: a fresh loader (fresh mappings) after dropping the shard files from the page cache,
    # so every window is a read from this machine's disk (a shared file system differs).
    cold = None
    if drop_page_cache(files):
        loader = make()
        cold = timed_round(loader, args.batches)
    tps = float(best["tokens_per_s"])  # type: ignore[arg-type]
    worst = min(tps, float(cold["tokens_per_s"])) if cold else tps  # type: ignore[arg-type]
    return {
        "micro_batch_size": b,
        "tokens_per_s_per_rank": tps,
        "tokens_per_s_per_rank_median_round": statistics.median(
            float(r["tokens_per_s"])  # type: ignore[arg-type]
            for r in rounds
        ),
        "tokens_per_cpu_s_per_rank": best["tokens_per_cpu_s"],
        "tokens_per_s_per_rank_cold_cache": cold["tokens_per_s"] if cold else None,
        "ratio_to_reference": tps / REFERENCE_TOKENS_PER_S_PER_GPU,
        "ratio_to_reference_cold_cache": (
            float(cold["tokens_per_s"]) / REFERENCE_TOKENS_PER_S_PER_GPU  # type: ignore[arg-type]
            if cold
            else None
        ),
        "pass": worst >= REQUIRED_RATIO * REFERENCE_TOKENS_PER_S_PER_GPU,
        "open_seconds": open_s,
        "first_batch_seconds": first_s,
        "rounds": rounds,
        "cold_round": cold,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    tmp = None
    if args.keep is None:
        tmp = tempfile.mkdtemp(prefix="kfm_loader_bench_")
    root = args.keep or Path(tmp)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        sources = build_sources(root, int(args.tokens), args.shard_tokens, args.seed)
        build_s = time.perf_counter() - t0
        print(f"shard sets: {sum(s['bytes'] for s in sources) / 1e6:.0f} MB in {build_s:.1f} s")
        cfgs = [
            DataSourceConfig(name=s["name"], path=s["path"], weight=s["weight"]) for s in sources
        ]
        files = sorted(
            p for s in sources for p in Path(s["path"]).iterdir() if p.suffix in (".bin", ".idx")
        )
        results = {}
        for b in args.micro_batch_sizes:
            print(f"micro_batch_size={b} ...", flush=True)
            results[f"micro_batch_size_{b}"] = measure(cfgs, files, b, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "benchmark": "loader_throughput",
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": {
            "tokens_per_s_per_gpu": REFERENCE_TOKENS_PER_S_PER_GPU,
            "source": REFERENCE_SOURCE,
            "required_ratio": REQUIRED_RATIO,
        },
        "setting": {
            "seq_len": args.seq_len,
            "world_size": args.world_size,
            "rank": args.rank,
            "vocab_size": VOCAB,
            "dtype": token_dtype(VOCAB).name,
            "shard_tokens": args.shard_tokens,
            "batches_per_round": args.batches,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "seed": args.seed,
            "build_seconds": build_s,
            "sources": [{k: v for k, v in s.items() if k != "path"} for s in sources],
            "timed": "next_batch() + cu_seqlens_from_doc_ids(doc_ids) on CPU",
        },
        "results": results,
        "pass": all(r["pass"] for r in results.values()),
        "env": run_env(load_at_start),
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print_table(payload)
    print(f"wrote {args.out}")
    return payload


def print_table(payload: dict) -> None:
    s = payload["setting"]
    ref = payload["reference"]["tokens_per_s_per_gpu"]
    print(
        f"\nseq_len={s['seq_len']} rank {s['rank']} of world_size={s['world_size']}, "
        f"{len(s['sources'])} sources, vocab {s['vocab_size']} ({s['dtype']}); "
        f"reference {ref:,} tokens/s/GPU (Llama 3 8B, FP8, B200), required {REQUIRED_RATIO:.0f}x"
    )
    print(
        f"{'B':>3} {'tokens/s/rank':>14} {'x ref':>8} {'per CPU s':>12} {'cold tok/s':>12} "
        f"{'x ref':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'mask %':>7} {'open s':>7} {'1st s':>6}  verdict"
    )
    for r in payload["results"].values():
        best = max(r["rounds"], key=lambda x: x["tokens_per_s"])
        cold = r["tokens_per_s_per_rank_cold_cache"]
        cold_ratio = r["ratio_to_reference_cold_cache"]
        print(
            f"{r['micro_batch_size']:>3} {r['tokens_per_s_per_rank']:>14,.0f} "
            f"{r['ratio_to_reference']:>7.0f}x "
            f"{r['tokens_per_cpu_s_per_rank'] or 0:>12,.0f} "
            f"{(f'{cold:,.0f}' if cold else '-'):>12} "
            f"{(f'{cold_ratio:.0f}x' if cold_ratio else '-'):>7} "
            f"{best['step_ms_p50']:>7.3f} {best['step_ms_p99']:>7.3f} "
            f"{100 * best['mask_share']:>6.1f}% {r['open_seconds']:>7.3f} "
            f"{r['first_batch_seconds']:>6.3f}  {'PASS' if r['pass'] else 'FAIL'}"
        )
    print(f"overall: {'PASS' if payload['pass'] else 'FAIL'} (>= {REQUIRED_RATIO:.0f}x {ref:,})")


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)
