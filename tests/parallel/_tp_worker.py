"""Worker for the tensor-parallel parity tests: a tiny model, fixed tokens, a few AdamW steps.

Run under torchrun (TP, or FSDP2 x TP on a 2-D mesh) or called in-process as the single-process
reference (`train_tiny(...)` without a process group). Both consume the same global batch per
step, built from a fixed seed, with random document boundaries so document masking is exercised.

    torchrun --nproc-per-node 2 tests/parallel/_tp_worker.py --tp 2 --out result.pt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kfm.config import ModelConfig, ParallelConfig
from kfm.model.transformer import Transformer
from kfm.parallel.ac import apply_ac
from kfm.parallel.compile import apply_compile
from kfm.parallel.tp import apply_tp, local_loss, loss_parallel_context
from kfm.train.loss import cross_entropy_loss

GLOBAL_BATCH = 4
SEQ_LEN = 64
VOCAB = 256


def tiny_model_config(*, tie_embeddings: bool = True, qk_norm: bool = False) -> ModelConfig:
    """configs/tiny.yaml's shape (d_model 64, 2 layers, 4 heads, 2 kv heads) with a small vocab."""
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=SEQ_LEN,
        attn_backend="sdpa",
        tie_embeddings=tie_embeddings,
        qk_norm=qk_norm,
    )


def fixed_batches(steps: int, seed: int = 1234) -> list[tuple[torch.Tensor, ...]]:
    """(tokens, labels, doc_ids) per step, each (GLOBAL_BATCH, SEQ_LEN); ~3 documents per row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
        starts = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.05
        starts[:, 0] = False
        doc_ids = starts.long().cumsum(dim=1)
        out.append((seq[:, :-1], seq[:, 1:], doc_ids))
    return out


def train_tiny(
    *,
    steps: int = 10,
    tp: int = 1,
    dp: int = 1,
    loss_parallel: bool = False,
    tie_embeddings: bool = True,
    qk_norm: bool = False,
    ac: str = "none",
    compile: bool = False,
) -> dict:
    """Train from seed 0 for `steps` fp32 AdamW steps (grad clip 1.0); return losses and weights.

    With a process group: mesh (dp, tp); parallelize's order: TP via apply_tp, then activation
    checkpointing (ac) and per-block compile when asked, then FSDP2 via apply_fsdp on the dp dim;
    each dp rank takes GLOBAL_BATCH / dp rows. Returns {"losses": [global mean loss per step],
    "weights": {name: full fp32 tensor}, "initial": the same before training} (gathered on
    every rank).
    """
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(tie_embeddings=tie_embeddings, qk_norm=qk_norm))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    dp_rank = 0
    dp_mesh = None
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        if tp > 1:
            apply_tp(model, mesh["tp"], loss_parallel=loss_parallel)
    if ac != "none":
        apply_ac(model, ParallelConfig(ac=ac))  # type: ignore[arg-type]
    if compile:
        apply_compile(model)
    if dist.is_initialized() and dp > 1:
        from kfm.parallel.fsdp import apply_fsdp

        dp_mesh = mesh["dp"]
        dp_rank = dp_mesh.get_local_rank()
        apply_fsdp(model, dp_mesh, ParallelConfig(), param_dtype=None, reduce_dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rows = GLOBAL_BATCH // dp
    losses = []
    for tokens, labels, doc_ids in fixed_batches(steps):
        part = slice(dp_rank * rows, (dp_rank + 1) * rows)
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[part], doc_ids[part])
        with loss_parallel_context(loss_parallel):
            loss, _ = cross_entropy_loss(logits, labels[part])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = local_loss(loss).detach().clone()
        if dp_mesh is not None:
            dist.all_reduce(value, group=dp_mesh.get_group())
            value /= dp
        losses.append(value.item())
    seq_len_error = None
    if tp > 1:  # sequence parallelism needs seq_len divisible by tp: apply_tp's check must fire
        try:
            model(tokens[:, :-1], doc_ids[:, :-1])
        except ValueError as e:
            seq_len_error = str(e)
    weights = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        # Activation checkpointing's wrapper is not part of the parameter's identity.
        weights[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().clone()
    return {
        "losses": losses,
        "weights": weights,
        "initial": initial,
        "seq_len_error": seq_len_error,
    }


def run_torchrun(nproc: int, args: list[str], out: Path, *, timeout: float = 300) -> dict:
    """Run this file under torchrun with `nproc` gloo ranks; return rank 0's train_tiny result.

    OMP_NUM_THREADS=1 per rank: the test machines have 2 cores shared by all ranks.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", __file__, *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loss-parallel", action="store_true")
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--qk-norm", action="store_true")
    parser.add_argument("--ac", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    result = train_tiny(
        steps=args.steps,
        tp=args.tp,
        dp=args.dp,
        loss_parallel=args.loss_parallel,
        tie_embeddings=not args.untied,
        qk_norm=args.qk_norm,
        ac=args.ac,
        compile=args.compile,
    )
    if int(os.environ["RANK"]) == 0:
        torch.save(result, args.out)
    dist.barrier()  # tearing gloo down while a peer still receives aborts it (torch 2.13)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
