"""One rank of a DeepSpeed test run (started by torchrun from tests/parallel/test_deepspeed.py).

Trains the tiny model with kfm's DeepSpeed backend for --steps optimizer steps (or from --resume to
--steps), saves kfm checkpoints at the --save-at steps, and rank 0 writes the per-step loss, grad
norm and lr to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kfm.config import load_config
from kfm.data import PackedLoader
from kfm.train.backends.deepspeed import DeepSpeedBackend
from kfm.train.dist import world_from_env
from kfm.train.loss import cross_entropy_loss

REPO = Path(__file__).resolve().parents[2]


def eval_tokens(vocab_size: int) -> torch.Tensor:
    """Fixed (2, 65) random tokens on which the test compares the final models."""
    return torch.randint(0, vocab_size, (2, 65), generator=torch.Generator().manual_seed(7))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--resume")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(REPO / "configs" / "tiny.yaml", args.overrides)
    if "MASTER_ADDR" in os.environ:  # under torchrun; a plain process lets the backend start one
        dist.init_process_group("gloo")
    world = world_from_env()
    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
        rank=world.rank,
        world_size=world.world_size,
        verify=cfg.data.verify,
    )
    t0 = time.perf_counter()
    backend = DeepSpeedBackend(cfg, world, torch.device("cpu"))
    t_init = time.perf_counter() - t0
    dtypes = {
        "param": str(next(backend.module.parameters()).dtype),
        "rope": str(backend.module.rope_cos.dtype),
    }
    start = 0
    if args.resume:
        state = backend.load(Path(args.resume))
        loader.load_state_dict(state["loader"])
        start = state["step"]
    record: dict = {
        "start": start,
        "loss": {},
        "grad_norm": {},
        "lr": {},
        "init_s": t_init,
        "dtypes": dtypes,
    }
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.train.steps + 1):
        out = backend.step(loader)
        record["loss"][step] = out.loss.item()  # the global-batch mean, as the trainer logs it
        record["grad_norm"][step] = out.grad_norm.item()
        record["lr"][step] = out.lr
        if step in args.save_at:
            backend.save(step, {"step": step, "loader": loader.state_dict()})
    record["train_s"] = time.perf_counter() - t0
    # Evaluation through backend.module (every rank: under ZeRO-3 a forward gathers parameters).
    tokens = eval_tokens(cfg.model.vocab_size).to(backend.device)
    with torch.no_grad():
        logits = backend.module.eval()(tokens[:, :-1])
        record["eval_loss"] = cross_entropy_loss(logits, tokens[:, 1:])[0].item()
    if world.rank == 0:
        Path(args.out).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
