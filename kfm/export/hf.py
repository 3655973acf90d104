"""kfm checkpoint -> Hugging Face transformers model directory (and the weight mapping back).

The kfm block is Llama's math exactly (RMSNorm, rotate_half RoPE, GQA, SwiGLU, no biases), so a
model without QK norm exports as ``LlamaForCausalLM`` and one with per-head QK RMSNorm (applied
before RoPE) as ``Qwen3ForCausalLM``. Weights map 1:1 by name; no tensor is permuted or reshaped,
because kfm's RoPE already uses the rotate_half layout of transformers.

Name mapping (``{i}`` is the layer index)::

    tok_embeddings.weight                      model.embed_tokens.weight
    layers.{i}.attention_norm.weight           model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.wq/wk/wv/wo.weight    model.layers.{i}.self_attn.q/k/v/o_proj.weight
    layers.{i}.attention.q_norm/k_norm.weight  model.layers.{i}.self_attn.q_norm/k_norm.weight
    layers.{i}.ffn_norm.weight                 model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1.weight (gate)   model.layers.{i}.mlp.gate_proj.weight
    layers.{i}.feed_forward.w3.weight (up)     model.layers.{i}.mlp.up_proj.weight
    layers.{i}.feed_forward.w2.weight (down)   model.layers.{i}.mlp.down_proj.weight
    norm.weight                                model.norm.weight
    output.weight                              lm_head.weight
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen3Config,
)

import kfm
from kfm.config import ModelConfig
from kfm.export.card import architecture_lines
from kfm.fs import EXPORT_FORMAT, EXPORT_MARKER, check_output_dir, publish_dir
from kfm.model import ffn_hidden_dim

# Prefixes that torch wrappers add to state-dict keys (torch.compile, activation checkpointing,
# DDP). They carry no meaning for the weights, so they are stripped before mapping.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


class ExportError(ValueError):
    """An export problem, phrased so that the message alone says how to fix it."""


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ``ExportError`` if the model ``cfg`` computes something no exported format can.

    ``model.logit_softcap`` > 0: Llama and Qwen3 (and llama.cpp's llama/qwen3 graphs) have no
    final-logit soft-capping, so the exported model would give other logits. Gemma 2 has one
    (``final_logit_softcapping``) but its blocks differ (extra norms, GeGLU, scaled embeddings).
    Called by every export path before anything is read or written.
    """
    if cfg.logit_softcap > 0:
        raise ExportError(
            f"model.logit_softcap={cfg.logit_softcap:g}: the exported architectures (Llama, "
            "Qwen3, their GGUF graphs) have no final-logit soft-capping, so the export would "
            "compute other logits; only a model trained with model.logit_softcap=0 exports"
        )


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.d_model // cfg.n_heads


def hf_config(
    cfg: ModelConfig,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    dtype: torch.dtype = torch.float32,
) -> PretrainedConfig:
    """Build the transformers config that computes exactly the kfm model ``cfg``.

    Returns a ``LlamaConfig`` when ``cfg.qk_norm`` is False and a ``Qwen3Config`` (which has
    per-head q_norm/k_norm before RoPE) when True. ``dtype`` is recorded as the config's dtype
    (the dtype the weights are stored in). Raises ``ExportError`` if d_model is not a multiple of
    n_heads, which the kfm model requires too, or from :func:`check_exportable`.
    """
    check_exportable(cfg)
    if cfg.d_model % cfg.n_heads != 0:
        raise ExportError(
            f"model.d_model={cfg.d_model} is not a multiple of model.n_heads={cfg.n_heads}; "
            "set --model.n_heads to a divisor of d_model"
        )
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=ffn_hidden_dim(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=_head_dim(cfg),
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        # transformers 5 keeps the RoPE base in rope_parameters, not a top-level rope_theta.
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=dtype,
    )
    if cfg.qk_norm:
        # kfm attends over the full causal context in every layer: no sliding-window layers.
        # Qwen3's MLP never has biases, so it takes no mlp_bias field.
        return Qwen3Config(**common, use_sliding_window=False, sliding_window=None)
    return LlamaConfig(**common, mlp_bias=False)


def _name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(kfm name, HF name) for every tensor of ``cfg``; output/lm_head last."""
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight")]
    per_layer = [
        ("attention_norm.weight", "input_layernorm.weight"),
        ("attention.wq.weight", "self_attn.q_proj.weight"),
        ("attention.wk.weight", "self_attn.k_proj.weight"),
        ("attention.wv.weight", "self_attn.v_proj.weight"),
        ("attention.wo.weight", "self_attn.o_proj.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
        ("feed_forward.w3.weight", "mlp.up_proj.weight"),
        ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ]
    if cfg.qk_norm:
        per_layer += [
            ("attention.q_norm.weight", "self_attn.q_norm.weight"),
            ("attention.k_norm.weight", "self_attn.k_norm.weight"),
        ]
    for i in range(cfg.n_layers):
        pairs += [(f"layers.{i}.{k}", f"model.layers.{i}.{h}") for k, h in per_layer]
    pairs += [("norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")]
    return pairs


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def _remap(
    state: dict[str, Tensor],
    pairs: list[tuple[str, str]],
    cfg: ModelConfig,
    *,
    src_kind: str,
) -> dict[str, Tensor]:
    """Rename ``state`` along ``pairs`` (src -> dst); the last pair is the output projection.

    With tied embeddings the output key is optional in the input (it is the same tensor as the
    embedding) and always present in the result, aliasing the embedding tensor, because both
    kfm's and HF's ``state_dict()`` list the tied weight under both names.
    """
    state = _strip_wrappers(state)
    (emb_src, emb_dst), (out_src, out_dst) = pairs[0], pairs[-1]
    expected = {src for src, _ in pairs}
    optional = {out_src} if cfg.tie_embeddings else set()
    missing = sorted(expected - optional - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        lines = [f"{src_kind} state dict does not match model config ({_describe(cfg)}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        lines.append(
            "  check --model.n_layers / --model.qk_norm / --model.tie_embeddings against the "
            "config the checkpoint was trained with"
        )
        raise ExportError("\n".join(lines))
    if cfg.tie_embeddings and out_src in state:
        emb, out = state[emb_src], state[out_src]
        if emb is not out and not (emb.shape == out.shape and torch.equal(emb, out)):
            raise ExportError(
                f"model.tie_embeddings=True but {src_kind} '{out_src}' differs from '{emb_src}'; "
                "set --model.tie_embeddings=false for a checkpoint with a separate output projection"
            )
    result = {dst: state[src] for src, dst in pairs if src in state}
    if cfg.tie_embeddings:
        result[out_dst] = result[emb_dst]
    return result


def _describe(cfg: ModelConfig) -> str:
    return f"n_layers={cfg.n_layers}, qk_norm={cfg.qk_norm}, tie_embeddings={cfg.tie_embeddings}"


def to_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename a kfm ``Transformer`` state dict to transformers' Llama/Qwen3 names.

    Tensors are passed through unchanged (same objects, no copy, no permutation). Wrapper prefixes
    (``_orig_mod.`` from torch.compile, ``_checkpoint_wrapped_module.``, ``module.``) are ignored.
    With ``cfg.tie_embeddings`` the input may omit ``output.weight``; the result always holds
    ``lm_head.weight`` aliasing ``model.embed_tokens.weight``. Raises ``ExportError`` listing
    missing and unexpected keys, or from :func:`check_exportable`.
    """
    check_exportable(cfg)
    return _remap(state, _name_pairs(cfg), cfg, src_kind="kfm")


def from_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_hf_state_dict`: transformers names -> kfm ``Transformer`` names.

    For continued pretraining from an exported (or compatible Llama/Qwen3) checkpoint. With
    ``cfg.tie_embeddings`` the input may omit ``lm_head.weight`` (save_pretrained drops it); the
    result always holds ``output.weight`` aliasing ``tok_embeddings.weight``.
    """
    pairs = [(hf, kfm) for kfm, hf in _name_pairs(cfg)]
    return _remap(state, pairs, cfg, src_kind="Hugging Face")


def _marker(source: str | Path | None, tokenizer_dir: str | Path | None, dtype: torch.dtype) -> str:
    """kfm_export.json: what made this folder, so a later --overwrite can recognise it as kfm's
    own export (transformers ignores the file)."""
    marker = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "created_by": f"kfm {kfm.__version__}",
        "source": None if source is None else str(source),
        "tokenizer": None if tokenizer_dir is None else str(tokenizer_dir),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return json.dumps(marker, indent=2) + "\n"


def _load_tokenizer(tokenizer_dir: Path, vocab_size: int) -> transformers.PreTrainedTokenizerBase:
    if not tokenizer_dir.is_dir():
        raise ExportError(
            f"tokenizer directory {tokenizer_dir} does not exist; train one with "
            "`kfm tokenizer train` or pass the right --tokenizer.path"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises several types (OSError, ValueError, ...)
        raise ExportError(
            f"could not load a tokenizer from {tokenizer_dir} with AutoTokenizer: {exc}"
        ) from exc
    # len() counts added special tokens too, which the embedding must also cover.
    if len(tok) > vocab_size:
        raise ExportError(
            f"tokenizer at {tokenizer_dir} has {len(tok)} tokens but model.vocab_size={vocab_size}; "
            f"set --model.vocab_size to at least {len(tok)} (a multiple of 64 is best on GPU)"
        )
    return tok


def _model_card(
    cfg: ModelConfig, model: torch.nn.Module, dtype: torch.dtype, extra: str | None
) -> str:
    """README.md of a plain export: architecture and usage. Its license is left open
    (``license: other``); `kfm release` writes the full card with the chosen license."""
    hf_cfg: Any = model.config
    lines = [
        "---",
        "library_name: transformers",
        "license: other",
        "language: [ko, en]",
        "tags: [kfm, medical, biomedical, causal-lm]",
        "---",
        "",
        "# kfm model",
        "",
        "A Korean + English medical/biomedical causal language model pretrained from scratch,",
        "trained with kfm and exported to Hugging Face transformers.",
        "",
        "## Architecture",
        "",
        *architecture_lines(
            cfg,
            hf_class=type(model).__name__,
            model_type=hf_cfg.model_type,
            dtype=str(dtype).removeprefix("torch."),
        ),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
        "## License",
        "",
        "Not set: this is a working export. `kfm release` writes a release folder with a license,",
        "a full model card, the data card and the release checks.",
        "",
    ]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)


def export_hf(
    state: dict[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    extra_readme: str | None = None,
    source: str | Path | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a transformers model directory for the kfm weights ``state`` of model ``cfg``.

    The directory holds model.safetensors, config.json, generation_config.json (greedy; bos/eos/pad
    ids from the tokenizer), the tokenizer files (when ``tokenizer_dir`` is given), a README.md
    model card stub with ``extra_readme`` appended, and ``kfm_export.json`` (kfm version, the
    ``source`` checkpoint, tokenizer and dtype) by which a later ``overwrite`` recognises the
    folder. ``max_shard_size`` (bytes or "5GB") splits the weights into shards (transformers'
    default otherwise). Everything is written into ``OUT.tmp-<pid>`` and renamed to ``out_dir``
    at the end, so a crash never leaves a half-written export under the final name and an old
    export is removed only once the new one is complete. Weights are cast to ``dtype``.

    Returns the output path. Raises ``OutputError`` (``kfm.fs``) when out_dir is not new or empty
    and not a kfm export with ``overwrite``, or is, contains or lies inside ``source``, the
    tokenizer, a checkpoint or a run directory (``kfm.fs.check_output_dir``); ``ExportError``
    when the tokenizer directory is missing or holds more tokens than ``cfg.vocab_size``, or the
    state dict's keys or shapes do not match ``cfg``.
    """
    inputs = [p for p in (source, tokenizer_dir) if p is not None]
    out = check_output_dir(out_dir, "export", inputs=inputs, overwrite=overwrite, flag="OUT_DIR")
    if not dtype.is_floating_point:
        raise ExportError(f"export dtype must be a floating point dtype, got {dtype}")

    tok = None
    bos_id = eos_id = pad_id = None
    if tokenizer_dir is not None:
        tok = _load_tokenizer(Path(tokenizer_dir), cfg.vocab_size)
        bos_id, eos_id, pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    hf_cfg = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype)
    hf_state = to_hf_state_dict(state, cfg)

    # Building on the meta device costs no memory or init time; load_state_dict(assign=True) then
    # adopts our tensors as the parameters.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    check_shapes(hf_state, model.state_dict())
    # Cast (and copy, detached from any autograd graph) before loading; the tied pair stays tied.
    cast: dict[int, Tensor] = {}
    hf_state = {
        k: cast.setdefault(id(v), v.detach().to(device="cpu", dtype=dtype).clone())
        for k, v in hf_state.items()
    }
    model.load_state_dict(hf_state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()
    # Non-persistent buffers (RoPE inv_freq) are not in the state dict; materialise them on CPU.
    _init_meta_buffers(model)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        do_sample=False,
        num_beams=1,
    )

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        # transformers 5 always writes safetensors; above max_shard_size it writes
        # model-0000k-of-0000n.safetensors plus model.safetensors.index.json.
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(str(tmp), **kwargs)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            _model_card(cfg, model, dtype, extra_readme), encoding="utf-8"
        )
        (tmp / EXPORT_MARKER).write_text(_marker(source, tokenizer_dir, dtype), encoding="utf-8")
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def check_shapes(state: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise ``ExportError`` naming each tensor of ``state`` whose shape differs from the tensor of
    the same name in ``expected`` (the model the config builds)."""
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if bad:
        raise ExportError(
            "checkpoint tensor shapes do not match the model config (check --model.d_model, "
            "--model.n_heads, --model.n_kv_heads, --model.ffn_hidden, --model.vocab_size):\n  "
            + "\n  ".join(bad)
        )


def _init_meta_buffers(model: torch.nn.Module) -> None:
    """Rebuild on CPU the modules whose buffers a meta-device build left empty (RoPE inv_freq).

    Those buffers are non-persistent, so the state dict never fills them; the rotary module is
    rebuilt from its config, which recomputes inv_freq exactly as a CPU build would.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "config"):
                setattr(parent, child_name, type(child)(child.config))
    left = [name for name, buf in model.named_buffers() if buf.is_meta]
    if left:
        raise ExportError(f"internal: buffers left on the meta device after export: {left}")
