"""A tiny language-model-shaped module and a training step shared by the checkpoint tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """Tied embedding -> LayerNorm -> 2-layer MLP with dropout -> tied output (vocab 16, width 8).

    Dropout makes the forward pass consume torch's RNG, so a resume that does not restore the RNG
    diverges.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(2 * width, width)
        self.output = nn.Linear(width, 16, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.tok_embeddings(tokens))
        return self.output(self.fc2(self.drop(torch.relu(self.fc1(h)))))


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, n: int) -> None:
    """``n`` steps on random tokens drawn from torch's global RNG (so data depends on RNG too)."""
    for _ in range(n):
        tokens = torch.randint(0, 16, (4, 5))
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


@pytest.fixture
def make_model() -> Callable[..., TinyLM]:
    def make(seed: int = 0, width: int = 8) -> TinyLM:
        torch.manual_seed(seed)
        return TinyLM(width)

    return make


@pytest.fixture
def train_steps() -> Callable[..., None]:
    return _train_steps


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_gloo_ranks(script: str, *args: str, world_size: int = 2, timeout: float = 120) -> None:
    """Run ``python -c script *args`` as ``world_size`` real processes that join one gloo group
    (the environment torchrun would give them); fail the test with their output unless all exit 0.
    """
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env |= {"WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:  # only the workers this call started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0] * world_size, "\n".join(logs)[-4000:]
