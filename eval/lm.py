"""`KfmLM`: lm-eval's language-model interface on a native kfm Transformer.

lm-eval's tasks ask a model three things; KfmLM answers them with kfm's own forward
``model(tokens)`` (no Hugging Face export needed):

- ``loglikelihood``: (sum of log p(continuation | context), continuation is the greedy output).
  Tokenised as lm-eval's HFLM does (`TemplateLM._encode_pair`: context + continuation encoded
  together and split at the context's length; an empty context becomes the bos token), the
  window left-truncated to ``max_length + 1`` tokens, so the numbers equal HFLM's on the exported
  model. Requests whose model input is the same token row (the few-shot multiple-choice case:
  one context, one-token answers) share one row, as HFLM's logits cache does.
- ``loglikelihood_rolling``: a text's total log-likelihood over lm-eval's disjoint rolling
  windows of ``max_length`` tokens (perplexity / bits-per-byte tasks).
- ``generate_until``: greedy decoding until a stop string, eos or ``max_gen_toks``. kfm's model
  keeps no KV cache, so each new token is one full forward of the batch: fine for short answers.

Rows are sorted longest first (lm-eval's `Collator`), right-padded and run ``batch_size`` per
forward. Right padding never changes a scored position: attention is causal, so a position sees
only the tokens before it, and the padding comes after every scored token. Log-softmax is taken
in fp32 over the continuation's positions only, not the whole (B, T, vocab) logits.

Parallel evaluation (one design, all ranks in lockstep). Under a process group with more than
one data-parallel rank, lm-eval sees ``world_size == 1`` on every rank: every rank builds the
same request list, tokenises it and sorts it identically. Each batch of ``batch_size x dp``
rows is dealt out round-robin over the data-parallel ranks (rank r takes rows r, r + dp, ...:
sorted rows, so every rank's longest row is about as long as the others'); a short last batch
is padded with copies of its first row whose results are dropped. Every rank therefore runs the
same number of forwards, which FSDP2's per-block all-gathers require, and a rank never waits
longer than one forward of the others (generation adds one small all-reduce per new token, so
that all ranks stop together). Results come back with one ``all_gather_object`` per call, so
every rank returns the full list and computes the same metrics; the caller writes them on rank
0 only. Ranks that differ only in their tensor-parallel coordinate hold one model
replica in pieces and get the same rows (the data-parallel coordinate comes from the mesh of
the model's DTensor parameters).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from kfm.checkpoint import CheckpointError, read_manifest, resolve_checkpoint_arg
from kfm.config import Config, ParallelConfig, config_from_dict
from kfm.model.transformer import Transformer, rope_tables
from kfm.tokenizer.identity import check_tokenizer_identity, describe

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

T = TypeVar("T")

# (request strings or None, context tokens, continuation tokens), as TemplateLM passes them.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass(frozen=True, slots=True)
class _GenRow:
    """One generation request: its index, context ids, stop strings, token budget."""

    index: int
    tokens: list[int]
    until: list[str]
    max_new: int


def _dist_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mesh_layout(model: nn.Module) -> tuple[int, int, int]:
    """(data-parallel rank, data-parallel size, tensor-parallel size) of ``model`` here.

    From the device mesh of the model's first DTensor parameter: the "tp" dimension is tensor
    parallel, every other one data-parallel (FSDP2's "dp_shard", HSDP's "dp_replicate"),
    combined row-major. A model without DTensor parameters under a process group is a full
    replica on every rank: (global rank, world size, 1). Without a process group: (0, 1, 1).
    """
    if not _dist_ranks():
        return 0, 1, 1
    for param in model.parameters():
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            coordinate = mesh.get_coordinate()
            assert coordinate is not None, "this rank holds a shard, so it is in the mesh"
            names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
            rank, size, tp = 0, 1, 1
            for name, index, extent in zip(names, coordinate, mesh.shape, strict=True):
                if name == "tp":
                    tp = extent
                else:
                    rank, size = rank * extent + index, size * extent
            return rank, size, tp
    return dist.get_rank(), dist.get_world_size(), 1


def _autocast(dtype: str, model: nn.Module) -> torch.dtype | None:
    """bf16 autocast for a bf16 evaluation, except on an FSDP2 model, whose
    MixedPrecisionPolicy already gathers bf16 parameters (as in training)."""
    from torch.distributed.fsdp import FSDPModule

    return torch.bfloat16 if dtype == "bf16" and not isinstance(model, FSDPModule) else None


def _set_rope(model: Transformer, device: torch.device) -> None:
    """Fill the non-persistent RoPE tables, which a meta-device build leaves empty."""
    cfg = model.cfg
    cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    with torch.no_grad():
        model.rope_cos.copy_(cos.to(device))
        model.rope_sin.copy_(sin.to(device))


class KfmLM(TemplateLM):
    """lm-eval's ``LM`` on a kfm Transformer; see the module docstring for how it batches and
    how it runs on several ranks. Build it with `from_checkpoint` or `from_model`.

    Attributes besides lm-eval's: ``model``, ``tokenizer``, ``config`` (the checkpoint's
    `Config`; for `from_hf` defaults around the folder's model; None for `from_model`),
    ``checkpoint`` (the step dir, or None), ``tokenizer_hash`` (sha256 of tokenizer.json;
    None for `from_model`), ``tokenizer_check`` (`from_checkpoint`: one line saying what the
    tokenizer was checked against), ``dp_rank``/``dp_size`` (this rank's share of the rows).
    """

    backend = "causal"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device,
        batch_size: int = 16,
        max_length: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        max_gen_toks: int = 256,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (rows per forward per rank)")
        model_max = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        if max_length is None:
            if model_max is None:
                raise ValueError("max_length is needed for a model without cfg.max_seq_len")
            max_length = int(model_max)
        if max_length < 2 or (model_max is not None and max_length > model_max):
            raise ValueError(
                f"max_length={max_length} must be in [2, model.max_seq_len={model_max}] "
                "(kfm's RoPE tables end at max_seq_len)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self._batch_size = batch_size
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        self.dp_rank, self.dp_size, self._tp = mesh_layout(model)
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.config: Config | None = None
        self.checkpoint: Path | None = None
        self.tokenizer_hash: str | None = None
        self.tokenizer_check: str | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device,
        batch_size: int = 16,
        max_length: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> KfmLM:
        """Wrap a live kfm Transformer: single-device, FSDP2-sharded or tensor-parallel.

        Used by in-loop evaluation during training: every rank of the process group must make
        the same lm-eval calls (lockstep, see the module docstring). Each call switches the
        model to eval mode under ``torch.no_grad()`` and restores its previous mode after.
        ``max_length`` defaults to the model's ``cfg.max_seq_len``; ``autocast_dtype`` (e.g.
        bf16) is the autocast of the forward, None for none (FSDP2's mixed precision already
        gives bf16 compute); ``batch_size`` is rows per forward per data-parallel rank;
        ``progress`` shows tqdm bars on rank 0.
        """
        return cls(
            model,
            tokenizer,
            device=device,
            batch_size=batch_size,
            max_length=max_length,
            autocast_dtype=autocast_dtype,
            progress=progress,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        tokenizer_dir: str | Path | None = None,
        parallel: ParallelConfig | None = None,
        dtype: Literal["fp32", "bf16"] | None = None,
        max_length: int | None = None,
        progress: bool = True,
    ) -> KfmLM:
        """Load a kfm checkpoint: ``path`` is a step dir, a ``checkpoints/`` dir or a run dir
        (its newest valid checkpoint), as `kfm eval` takes it.

        The tokenizer (``tokenizer_dir``, default the run's ``tokenizer.path``) is checked
        against the checkpoint first (kfm.tokenizer.identity), before any weight is read.
        ``dtype``: compute in fp32 or bf16 (default: the run's ``train.dtype``).

        ``parallel=None``: one full model in this process (under a process group every rank
        holds a replica and the rows are split over the ranks). ``parallel=ParallelConfig(...)``
        needs an initialised process group (torchrun; `kfm.train.dist.process_group`): the
        model is built on the meta device, `kfm.parallel.parallelize` shards it over the mesh
        of ``parallel`` (FSDP2 and/or TP; activation checkpointing, compile and fp8 are
        turned off for evaluation), and DCP reads each rank's shards straight from the
        checkpoint, resharding from the layout it was saved in: no rank holds the full model.
        Collective then: every rank calls it.

        Raises:
            CheckpointError: no valid checkpoint at ``path``, or its weights do not fit.
            TokenizerMismatchError: the tokenizer is not the checkpoint's.
            ValueError: ``parallel`` given without a process group.
        """
        step_dir = resolve_checkpoint_arg(path)
        manifest = read_manifest(step_dir)
        cfg = config_from_dict(manifest.get("config", {}), source=f"{step_dir}/manifest.json")
        tok_path = tokenizer_dir if tokenizer_dir is not None else cfg.tokenizer.path
        check = check_tokenizer_identity(
            tok_path, checkpoint=step_dir, config=cfg, tokenizer_given=tokenizer_dir is not None
        )
        if check.unchecked is not None:
            log.warning("%s", describe(check, tok_path))
        dtype = dtype or cfg.train.dtype
        dev = torch.device(device)
        if parallel is None:
            model = _load_single(step_dir, cfg, dev)
        else:
            model = _load_sharded(step_dir, cfg, parallel, dev, dtype=dtype, manifest=manifest)
        lm = cls(
            model,
            check.tokenizer,
            device=dev,
            batch_size=batch_size,
            max_length=max_length,
            autocast_dtype=_autocast(dtype, model),
            progress=progress,
        )
        lm.config = cfg
        lm.checkpoint = step_dir
        lm.tokenizer_hash = check.tokenizer_hash
        lm.tokenizer_check = describe(check, tok_path)
        return lm

    @classmethod
    def from_hf(
        cls,
        hf_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        parallel: ParallelConfig | None = None,
        dtype: Literal["fp32", "bf16"] = "fp32",
        max_length: int | None = None,
        progress: bool = True,
    ) -> KfmLM:
        """Evaluate a Hugging Face Llama/Qwen3 folder (e.g. an open model, or kfm's own export)
        with kfm's model code: `kfm.export.hf_import` maps its config.json to a kfm
        ModelConfig (refusing what kfm cannot compute exactly) and streams its safetensors
        tensor by tensor into the model. ``parallel``, ``dtype`` and the rest as in
        `from_checkpoint`; with ``parallel`` each rank reads only its own slice of each tensor.
        The tokenizer is the folder's own (``tokenizer_hash`` is its sha256; nothing to check
        it against).

        Raises:
            HFImportError: a config key or tensor kfm's model cannot hold, named.
            TokenizerNotFoundError: the folder has no tokenizer.json.
            ValueError: ``parallel`` given without a process group.
        """
        from kfm.config import Config
        from kfm.export.hf_import import load_hf_weights, model_config_from_hf
        from kfm.tokenizer.core import load_tokenizer, tokenizer_hash

        folder = Path(hf_dir)
        digest = tokenizer_hash(folder)
        tokenizer = load_tokenizer(folder)
        cfg = Config(model=model_config_from_hf(folder))
        dev = torch.device(device)
        model = _empty_model(cfg, dev, parallel=parallel, dtype=dtype, what="from_hf")
        load_hf_weights(model, folder, cfg=cfg.model)
        lm = cls(
            model.eval(),
            tokenizer,
            device=dev,
            batch_size=batch_size,
            max_length=max_length,
            autocast_dtype=_autocast(dtype, model),
            progress=progress,
        )
        lm.config = cfg
        lm.tokenizer_hash = digest
        return lm

    # -- what lm-eval reads ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes (bos, else eos), as HFLM."""
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        """0 on every rank: lm-eval sees one process (the ranks split rows internally)."""
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string`` as HFLM encodes them: the tokenizer's own special tokens
        (kfm's tokenizer prepends bos) unless ``add_special_tokens`` says otherwise or the
        string already starts with the bos text; the last ``left_truncate_len`` ids."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens))

    # -- the three request types ----------------------------------------------------------

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        # TemplateLM tokenises under a bar of its own that only disable_tqdm turns off.
        main = not _dist_ranks() or dist.get_rank() == 0
        quiet = disable_tqdm or not self.progress or not main
        return super().loglikelihood(requests, disable_tqdm=quiet)

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (strings, context ids, continuation ids)."""
        # One row per distinct model input (context + continuation minus its last token,
        # left-truncated to max_length); each request scores the last len(continuation)
        # positions of its row.
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        truncated = 0
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(
                    f"request {i}: context and continuation must each have a token "
                    f"(got {len(context)} and {len(continuation)})"
                )
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(continuation)} tokens is longer than "
                    f"max_length={self.max_length}"
                )
            truncated += len(context) + len(continuation) > self.max_length + 1
            window = (context + continuation)[-(self.max_length + 1) :][:-1]
            rows.setdefault(tuple(window), []).append((i, continuation))
        if truncated:  # one line per call (HFLM warns once per request); quiet LMs log it
            (log.warning if self.progress else log.info)(
                "%d of %d requests are longer than max_length=%d tokens: their contexts were "
                "left-truncated",
                truncated,
                len(requests),
                self.max_length,
            )

        def score(batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]) -> list:
            logits = self._forward([list(window) for window, _ in batch])  # (b, T, V)
            out = []
            for row, (window, members) in enumerate(batch):
                pairs = []
                for index, continuation in members:
                    end = len(window)
                    picked = logits[row, end - len(continuation) : end].float()  # (n, V)
                    target = torch.tensor(continuation, device=picked.device)  # (n,)
                    logp = F.log_softmax(picked, dim=-1).gather(-1, target[:, None]).sum()
                    greedy = bool((picked.argmax(-1) == target).all())
                    pairs.append((index, (float(logp), greedy)))
                out.append(pairs)
            return out

        results = self._run_batches(
            list(rows.items()),
            score,
            sort_key=lambda item: (-len(item[0]), item[0]),
            weight=lambda item: len(item[1]),
            total=len(requests),
            desc="loglikelihood",
            disable_tqdm=disable_tqdm,
        )
        for index, (strings, _, _) in enumerate(requests):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, results[index])
        return [results[i] for i in range(len(requests))]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Total log-likelihood of each text over lm-eval's disjoint rolling windows of
        ``max_length`` tokens (the first conditioned on the prefix token), as HFLM."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, scores, strict=True):
            totals[index] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until one of its ``until`` strings, eos, or
        ``max_gen_toks`` tokens; the text before the first stop string, as HFLM returns it.
        Contexts are left-truncated to ``max_length - max_gen_toks`` tokens.

        Raises:
            ValueError: a request asks for sampling (do_sample / temperature > 0): KfmLM
                decodes greedily only; or max_gen_toks leaves no room for the context.
        """
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        rows: list[_GenRow] = []
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ValueError(
                    f"generation kwargs {gen_kwargs} ask for sampling; KfmLM decodes greedily "
                    "only (set do_sample: false, temperature: 0 in the task's generation_kwargs)"
                )
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a context in "
                    f"max_length={self.max_length}"
                )
            tokens = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            rows.append(_GenRow(index, tokens, until, max_new))
        out = self._run_batches(
            rows,
            self._greedy,
            sort_key=lambda row: (-len(row.tokens), row.tokens),
            weight=lambda _: 1,
            total=len(rows),
            desc="generate_until",
            disable_tqdm=disable_tqdm,
        )
        for index, req in enumerate(requests):
            self.cache_hook.add_partial("generate_until", req.args, out[index])
        return [out[i] for i in range(len(requests))]

    # -- batching, ranks, forward ---------------------------------------------------------

    def _run_batches(
        self,
        items: list[T],
        run: Callable[[list[T]], list[list[tuple[int, Any]]]],
        *,
        sort_key: Callable[[T], Any],
        weight: Callable[[T], int],
        total: int,
        desc: str,
        disable_tqdm: bool,
    ) -> dict[int, Any]:
        """Sort ``items`` (Collator, longest first), deal each batch of batch_size x dp out
        round-robin to the data-parallel ranks and call ``run(this rank's items)`` once per
        batch on every rank; ``run`` returns, per item, its ``(request index, result)`` pairs.
        A short share is padded with copies of the batch's first item, whose results are
        dropped. Returns every rank's pairs as one dict, on every rank.

        Raises:
            RuntimeError: (on every rank) the ranks were given different requests, which would
                make their forward counts differ and hang FSDP2's collectives.
        """
        order = Collator(items, sort_fn=sort_key)
        dp, rank = self.dp_size, self.dp_rank
        if _dist_ranks():
            _check_same_requests([sort_key(item) for item in items], desc)
        main = not _dist_ranks() or dist.get_rank() == 0
        bar = tqdm(
            total=total,
            desc=f"kfm {desc}",
            disable=disable_tqdm or not self.progress or not main,
        )
        local: list[tuple[int, Any]] = []
        with self._eval_mode():
            for chunk in order.get_batched(n=self.batch_size * dp):
                share = chunk[rank::dp]
                padded = share + [chunk[0]] * (math.ceil(len(chunk) / dp) - len(share))
                for pairs in run(padded)[: len(share)]:
                    local.extend(pairs)
                bar.update(sum(weight(item) for item in chunk))
        bar.close()
        if dp > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)  # one collective per call
            local = [pair for part in gathered for pair in part]
        return dict(local)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _forward(self, rows: list[list[int]]) -> Tensor:
        """Logits (b, T, V) of the rows, right-padded with the pad id to the longest (T), or
        to the next multiple of the tensor-parallel size (sequence parallelism splits T)."""
        width = self._tp * math.ceil(max(len(r) for r in rows) / self._tp)
        tokens = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with ctx:
            logits = self.model(tokens.to(self.device))  # (b, T, V); doc_ids None: causal
        if isinstance(logits, DTensor):  # TP: replicated or vocab-sharded logits
            logits = logits.full_tensor()
        return logits

    def _greedy(self, rows: list[_GenRow]) -> list[list[tuple[int, str]]]:
        """Greedy decoding of each row (one forward of all unfinished rows per new token); per
        row [(request index, text before the first stop string)].

        Every rank runs the same number of forwards: under several data-parallel ranks the loop
        goes on until no rank has an unfinished row (one small all-reduce per token), and a
        rank with none left forwards a one-token row.
        """
        seqs = [list(row.tokens) for row in rows]
        new: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))
        while True:
            if self.dp_size > 1:
                if not _any_rank(bool(active), self.device):
                    break
            elif not active:
                break
            if not active:
                self._forward([[self._pad_id]])
                continue
            logits = self._forward([seqs[i] for i in active])  # (b, T, V)
            last = torch.tensor([len(seqs[i]) - 1 for i in active], device=logits.device)
            picked = logits[torch.arange(len(active), device=logits.device), last].argmax(-1)
            still = []
            for i, token in zip(active, picked.tolist(), strict=True):
                seqs[i].append(token)
                new[i].append(token)
                text = self.tok_decode(new[i], skip_special_tokens=False)
                stopped = token == self.eot_token_id or any(s and s in text for s in rows[i].until)
                if not stopped and len(new[i]) < rows[i].max_new:
                    still.append(i)
            active = still
        return [
            [(row.index, postprocess_generated_text(self.tok_decode(tokens), row.until, None))]
            for row, tokens in zip(rows, new, strict=True)
        ]


def _check_same_requests(keys: list[Any], desc: str) -> None:
    """Raise on every rank unless every rank holds the same request rows (one all-gather of a
    32-byte digest per call: a mismatch becomes an error instead of a hang)."""
    digest = hashlib.sha256(repr(keys).encode()).hexdigest()
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, (digest, len(keys)))
    if any(d != digests[0] for d in digests):
        counts = ", ".join(f"rank {r}: {n}" for r, (_, n) in enumerate(digests))
        raise RuntimeError(
            f"KfmLM.{desc}: the ranks were given different requests ({counts} rows); every "
            "rank must make the same lm-eval calls with the same tasks, limit and few-shot seed"
        )


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank (an all-reduce over the default group)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -- loading --------------------------------------------------------------------------------


def _empty_model(
    cfg: Config,
    device: torch.device,
    *,
    parallel: ParallelConfig | None,
    dtype: Literal["fp32", "bf16"],
    what: str,
) -> Transformer:
    """cfg's model built on the meta device (no memory, no random init), parallelised over the
    mesh of ``parallel`` if given (collective), then given uninitialised storage on ``device``
    (each rank: its shards only) and its RoPE tables; the weights are for the caller to load.

    Raises:
        ValueError: ``parallel`` given without a process group (``what`` names the caller).
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if parallel is not None:
        from kfm.parallel import build_mesh, parallelize

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"KfmLM.{what}(parallel=...) needs a process group: run it under torchrun "
                "inside kfm.train.dist.process_group, or pass parallel=None for one process"
            )
        eval_cfg = replace(
            cfg,
            parallel=replace(parallel, ac="none", fp8="none"),
            train=replace(cfg.train, compile=False, dtype=dtype),
        )
        parallelize(
            model, eval_cfg, build_mesh(eval_cfg.parallel, dist.get_world_size(), device.type)
        )
    model.to_empty(device=device)  # DTensor params are swapped in place, so ties survive;
    if cfg.model.tie_embeddings and not isinstance(model.tok_embeddings.weight, DTensor):
        model.output.weight = model.tok_embeddings.weight  # plain ones are untied: tie again
    _set_rope(model, device)
    return model


def _load_single(step_dir: Path, cfg: Config, device: torch.device) -> Transformer:
    """The full model on ``device`` with the checkpoint's weights."""
    from kfm.checkpoint import load_model_state

    state, _ = load_model_state(step_dir)  # validates the manifest and every file's sha256
    model = _empty_model(cfg, device, parallel=None, dtype="fp32", what="from_checkpoint")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {step_dir} does not fit its model config: {e}") from e
    return model.eval()


def _load_sharded(
    step_dir: Path,
    cfg: Config,
    parallel: ParallelConfig,
    device: torch.device,
    *,
    dtype: Literal["fp32", "bf16"],
    manifest: dict[str, Any],
) -> Transformer:
    """The model sharded over ``parallel``'s mesh, each rank's shards read from the DCP
    checkpoint (collective; DCP reshards from the layout the checkpoint was saved in)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from kfm.checkpoint import agree_on_checkpoint

    if manifest.get("backend") == "deepspeed":
        raise CheckpointError(
            f"{step_dir} is a DeepSpeed checkpoint: load it with parallel=None (one full model)"
        )
    model = _empty_model(cfg, device, parallel=parallel, dtype=dtype, what="from_checkpoint")
    # Each rank hashes its share of the checkpoint's files; all ranks fail together.
    if agree_on_checkpoint([step_dir], verify_hashes=True) is None:
        raise CheckpointError(f"checkpoint {step_dir} failed validation (see the warning above)")
    state = {"model": get_model_state_dict(model)}  # this rank's shards (DTensors)
    try:
        dcp.load(state, checkpoint_id=step_dir)
        set_model_state_dict(model, state["model"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir} does not fit its model config: {e}") from e
    return model.eval()
