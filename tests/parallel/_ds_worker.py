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

from kfm.config import load_config, to_dict
from kfm.data import PackedLoader
from kfm.model.transformer import Transformer
from kfm.parallel.deepspeed import DeepSpeedBackend
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import build_optimizer, build_scheduler

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
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
        rank=rank,
        world_size=world,
        verify=cfg.data.verify,
    )
    torch.manual_seed(cfg.train.seed)  # as kfm.train.trainer.build_model: init from the seed only
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.train.steps)
    t0 = time.perf_counter()
    backend = DeepSpeedBackend(
        model, cfg, optimizer=optimizer, scheduler=scheduler, loss_fn=cross_entropy_loss
    )
    t_init = time.perf_counter() - t0
    dtypes = {
        "param": str(next(backend.module.parameters()).dtype),
        "rope": str(backend.module.rope_cos.dtype),
    }
    start = 0
    if args.resume:
        state = backend.load(args.resume, config=to_dict(cfg))
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
        result = backend.step(loader)
        loss = result.loss.clone()
        if dist.is_initialized():  # the global-batch mean, as the trainer logs it
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        record["loss"][step] = loss.item()
        record["grad_norm"][step] = result.grad_norm.item()
        record["lr"][step] = result.lr
        if step in args.save_at:
            backend.save(
                Path(cfg.train.run_root) / cfg.train.name / "checkpoints",
                step,
                trainer_state={"loader": loader.state_dict(), "scheduler": scheduler.state_dict()},
                config=to_dict(cfg),
            )
    record["train_s"] = time.perf_counter() - t0
    # Evaluation through backend.module (every rank: under ZeRO-3 a forward gathers parameters).
    tokens = eval_tokens(cfg.model.vocab_size).to(backend.device)
    with torch.no_grad():
        logits = backend.module.eval()(tokens[:, :-1])
        record["eval_loss"] = cross_entropy_loss(logits, tokens[:, 1:])[0].item()
    if rank == 0:
        Path(args.out).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
