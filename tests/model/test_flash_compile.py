"""attn_backend='flash' under per-block torch.compile: no recompiles as the document count varies.

`kfm::flash_varlen` and `kfm::flash_varlen_backward` have a CUDA kernel only (flash-attn's), and
`build_attention_mask` refuses attn_backend='flash' off CUDA. On this CPU-only machine the
`flash_on_cpu` fixture registers reference kernels as the ops' CPU kernels
(`torch.library.register_kernel`): explicit fp32 math, the backward computed from the saved out
and lse as flash-attn's is. It also replaces `attention._check_flash` (pytest's monkeypatch) for
the test. The ops, their fake implementations, the autograd formula and the compiled blocks
around them are then the production code; only the kernel under the op differs. The CUDA test at
the end runs the real kernels.

The first inductor compile of a block takes ~20-30 s on the 2-core CI machine (see
tests/parallel/test_compile.py about the cache).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.utils import counters

import kfm.model.attention as attention_module
from kfm.config import ModelConfig, ParallelConfig
from kfm.model.attention import (
    attention,
    build_attention_mask,
    cu_seqlens_from_doc_ids,
    flash_varlen,
)
from kfm.model.transformer import Transformer
from kfm.parallel.ac import apply_ac
from kfm.parallel.compile import apply_compile

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
CPU = torch.device("cpu")
VOCAB, BATCH, SEQ_LEN = 50, 2, 64
DOCS_PER_ROW = (1, 3, 7, 12)


def _spans(cu_seqlens: Tensor, seq_info: Tensor, n_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of the n sequences of `kfm::flash_varlen`'s metadata, checking its layout:
    offsets from 0, then n_tokens up to the end of cu_seqlens (zero-length padding), and
    seq_info = [n, longest sequence], exact."""
    n_seqs, max_seqlen = seq_info.tolist()
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[n_seqs:] == [n_tokens] * (len(bounds) - n_seqs)
    spans = list(zip(bounds[:n_seqs], bounds[1 : n_seqs + 1], strict=True))
    assert all(end > start for start, end in spans)
    assert max(end - start for start, end in spans) == max_seqlen
    return spans


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """(H, L, L) fp32 scaled scores of one sequence, -inf above the diagonal."""
    scores = (q @ k.transpose(1, 2)) * scale
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf"))


def reference_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, seq_info: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """CPU kernel of `kfm::flash_varlen`: causal attention inside each sequence."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for start, end in _spans(cu_seqlens, seq_info, q.shape[0]):
        qs = q[start:end].float().transpose(0, 1)  # (H, L, D)
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = _scores(qs, ks, scale)
        lse = scores.logsumexp(-1)  # (H, L)
        outs.append(((scores - lse[..., None]).exp() @ vs).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def reference_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    seq_info: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """CPU kernel of `kfm::flash_varlen_backward`, as flash-attention's backward: P from the
    saved lse, D = rowsum(dout * out)."""
    n_kv, group, head_dim = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
    dq, dk, dv = (torch.zeros(x.shape) for x in (q, k, v))
    for start, end in _spans(cu_seqlens, seq_info, q.shape[0]):
        span, length = slice(start, end), end - start
        qs = q[span].float().transpose(0, 1)  # (H, L, D)
        ks = k[span].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[span].float().repeat_interleave(group, dim=1).transpose(0, 1)
        do, o = dout[span].float().transpose(0, 1), out[span].float().transpose(0, 1)
        p = (_scores(qs, ks, scale) - lse[:, span, None]).exp()  # (H, L, L)
        ds = p * (do @ vs.transpose(1, 2) - (do * o).sum(-1, keepdim=True)) * scale
        dq[span] = (ds @ ks).transpose(0, 1)
        # Sum the query heads of each kv head (GQA).
        dk[span] = (
            (ds.transpose(1, 2) @ qs).view(n_kv, group, length, head_dim).sum(1).transpose(0, 1)
        )
        dv[span] = (
            (p.transpose(1, 2) @ do).view(n_kv, group, length, head_dim).sum(1).transpose(0, 1)
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture(scope="module")
def cpu_kernels() -> None:
    """Register the reference kernels as the ops' CPU kernels.

    torch 2.13's register_kernel, for an op made by torch.library.custom_op, returns the function
    (no handle; its lib= argument is not used for such ops) and torch has no public way to remove
    the kernel, so the registration lasts the rest of the pytest process. Registering again
    replaces it. Production code never reaches it: build_attention_mask refuses flash off CUDA
    before the op is called (test_flash_stays_refused_off_cuda).
    """
    torch.library.register_kernel("kfm::flash_varlen", "cpu", reference_forward)
    torch.library.register_kernel("kfm::flash_varlen_backward", "cpu", reference_backward)


@pytest.fixture
def flash_on_cpu(cpu_kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """attn_backend='flash' on the CPU for one test: the reference CPU kernels, and the CUDA and
    flash-attn refusal (`attention._check_flash`) replaced by a no-op until the test ends."""
    monkeypatch.setattr(attention_module, "_check_flash", lambda device: None)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def doc_batches(docs_per_row=DOCS_PER_ROW, *, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(tokens, labels, doc_ids), each (BATCH, SEQ_LEN), with n documents in every row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n_docs in docs_per_row:
        seq = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=gen)
        doc_ids = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
        for row in range(BATCH):
            for start in (torch.randperm(SEQ_LEN - 1, generator=gen)[: n_docs - 1] + 1).tolist():
                doc_ids[row, start:] += 1
        out.append((seq[:, :-1], seq[:, 1:], doc_ids))
    return out


def tiny_model(attn_backend: str, **overrides) -> Transformer:
    cfg = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg, max_seq_len=SEQ_LEN, attn_backend=attn_backend))


def step(model: Transformer, tokens: Tensor, labels: Tensor, doc_ids: Tensor | None):
    """Forward + backward; returns (logits, {parameter name: grad}) and clears the grads."""
    logits = model(tokens, doc_ids)
    F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def run_compiled(model: Transformer, batches, reference: Transformer | None = None, tol=1e-5):
    """Compile model's blocks (apply_compile) and run the batches; after the first, any
    recompilation raises. With reference (an eager model of the same weights), compare logits
    and gradients at every step."""
    apply_compile(model)
    for i, (tokens, labels, doc_ids) in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            logits, grads = step(model, tokens, labels, doc_ids)
        if reference is not None:
            want_logits, want_grads = step(reference, tokens, labels, doc_ids)
            torch.testing.assert_close(logits, want_logits, atol=tol, rtol=tol)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, want_grads[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("ac", ["none", "full"])
def test_compiled_flash_blocks_do_not_recompile_as_documents_vary(flash_on_cpu, fresh_dynamo, ac):
    """1, 3, 7 and 12 documents per row: one compiled graph for both blocks (built in step 1),
    no recompilation after it, no graph break (the op is opaque), and the sdpa backend's logits
    and gradients (inductor reorders fp32 reductions: ~1e-7)."""
    batches = doc_batches()
    counts = [int(cu_seqlens_from_doc_ids(b[2])[1][0]) for b in batches]
    assert counts == [BATCH * n for n in DOCS_PER_ROW]
    flash, sdpa = tiny_model("flash"), tiny_model("sdpa")
    for model in (flash, sdpa):
        apply_ac(model, ParallelConfig(ac=ac))
    run_compiled(flash, batches, reference=sdpa)
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("masked", [True, False])
def test_flash_op_matches_sdpa(flash_on_cpu, n_kv_heads: int, masked: bool) -> None:
    """Eager attention(): out and q/k/v gradients of flash equal sdpa's, documents or not."""
    torch.manual_seed(0)
    n_heads, head_dim = 4, 16
    q = torch.randn(BATCH, SEQ_LEN, n_heads, head_dim, requires_grad=True)
    k = torch.randn(BATCH, SEQ_LEN, n_kv_heads, head_dim, requires_grad=True)
    v = torch.randn(BATCH, SEQ_LEN, n_kv_heads, head_dim, requires_grad=True)
    doc_ids = doc_batches([5])[0][2] if masked else None
    dout = torch.randn(BATCH, SEQ_LEN, n_heads, head_dim)
    results = []
    for backend in ("flash", "sdpa"):
        mask = build_attention_mask(backend, doc_ids, batch=BATCH, seq_len=SEQ_LEN, device=CPU)
        out = attention(q, k, v, mask)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flash_op_registration(flash_on_cpu) -> None:
    """torch.library.opcheck: schema, fake implementation vs the real one (shapes, strides),
    autograd registration, and tracing by AOTAutograd with dynamic shapes."""
    torch.manual_seed(0)
    doc_ids = doc_batches([3])[0][2]
    cu_seqlens, seq_info = cu_seqlens_from_doc_ids(doc_ids)
    n_tokens = BATCH * SEQ_LEN
    q = torch.randn(n_tokens, 4, 16, requires_grad=True)
    k = torch.randn(n_tokens, 2, 16, requires_grad=True)
    v = torch.randn(n_tokens, 2, 16, requires_grad=True)
    torch.library.opcheck(flash_varlen, (q, k, v, cu_seqlens, seq_info, 0.25))


def test_flash_stays_refused_off_cuda(monkeypatch) -> None:
    """Production refuses flash on the CPU even if flash-attn imports (no `flash_on_cpu` here:
    whether or not the reference CPU kernels are registered, the op is never reached)."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    tokens, _, doc_ids = doc_batches([3])[0]
    with pytest.raises(RuntimeError, match="CUDA only"):
        tiny_model("flash")(tokens, doc_ids)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "match"),
    [
        (torch.float32, 64, r"bf16/fp16.*--train\.dtype=bf16"),
        (torch.bfloat16, 12, r"multiple of 8.*model\.n_heads"),
        (torch.float16, 264, r"at most 256.*model\.n_heads"),
    ],
)
def test_flash_kernel_constraints_name_the_flags(dtype, head_dim: int, match: str) -> None:
    """What flash-attn's kernels lack, checked by the CUDA kernels of both ops before flash-attn
    is called (no GPU needed to check the check)."""
    attention_module._check_flash_inputs(torch.empty(8, 4, 128, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=match):
        attention_module._check_flash_inputs(torch.empty(8, 4, head_dim, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_FLASH, reason="flash-attn not installed")
def test_cuda_compiled_flash_matches_sdpa_without_recompiles(fresh_dynamo) -> None:
    """flash-attn's kernels, bf16 autocast, per-block compile, 1-12 documents per row."""
    cuda = torch.device("cuda")
    flash, sdpa = tiny_model("flash").to(cuda), tiny_model("sdpa").to(cuda)
    batches = [tuple(t.to(cuda) for t in b) for b in doc_batches()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run_compiled(flash, batches, reference=sdpa, tol=2e-2)
    assert counters["stats"]["unique_graphs"] == 1

    # The zero-length padding of cu_seqlens is harmless even when flash-attn is handed it: the
    # same kernel does the same work per real sequence, so the results are bitwise equal.
    torch.manual_seed(0)
    q = torch.randn(BATCH * SEQ_LEN, 4, 16, device=cuda, dtype=torch.bfloat16)
    k, v = (torch.randn(BATCH * SEQ_LEN, 2, 16, device=cuda, dtype=torch.bfloat16) for _ in "kv")
    cu_seqlens, seq_info = cu_seqlens_from_doc_ids(batches[2][2])
    padded_info = torch.tensor([BATCH * SEQ_LEN, int(seq_info[1])])
    scale = 1 / math.sqrt(16)
    trimmed = flash_varlen(q, k, v, cu_seqlens, seq_info, scale)
    padded = flash_varlen(q, k, v, cu_seqlens, padded_info, scale)
    torch.testing.assert_close(padded, trimmed, atol=0, rtol=0)
