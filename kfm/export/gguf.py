"""kfm checkpoint -> one GGUF file that llama.cpp (and its bindings, Ollama, LM Studio) can load.

The tensors start from the Hugging Face state dict of :func:`kfm.export.hf.to_hf_state_dict`, so
the name mapping has one source of truth, and are renamed to GGUF names with the ``gguf``
package's own table (``gguf.get_tensor_name_map``). Two architectures, as in the HF export:

| ``model.qk_norm`` | GGUF ``general.architecture`` | RoPE in llama.cpp | q/k weights |
|---|---|---|---|
| false | ``llama`` | ``LLAMA_ROPE_TYPE_NORM``: rotates adjacent pairs (2i, 2i+1) | permuted |
| true | ``qwen3`` (has ``attn_q_norm``/``attn_k_norm``) | ``LLAMA_ROPE_TYPE_NEOX``: rotate_half | as they are |

kfm (like transformers) rotates the pairs (i, i + head_dim/2). For ``llama`` the rows of q_proj and
k_proj are therefore permuted within each head so that row i and row i + head_dim/2 become rows 2i
and 2i+1 (:func:`permute_for_ggml`, the same permutation llama.cpp's convert_hf_to_gguf.py applies
to Llama checkpoints); attention scores are unchanged. ``qwen3`` uses rotate_half itself, so its
weights are copied unpermuted (llama.cpp's converter does not permute Qwen3 either).

The tokenizer is embedded (``tokenizer.ggml.*``): kfm's byte-level BPE is llama.cpp's ``gpt2``
model, its merges, token types (special added tokens CONTROL, other added tokens such as the PII
placeholders USER_DEFINED, which llama.cpp matches in raw text as the HF tokenizer does, padding
rows UNUSED), bos/eos/pad ids and ``add_bos_token`` (read from the tokenizer files with
``gguf.SpecialVocab``). llama.cpp picks its pre-tokenizer by the name in ``tokenizer.ggml.pre``;
kfm's (digits split one per token, then GPT-2's byte-level regex) is exactly llama.cpp's
``smollm`` (regexes ``\\p{N}`` then GPT-2's; no space clean-up on decode, like kfm's
``clean_up_tokenization_spaces: false``). llama.cpp does not apply the NFC normalizer of kfm's
tokenizer: NFC text (almost all text; composed Hangul) gives the same ids, decomposed (NFD)
Hangul does not -- normalize prompts to NFC before llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

import kfm
from kfm.config import ModelConfig
from kfm.export.hf import ExportError, check_shapes, to_hf_state_dict
from kfm.fs import EXPORT_FORMAT, EXPORT_MARKER, check_output_dir, publish_dir
from kfm.model import Transformer, ffn_hidden_dim

GgufDtype = Literal["fp32", "fp16", "bf16", "q8_0"]
GGUF_DTYPES: tuple[GgufDtype, ...] = ("fp32", "fp16", "bf16", "q8_0")

LLAMA_CPP_PRE = "smollm"
"""llama.cpp's name for kfm's pre-tokenizer (``tokenizer.ggml.pre``)."""

# kfm's pre-tokenizer (kfm.tokenizer.train) as tokenizer.json spells it, keys that change the
# split only (trim_offsets changes offsets, not tokens).
_KFM_PRE_TOKENIZER = [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
]


def _is_kfm_pre_tokenizer(pre: Any) -> bool:
    if not isinstance(pre, dict) or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers")
    return (
        isinstance(steps, list)
        and len(steps) == len(_KFM_PRE_TOKENIZER)
        and all(
            all(step.get(k) == v for k, v in want.items())
            for step, want in zip(steps, _KFM_PRE_TOKENIZER, strict=True)
        )
    )


def gguf_file_name(dtype: GgufDtype) -> str:
    """The file name inside the export folder, e.g. ``model-q8_0.gguf``."""
    return f"model-{dtype}.gguf"


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp architecture of ``cfg``: ``qwen3`` with QK norm, else ``llama``."""
    return "qwen3" if cfg.qk_norm else "llama"


def permute_for_ggml(w: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a q or k projection (n_heads * head_dim, d_in) from rotate_half pairs
    (i, i + head_dim/2) to the adjacent pairs (2i, 2i+1) that llama.cpp's ``llama`` RoPE rotates.

    Row ``s * head_dim/2 + i`` of each head moves to row ``2i + s``. Pass n_kv_heads for k.
    """
    rows, *rest = w.shape
    # (n_heads, 2 halves, head_dim/2, ...) -> (n_heads, head_dim/2, 2, ...)
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_from_ggml(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of :func:`permute_for_ggml`."""
    rows, *rest = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _gguf_names(cfg: ModelConfig, hf_names: Iterable[str]) -> dict[str, str]:
    """{HF name: GGUF name} for ``hf_names``, from the gguf package's table for ``cfg``'s arch."""
    import gguf

    arch = gguf.MODEL_ARCH.QWEN3 if cfg.qk_norm else gguf.MODEL_ARCH.LLAMA
    table = gguf.get_tensor_name_map(arch, cfg.n_layers)
    names = {}
    for hf_name in hf_names:
        name = table.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"internal: no GGUF name for {hf_name} in gguf's {arch.name} map")
        names[hf_name] = name
    return names


def _rope_heads(cfg: ModelConfig, gguf_name: str) -> int | None:
    """Heads to permute ``gguf_name`` over: n_heads for q, n_kv_heads for k of a ``llama``
    file; None for every other tensor and for ``qwen3``."""
    if cfg.qk_norm:
        return None
    if gguf_name.endswith(".attn_q.weight"):
        return cfg.n_heads
    if gguf_name.endswith(".attn_k.weight"):
        return cfg.n_kv_heads or cfg.n_heads
    return None


def _check_shapes(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """`check_shapes` against the model ``cfg`` builds (the metadata written from ``cfg`` would
    not describe other weights)."""
    with torch.device("meta"):  # shapes only: no memory, no init
        check_shapes(state, Transformer(cfg).state_dict())


def gguf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """kfm state dict -> {GGUF tensor name: tensor in GGUF's layout}, in the order written.

    q/k are permuted for ``llama`` (not for ``qwen3``); with tied embeddings ``output.weight`` is
    left out (llama.cpp then uses ``token_embd.weight`` for the output). Tensors are the inputs or
    permuted copies of them, not cast. Raises ``ExportError`` like ``to_hf_state_dict``.
    """
    hf_state = to_hf_state_dict(state, cfg)
    _check_shapes(state, cfg)
    names = _gguf_names(cfg, hf_state)
    out: dict[str, Tensor] = {}
    for hf_name, tensor in hf_state.items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        name = names[hf_name]
        heads = _rope_heads(cfg, name)
        out[name] = tensor if heads is None else permute_for_ggml(tensor, heads)
    return out


def _tensor_type(tensor: Tensor, dtype: GgufDtype) -> Any:
    """GGML type to store ``tensor`` in: 1-D tensors (norm gains) stay F32, as in llama.cpp's
    converter; Q8_0 needs rows that are a multiple of its 32-value block, else F16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if tensor.dim() < 2 or dtype == "fp32":
        return T.F32
    if dtype == "q8_0":
        block, _ = GGML_QUANT_SIZES[T.Q8_0]
        return T.Q8_0 if tensor.shape[-1] % block == 0 else T.F16
    return {"fp16": T.F16, "bf16": T.BF16}[dtype]


_FP16_MAX = 65504.0


def _tensor_types(tensors: dict[str, Tensor], dtype: GgufDtype) -> dict[str, Any]:
    """The GGML type of each tensor; raises ``ExportError`` naming a tensor whose values fp16
    cannot hold (F16 values, or a Q8_0 block scale max|w|/127, past 65504)."""
    from gguf import GGMLQuantizationType as T

    types = {}
    for name, t in tensors.items():
        types[name] = kind = _tensor_type(t, dtype)
        if kind in (T.F16, T.Q8_0):
            largest = t.detach().abs().max().item()
            limit = _FP16_MAX * (127 if kind == T.Q8_0 else 1)
            if not largest <= limit:  # also catches NaN
                raise ExportError(
                    f"{name} holds |w| = {largest:.3g}, beyond what --dtype {dtype} stores "
                    f"(fp16 values up to {_FP16_MAX:.0f}); export with --dtype bf16 or fp32"
                )
    return types


def _file_type(dtype: GgufDtype) -> int:
    from gguf import LlamaFileType as F

    return {
        "fp32": F.ALL_F32,
        "fp16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
    }[dtype]


@dataclass(frozen=True, kw_only=True, slots=True)
class GgufVocab:
    """The tokenizer as llama.cpp's ``gpt2`` model stores it, padded to model.vocab_size."""

    tokens: list[str]
    token_types: list[int]
    pre: str


def gguf_vocab(tokenizer_dir: str | Path, vocab_size: int) -> GgufVocab:
    """Read ``tokenizer_dir/tokenizer.json`` into GGUF's token list and types.

    Ids past the tokenizer's size up to ``vocab_size`` (embedding rows no token uses) become
    ``[PAD<id>]`` tokens of type UNUSED, as llama.cpp's converter writes them. Raises
    ``ExportError`` when the file is missing, is not byte-level BPE, has more tokens than
    ``vocab_size``, or has a normalizer/pre-tokenizer llama.cpp cannot reproduce.
    """
    from gguf import TokenType
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{path} does not exist; pass the tokenizer folder the model was trained with "
            "(--tokenizer, or the run's tokenizer.path)"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model_type = spec.get("model", {}).get("type")
    if model_type != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"{path}: GGUF export supports byte-level BPE tokenizers (kfm tokenizer train), got "
            f"model {model_type!r} with decoder {(spec.get('decoder') or {}).get('type')!r}"
        )
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ExportError(
            f"{path}: normalizer {normalizer!r} has no llama.cpp equivalent (it applies none); "
            "GGUF export supports kfm's tokenizers (NFC or no normalizer)"
        )
    if not _is_kfm_pre_tokenizer(spec.get("pre_tokenizer")):
        raise ExportError(
            f"{path}: pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))} is not kfm's "
            f"(Digits one per token, then ByteLevel with GPT-2's regex), which is llama.cpp's "
            f"{LLAMA_CPP_PRE!r}; llama.cpp would split text differently, so the export is refused"
        )

    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"tokenizer at {tokenizer_dir} has {len(vocab)} tokens but model.vocab_size="
            f"{vocab_size}; set --model.vocab_size to at least {len(vocab)}"
        )
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return GgufVocab(tokens=tokens, token_types=[int(t) for t in types], pre=LLAMA_CPP_PRE)


def _add_metadata(writer: Any, cfg: ModelConfig, dtype: GgufDtype, name: str) -> None:
    import gguf

    head_dim = cfg.d_model // cfg.n_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename("kfm")
    writer.add_languages(["ko", "en"])
    writer.add_tags(["kfm", "medical", "biomedical", "causal-lm"])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(ffn_hidden_dim(cfg))
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads or cfg.n_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(
    writer: Any, vocab: GgufVocab, tokenizer_dir: str | Path, vocab_size: int
) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # merges, bos/eos/pad ids, add_bos_token (from the post-processor) and a chat template if
    # the tokenizer has one: gguf's reader of HF tokenizer files, as llama.cpp's converter uses.
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"{tokenizer_dir}/tokenizer.json has no BPE merges")
    special.add_to_gguf(writer, quiet=True)


def _write_file(
    path: Path,
    tensors: dict[str, Tensor],
    types: dict[str, Any],
    cfg: ModelConfig,
    *,
    vocab: GgufVocab,
    tokenizer_dir: str | Path,
    dtype: GgufDtype,
    name: str,
) -> None:
    """Write the GGUF file: header, metadata, tensor table, then one tensor at a time, so at most
    one converted tensor is in memory beside ``tensors``."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf_arch(cfg))
    _add_metadata(writer, cfg, dtype, name)
    _add_tokenizer(writer, vocab, tokenizer_dir, cfg.vocab_size)
    for n, t in tensors.items():
        block, type_bytes = gguf.GGML_QUANT_SIZES[types[n]]
        nbytes = t.numel() // block * type_bytes
        # tensor_dtype is ignored when raw_dtype is given and not uint8: shape stays logical.
        writer.add_tensor_info(n, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=types[n])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, t in tensors.items():
            data = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
            writer.write_tensor_data(gguf.quants.quantize(data, types[n]))
    finally:
        writer.close()


def _marker(source: str | Path | None, tokenizer_dir: str | Path, dtype: GgufDtype) -> str:
    marker = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "created_by": f"kfm {kfm.__version__}",
        "kind": "gguf",
        "file": gguf_file_name(dtype),
        "source": None if source is None else str(source),
        "tokenizer": str(tokenizer_dir),
        "dtype": dtype,
    }
    return json.dumps(marker, indent=2) + "\n"


def check_gguf_request(out_dir: str | Path, dtype: str) -> None:
    """Raise ``ExportError`` for a dtype GGUF export does not write or an ``out_dir`` named like
    a file (``*.gguf``: the export is a folder). Cheap: call it before reading any weights."""
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if str(out_dir).endswith(".gguf"):
        raise ExportError(
            f"{out_dir}: the GGUF export writes a folder (OUT/{gguf_file_name(dtype)} and "
            "kfm_export.json); give a folder name without the .gguf suffix"
        )


def export_gguf(
    state: dict[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    dtype: GgufDtype = "fp32",
    overwrite: bool = False,
    source: str | Path | None = None,
    name: str = "kfm",
) -> Path:
    """Write ``out_dir/model-<dtype>.gguf`` (llama.cpp's format, tokenizer embedded) for the kfm
    weights ``state`` of model ``cfg``, and ``out_dir/kfm_export.json``.

    ``dtype``: fp32 (exact), fp16, bf16, or q8_0 (8-bit blocks of 32 with an fp16 scale; a matrix
    whose rows are not a multiple of 32 falls back to fp16). Norm gains are always fp32. ``name``
    goes to ``general.name``. ``out_dir`` follows the HF export's rules (new or empty folder, or
    an earlier kfm export with ``overwrite``; never a run, checkpoint, ``source`` or the
    tokenizer); the folder is built under ``OUT.tmp-<pid>`` and renamed at the end.

    Returns the path of the .gguf file. Raises ``OutputError`` for a refused ``out_dir`` and
    ``ExportError`` for an unknown dtype, a tokenizer llama.cpp cannot reproduce (see
    :func:`gguf_vocab`), or a state dict that does not match ``cfg``.
    """
    check_gguf_request(out_dir, dtype)
    inputs = [p for p in (source, tokenizer_dir) if p is not None]
    out = check_output_dir(out_dir, "export", inputs=inputs, overwrite=overwrite, flag="OUT_DIR")
    # Fail on the tokenizer and on values the dtype cannot hold before anything is written.
    vocab = gguf_vocab(tokenizer_dir, cfg.vocab_size)
    tensors = gguf_state_dict(state, cfg)
    types = _tensor_types(tensors, dtype)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_file(
            tmp / gguf_file_name(dtype),
            tensors,
            types,
            cfg,
            vocab=vocab,
            tokenizer_dir=tokenizer_dir,
            dtype=dtype,
            name=name,
        )
        (tmp / EXPORT_MARKER).write_text(_marker(source, tokenizer_dir, dtype), encoding="utf-8")
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir) / gguf_file_name(dtype)


GGUF_TOLERANCE: dict[GgufDtype, float] = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3, "q8_0": 8e-3}
"""Largest |w_gguf - w| / max|w| per tensor that :func:`gguf_weights_diff` accepts: fp16 and bf16
round each value to 11 and 8 significant bits (2^-11, 2^-8 of its size); q8_0 rounds to 1/254 of
its block's largest value (plus the fp16 rounding of that scale)."""


def read_gguf_tensor(tensor: Any, cfg: ModelConfig) -> Tensor:
    """One tensor of a ``gguf.GGUFReader``, dequantized to fp32, in kfm's (PyTorch) shape and
    layout: q/k of a ``llama`` file unpermuted."""
    from gguf import quants

    values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    w = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a writable copy
    heads = _rope_heads(cfg, tensor.name)
    return w if heads is None else unpermute_from_ggml(w, heads)


@torch.no_grad()
def gguf_weights_diff(path: str | Path, state: dict[str, Tensor], cfg: ModelConfig) -> float:
    """Read the GGUF file back and return the largest, over tensors, of
    max |w_gguf - w_kfm| / max |w_kfm| (0.0 for an exact fp32 export).

    Every tensor kfm writes must be in the file with its shape (``ExportError`` otherwise), so
    this checks the tensor table, the layout (q/k permutation undone) and the rounding. A
    non-finite value (in the file or the checkpoint) gives ``inf``.
    """
    import gguf

    found = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    hf_state = to_hf_state_dict(state, cfg)
    names = _gguf_names(cfg, hf_state)
    worst = 0.0
    for hf_name, ref in hf_state.items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        name = names[hf_name]
        if name not in found:
            raise ExportError(f"{path} lacks the tensor {name} ({hf_name})")
        got = read_gguf_tensor(found[name], cfg)
        if got.shape != ref.shape:
            raise ExportError(
                f"{path}: {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        ref = ref.detach().float().cpu()
        err = (got - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst
