"""Time to target: the Hugging Face Trainer's AdamW/cosine baseline against kfm's recommended recipe.

Both sides train the same model shape (configs/quickstart.yaml's), with the same tokenizer, on the
same stream of packed training windows (kfm's ``PackedLoader`` with the same seed feeds both), in
fp32 on the same CPU threads:

- **baseline**: transformers ``LlamaForCausalLM`` (its own initialisation) trained by ``Trainer``
  with the settings of the Hugging Face course's "train a causal language model from scratch"
  chapter, which is what a user starting from the docs picks: AdamW (torch), lr 5e-4, cosine,
  weight decay 0.1, warm-up, gradient clipping 1.0. It trains ``--baseline-steps`` steps; its final
  validation bits per byte is the **target**.
- **kfm**: ``kfm train`` on configs/quickstart.yaml's recipe (the recommended one; see
  docs/training.md, "Recommended recipe") for ``--kfm-steps`` steps, a checkpoint every
  ``--every`` steps.
- **ablations**: the recipe with one technique switched back to the baseline's choice
  (``ABLATIONS``; Muon and the lr get twice the steps), and **additions**: the recipe plus one
  technique it leaves out (``ADDITIONS``).
- **control**: kfm with the baseline's settings (AdamW, its lr, betas and warm-up, cosine to 0,
  tied head, no QK-norm, plain causal attention) for ``--baseline-steps``: its time to target
  should be about 1x, which checks that both sides see the same data at the same speed.

Every side is scored by the same code: the model is written as a Hugging Face folder (the
baseline by ``Trainer.save_model``, kfm's checkpoints by ``kfm export``), loaded with
``transformers.AutoModelForCausalLM`` and run over kfm's validation windows by
``kfm.train.validation.evaluate`` (plain causal attention over each window for both). A kfm run's
time to target is its training seconds (``train_s`` in metrics.jsonl: evaluation, checkpoints
and export excluded) at its first checkpoint at or below the target, found by scoring the last
checkpoint and bisecting (bits per byte falls with the steps; the checkpoint before the one found
is scored too, and is above the target); the baseline's is the sum of ``Trainer``'s step times.
The speed-up is the baseline's seconds over that. A run that does not reach the target within
its steps has no ratio, only an upper bound (the baseline's seconds over its whole run).

    python benchmarks/time_to_target.py                 # ~25-30 min on 2 idle cores
    python benchmarks/time_to_target.py --ablations "" --additions "" --no-control  # ~8 min

Writes benchmarks/results/time_to_target.json (``--out``). Run it on an idle machine: the
ratios are ratios of seconds, and other processes on the cores change them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import run_env  # noqa: E402
from kfm.fs import atomic_write_text  # noqa: E402

# Library download/load bars would interleave with the table; nothing is downloaded.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_OUT = REPO / "benchmarks" / "results" / "time_to_target.json"
PRESET = REPO / "configs" / "quickstart.yaml"
DATA_CONFIG = REPO / "configs" / "data" / "quickstart.yaml"

BASELINE: dict[str, Any] = {
    # The Hugging Face course, chapter 7 "Training a causal language model from scratch":
    # TrainingArguments(learning_rate=5e-4, lr_scheduler_type="cosine", weight_decay=0.1,
    # warmup_steps=...); AdamW with transformers' default betas (0.9, 0.999) and clipping 1.0.
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.1,
    "warmup_fraction": 0.05,
    "max_grad_norm": 1.0,
}

# Each technique of the recipe (configs/quickstart.yaml) and the overrides that switch it back
# to the baseline's choice; the number is the ablation's step budget in units of --kfm-steps (the
# ones that slow training most get more, so that they can still reach the target).
ABLATIONS: dict[str, tuple[list[str], int]] = {
    # Muon off = AdamW on every matrix at AdamW's own lr for this model (3e-3, the quickstart's
    # before Muon); "muon_same_lr" keeps Muon's 6e-3, which is too high for AdamW.
    "muon": (["--optim.name=adamw", "--optim.lr=3e-3"], 2),
    "muon_same_lr": (["--optim.name=adamw"], 2),
    "lr": ([f"--optim.lr={BASELINE['learning_rate']}"], 2),
    "wsd": (["--schedule.name=cosine", "--schedule.min_lr_ratio=0.0"], 1),
    "zero_init": (["--model.zero_init_output=false", "--model.zero_init_head=false"], 1),
    "qk_norm": (["--model.qk_norm=false"], 1),
    "untied_head": (["--model.tie_embeddings=true", "--model.zero_init_head=false"], 1),
    "document_masking": (["--model.document_masking=false"], 1),
}

# Techniques kfm has that the recipe leaves out, measured the same way (recipe + the technique).
ADDITIONS: dict[str, list[str]] = {
    # A ramp must start at a multiple of the micro-batch: 4 sequences, to the full 16 by step 31.
    "batch_ramp": [
        "--train.micro_batch_size=4",
        "--train.batch_ramp_start=4",
        "--train.batch_ramp_steps=30",
    ],
    "z_loss": ["--optim.z_loss=1e-4"],
}


def control_overrides(steps: int) -> list[str]:
    """kfm with the baseline's settings: its optimizer, lr, schedule and plain architecture. Its
    time to target against the Trainer's checks the comparison itself (same data, same speed)."""
    return [
        "--optim.name=adamw",
        f"--optim.lr={BASELINE['learning_rate']}",
        "--optim.betas=[0.9,0.999]",
        f"--optim.weight_decay={BASELINE['weight_decay']}",
        f"--optim.grad_clip={BASELINE['max_grad_norm']}",
        "--optim.z_loss=0.0",
        "--schedule.name=cosine",
        "--schedule.min_lr_ratio=0.0",
        f"--schedule.warmup_steps={max(1, round(steps * BASELINE['warmup_fraction']))}",
        "--train.batch_ramp_start=0",
        "--train.batch_ramp_steps=0",
        "--train.ema_decay=0.0",
        "--model.zero_init_output=false",
        "--model.zero_init_head=false",
        "--model.qk_norm=false",
        "--model.tie_embeddings=true",
        "--model.document_masking=false",
        "--model.logit_softcap=0.0",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--baseline-steps", type=int, default=400, help="Trainer steps (sets the target)"
    )
    p.add_argument("--kfm-steps", type=int, default=100, help="steps of the kfm recipe run")
    p.add_argument("--every", type=int, default=5, help="kfm checkpoint (and score) interval")
    p.add_argument(
        "--score-from",
        type=float,
        default=0.2,
        help="candidate checkpoints start at this fraction of a kfm run",
    )
    p.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help=f"comma-separated techniques to switch off in turn, of: {', '.join(ABLATIONS)}",
    )
    p.add_argument(
        "--additions",
        default=",".join(ADDITIONS),
        help=f"comma-separated techniques to add to the recipe in turn, of: {', '.join(ADDITIONS)}",
    )
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control run (kfm with the baseline's settings, --baseline-steps steps)",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every kfm checkpoint (by default only the scored ones' exports are kept)",
    )
    p.add_argument(
        "--preset",
        type=Path,
        default=PRESET,
        help="kfm's recipe: the preset whose model, optim, schedule and train settings kfm runs",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    p.add_argument(
        "--data",
        type=Path,
        default=REPO / "runs" / "quickstart" / "data" / "train.yaml",
        help="train.yaml written by `kfm data run configs/data/quickstart.yaml` (run first if "
        "missing)",
    )
    p.add_argument(
        "--work", type=Path, default=REPO / "runs" / "time_to_target", help="runs and exports"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument(
        "kfm_overrides", nargs="*", help="extra --section.key=value overrides for every kfm run"
    )
    return p.parse_args(argv)


@dataclass
class Curve:
    """One side's scored checkpoints: (step, training seconds, validation bits per byte)."""

    name: str
    steps: int
    points: list[tuple[int, float, float]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def final_bpb(self) -> float:
        return self.points[-1][2]

    @property
    def train_s(self) -> float:
        return self.points[-1][1]

    def time_to(self, target: float) -> tuple[int, float] | None:
        """(step, training seconds) of the first scored point at or below ``target``."""
        for step, seconds, bpb in self.points:
            if bpb <= target:
                return step, seconds
        return None


def recipe_config(preset: Path, data_yaml: Path, out: Path) -> Path:
    """``preset`` (the recipe: model, optim, schedule, train) with ``data_yaml``'s data sources
    and tokenizer, written to ``out``: the recipe measured is always the preset's current one,
    even when the curated data was written from an older version of it."""
    from kfm.config.loader import deep_merge, read_yaml

    data = read_yaml(data_yaml)
    merged = deep_merge(
        read_yaml(preset),
        {"data": {"sources": data["data"]["sources"]}, "tokenizer": data["tokenizer"]},
    )
    out.write_text(yaml.safe_dump(merged, sort_keys=False))
    return out


def ensure_data(train_yaml: Path) -> Path:
    if not train_yaml.is_file():
        print(f"== curating the sample: {train_yaml} is missing", flush=True)
        subprocess.run(
            [sys.executable, "-m", "kfm_cli", "data", "run", str(DATA_CONFIG), "--overwrite"],
            cwd=REPO,
            check=True,
        )
    return train_yaml


class Scorer:
    """kfm's validation bits per byte of a Hugging Face folder, loaded by transformers."""

    def __init__(self, train_yaml: Path) -> None:
        from kfm.config import load_config
        from kfm.data import validation_batches
        from kfm.tokenizer import load_tokenizer, token_byte_lengths

        cfg = load_config(train_yaml)
        tok = load_tokenizer(cfg.tokenizer.path)
        self.sources = cfg.data.sources
        self.token_bytes = token_byte_lengths(tok)
        self.bos_id = tok.bos_token_id
        self.batches = validation_batches(
            cfg.data.sources,
            seq_len=cfg.data.seq_len,
            micro_batch_size=16,
            n_batches=1_000,  # all of the val split: the set never wraps
            verify="size",
        )

    def __call__(self, folder: Path) -> float:
        from torch import nn
        from transformers import AutoModelForCausalLM

        from kfm.train.validation import evaluate

        class Plain(nn.Module):
            def __init__(self, hf: nn.Module) -> None:
                super().__init__()
                self.hf = hf

            def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
                return self.hf(input_ids=tokens).logits  # plain causal for both sides

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        metrics = evaluate(
            Plain(hf),
            self.batches,
            token_bytes=self.token_bytes,
            bos_id=self.bos_id,
            device=torch.device("cpu"),
            sources=self.sources,
        )
        return float(metrics["val_bpb"])


class Windows(torch.utils.data.IterableDataset):
    """kfm's training stream for the Trainer, window by window: ``PackedLoader`` with the run's
    sources, seed and global batch (the order a 1-process kfm run reads), ``steps`` global
    batches. ``input_ids`` = the T + 1 tokens of a window, so that the Trainer's shifted loss
    has the same T targets as kfm's step."""

    def __init__(self, cfg: Any, steps: int) -> None:
        self.cfg, self.steps = cfg, steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from kfm.data import PackedLoader

        cfg = self.cfg
        loader = PackedLoader(
            cfg.data.sources,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.global_batch_size,
            seed=cfg.data.seed,
            verify="size",
        )
        for _ in range(self.steps):
            b = loader.next_batch()
            for row in torch.cat([b.tokens, b.labels[:, -1:]], dim=1):
                yield {"input_ids": row, "labels": row}


def run_baseline(train_yaml: Path, steps: int, out_dir: Path, threads: int) -> tuple[Path, float]:
    """Train the Trainer baseline; returns (HF folder, training seconds)."""
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from kfm.config import load_config
    from kfm.export import hf_config
    from kfm.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    cfg = load_config(train_yaml)
    tok = load_tokenizer(cfg.tokenizer.path)
    # The quickstart's shape as a plain Llama: the recipe's architecture options are kfm's side.
    shape = cfg.model
    shape.qk_norm, shape.tie_embeddings, shape.logit_softcap = False, True, 0.0
    config = hf_config(
        shape, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id
    )
    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]
    batch = cfg.train.global_batch_size

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.train_s, self._t0 = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.train_s += time.perf_counter() - self._t0

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=BASELINE["learning_rate"],
        lr_scheduler_type=BASELINE["lr_scheduler_type"],
        weight_decay=BASELINE["weight_decay"],
        warmup_steps=max(1, round(steps * BASELINE["warmup_fraction"])),
        max_grad_norm=BASELINE["max_grad_norm"],
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Windows(cfg, steps), callbacks=[clock])
    trainer.train()
    folder = out_dir / "hf"
    trainer.save_model(str(folder))
    return folder, clock.train_s


def run_kfm(
    name: str,
    train_yaml: Path,
    overrides: list[str],
    *,
    steps: int,
    every: int,
    score_from: float,
    work: Path,
    threads: int,
    score: Scorer,
    target: float,
    keep_checkpoints: bool = False,
) -> Curve:
    """Train the kfm recipe with ``overrides`` and score its checkpoints (every ``every`` steps
    from ``score_from`` of the run on): the last one, and if it is at or below ``target``, a
    bisection for the first that is."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "kfm_cli",
        "-q",
        "train",
        str(train_yaml),
        f"--train.name={name}",
        f"--train.run_root={work}",
        f"--train.steps={steps}",
        "--checkpoint.resume=never",
        f"--checkpoint.interval={every}",
        f"--checkpoint.keep_last={steps // every + 1}",
        "--checkpoint.async_save=false",
        f"--logging.interval={math.gcd(every, 10)}",
        "--logging.tensorboard=false",
        "--logging.progress_bar=false",
        "--eval.interval=0",
        "--eval.tasks=[]",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"== kfm {name}: {' '.join(overrides) or 'recipe'}", flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    train_s = {
        r["step"]: r["train_s"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "train_s" in r
    }
    curve = Curve(name, steps, overrides=overrides)
    first = max(every, math.ceil(steps * score_from / every) * every)
    candidates = list(range(first, steps + 1, every))
    scored: dict[int, float] = {}

    def at(i: int) -> float:
        step = candidates[i]
        ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
        folder = work / "exports" / name / ckpt.name
        export(ckpt, folder)
        scored[step] = score(folder)
        print(f"   step {step}: {train_s[step]:.1f} s, val bpb {scored[step]:.4f}", flush=True)
        return scored[step]

    # The last checkpoint, then a bisection for the first one at or below the target: bits per
    # byte falls with the steps, so the checkpoint found is the first at or below it and the
    # one before it (also scored) is above it.
    lo, hi = 0, len(candidates) - 1
    if at(hi) <= target:
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
    curve.points = [(step, train_s[step], scored[step]) for step in sorted(scored)]
    if not keep_checkpoints:  # the scored ones are exported; the rest are not needed
        shutil.rmtree(run_dir / "checkpoints")
    return curve


def export(ckpt: Path, folder: Path) -> None:
    from kfm_cli.main import main as kfm_main

    folder.parent.mkdir(parents=True, exist_ok=True)
    code = kfm_main(["-q", "export", str(ckpt), str(folder), "--overwrite", "--no-verify"])
    if code:
        raise RuntimeError(f"kfm export {ckpt} failed (exit {code})")


def ratio(baseline_s: float, curve: Curve, target: float) -> dict[str, Any]:
    hit = curve.time_to(target)
    return {
        "name": curve.name,
        "overrides": curve.overrides,
        "steps": curve.steps,
        "points": [{"step": s, "train_s": t, "val_bpb": b} for s, t, b in curve.points],
        "final_val_bpb": curve.final_bpb,
        "train_s": curve.train_s,
        "reached_at_step": hit[0] if hit else None,
        "seconds_to_target": hit[1] if hit else None,
        "speedup": baseline_s / hit[1] if hit else None,
    }


def table(rows: list[dict[str, Any]], target: float, baseline_s: float) -> str:
    lines = [
        f"target: the baseline's final validation bits/byte, {target:.4f}, after "
        f"{baseline_s:.1f} s of training",
        "| run | steps | final val bpb | reached at step | train s to target | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['name']} | {r['steps']} | {r['final_val_bpb']:.4f} |"
        if r["reached_at_step"] is None:
            # Not reached within its steps: slower than its whole run, so at most this ratio.
            lines.append(f"{head} not reached | - | < {baseline_s / r['train_s']:.2f}x |")
        else:
            lines.append(
                f"{head} {r['reached_at_step']} | {r['seconds_to_target']:.1f} | "
                f"{r['speedup']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    ablations = [a for a in args.ablations.split(",") if a]
    additions = [a for a in args.additions.split(",") if a]
    for flag, given, known in (
        ("--ablations", ablations, ABLATIONS),
        ("--additions", additions, ADDITIONS),
    ):
        if unknown := [a for a in given if a not in known]:
            raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    args.work.mkdir(parents=True, exist_ok=True)
    train_yaml = recipe_config(args.preset, ensure_data(args.data), args.work / "train.yaml")
    score = Scorer(train_yaml)

    print(f"== baseline: transformers Trainer, {args.baseline_steps} steps", flush=True)
    folder, baseline_s = run_baseline(
        train_yaml, args.baseline_steps, args.work / "baseline", args.threads
    )
    target = score(folder)
    print(f"   {baseline_s:.1f} s of training, val bpb {target:.4f} (the target)", flush=True)

    common = dict(
        every=args.every,
        score_from=args.score_from,
        work=args.work,
        threads=args.threads,
        score=score,
        target=target,
        keep_checkpoints=args.keep_checkpoints,
    )
    rows = [
        ratio(
            baseline_s,
            run_kfm("recipe", train_yaml, list(args.kfm_overrides), steps=args.kfm_steps, **common),
            target,
        )
    ]
    for technique in ablations:
        overrides, budget = ABLATIONS[technique]
        curve = run_kfm(
            f"no_{technique}",
            train_yaml,
            [*args.kfm_overrides, *overrides],
            steps=budget * args.kfm_steps,
            **common,
        )
        rows.append(ratio(baseline_s, curve, target))
    for technique in additions:
        curve = run_kfm(
            f"plus_{technique}",
            train_yaml,
            [*args.kfm_overrides, *ADDITIONS[technique]],
            steps=args.kfm_steps,
            **common,
        )
        rows.append(ratio(baseline_s, curve, target))
    if args.control:
        curve = run_kfm(
            "control",
            train_yaml,
            [*args.kfm_overrides, *control_overrides(args.baseline_steps)],
            steps=args.baseline_steps,
            **common,
        )
        rows.append(ratio(baseline_s, curve, target))
    text = table(rows, target, baseline_s)
    print(text)
    result: dict[str, Any] = {
        "benchmark": "time_to_target",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": {
            "steps": args.baseline_steps,
            "train_s": baseline_s,
            "val_bpb": target,
            "settings": BASELINE,
        },
        "runs": rows,
        "table": text,
        "wall_s": time.perf_counter() - started,
        "env": run_env(load_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
