"""Per-block torch.compile (kfm.parallel.compile): one graph per block, no recompilation when the
document boundaries change, and the same losses as eager.

The first inductor compile of a block takes ~20-30 s on the 2-core CI machine and ~2 s with a warm
cache; inductor's default cache (/tmp/torchinductor_$USER, or TORCHINDUCTOR_CACHE_DIR) is reused
across runs, so only the first run on a machine pays.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from kfm.config import ParallelConfig
from kfm.model.attention import build_attention_mask
from kfm.model.transformer import Transformer
from kfm.parallel.ac import apply_ac
from kfm.parallel.compile import apply_compile
from kfm.train.loss import cross_entropy_loss
from tests.parallel._tp_worker import fixed_batches, tiny_model_config

LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _block_inputs(model: Transformer) -> tuple:
    tokens, _, doc_ids = fixed_batches(1)[0]
    seq_len = tokens.shape[1]
    mask = build_attention_mask(
        "sdpa", doc_ids, batch=tokens.shape[0], seq_len=seq_len, device=tokens.device
    )
    h = model.tok_embeddings(tokens)
    return h, model.rope_cos[:seq_len], model.rope_sin[:seq_len], mask


@pytest.mark.parametrize("ac", ["none", "full"])
def test_block_compiles_without_graph_breaks(ac):
    """torch._dynamo.explain traces the block (no inductor, fast): one graph, zero breaks."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    apply_ac(model, ParallelConfig(ac=ac))
    block = model.layers["0"]
    explanation = torch._dynamo.explain(block)(*_block_inputs(model))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _train(*, compiled: bool, steps: int) -> tuple[list[float], list[int]]:
    """Losses per step, and the number of distinct dynamo graphs after each step."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    if compiled:
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, graphs = [], []
    for step, (tokens, labels, doc_ids) in enumerate(fixed_batches(steps)):
        # After the warm-up step any recompilation raises instead of silently compiling again.
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = cross_entropy_loss(model(tokens, doc_ids), labels)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, graphs


def test_compiled_blocks_match_eager_without_recompiles():
    """4 steps, each with different document boundaries (a new dense mask of the same shape).

    - Graphs: both blocks share one compiled graph (identical code, parameters are graph inputs),
      built in step 1; later steps add none, and run with error_on_recompile=True.
    - Losses within 1e-5 relative of eager: inductor fuses and reorders fp32 reductions (RMSNorm
      means, softmax, matmul tiling), ~1 ulp per op; measured <= 2e-7 after 4 steps.
    """
    steps = 4
    doc_ids = [b[2] for b in fixed_batches(steps)]
    assert all(not torch.equal(doc_ids[0], d) for d in doc_ids[1:]), "masks must vary per step"
    eager, _ = _train(compiled=False, steps=steps)
    compiled, graphs = _train(compiled=True, steps=steps)
    assert counters["graph_break"] == {}
    assert graphs == [1] * steps, graphs
    for step, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"step {step}: {got} vs {want}"
