"""Hugging Face model folder -> kfm checkpoint, for continued pretraining from an open model.

The inverse of `kfm.export.hf`: a local transformers folder of a ``LlamaForCausalLM`` (or a
``Qwen3ForCausalLM``: Llama plus per-head q/k RMSNorm) becomes a kfm checkpoint that ``kfm
train`` starts from with ``checkpoint.init_from`` (weights only: fresh optimizer, schedule and
data order from step 0). Only what kfm's model computes exactly is accepted; anything else
(scaled RoPE, biases, sliding-window layers, another activation, a head_dim other than
hidden_size / num_attention_heads) is refused naming the config.json key.

Weights are read tensor by tensor from the safetensors shards (``safe_open``), straight into the
parameters of a model built on the meta device. Under torchrun every rank builds the model
FSDP2-sharded over all ranks and reads only its own slice of each tensor (``get_slice``), so no
rank ever holds a full copy of the model; a single process holds the model plus one tensor.

Output layout (``OUT``)::

    kfm_import.json              what made it: source folder, architecture, bytes read per rank
    train.yaml                   a preset to start from: model, tokenizer.path, init_from
    tokenizer/                   the folder's tokenizer files, byte for byte + kfm_tokenizer.json
    checkpoints/step_000000/     DCP model state (fp32), manifest.json (no optimizer state)
    checkpoints/latest -> step_000000
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

import kfm
from kfm.checkpoint.stepdir import rank_world
from kfm.config import Config, DataConfig, ModelConfig, TokenizerConfig, to_dict
from kfm.export.hf import _WRAPPER_PREFIXES, _describe, _name_pairs
from kfm.fs import IMPORT_FORMAT, IMPORT_MARKER, check_output_dir, publish_dir
from kfm.model import Transformer, ffn_hidden_dim
from kfm.model.transformer import rope_tables

SUPPORTED = {"llama": ("LlamaForCausalLM", False), "qwen3": ("Qwen3ForCausalLM", True)}
"""model_type -> (the one architecture class accepted, kfm's qk_norm)."""
TOKENIZER_DIR = "tokenizer"
TRAIN_PRESET = "train.yaml"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files transformers writes or reads; copied as they are (tokenizer.json is required).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class HFImportError(ValueError):
    """A Hugging Face folder kfm cannot import; the message names the file/key and the fix."""


# -- config --------------------------------------------------------------------------------------


def _read_hf_config(hf_dir: Path) -> Any:
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir} is not a directory: pass a local transformers model folder")
    if not (hf_dir / "config.json").is_file():
        raise HFImportError(
            f"{hf_dir / 'config.json'} is missing: pass a folder written by "
            "transformers' save_pretrained (config.json + *.safetensors + tokenizer)"
        )
    from transformers import AutoConfig

    try:
        # AutoConfig maps legacy fields (top-level rope_theta, rope_scaling) to today's names.
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise HFImportError(f"{hf_dir / 'config.json'}: transformers cannot read it ({e})") from e


def model_config_from_hf(hf_dir: str | Path) -> ModelConfig:
    """The kfm ``ModelConfig`` that computes exactly the model of the transformers folder
    ``hf_dir`` (its config.json).

    ``model_type`` llama gives ``qk_norm=False``, qwen3 ``qk_norm=True``; ``max_seq_len`` is
    ``max_position_embeddings`` and ``init_std`` is ``initializer_range``. ``n_kv_heads`` is
    None when it equals the head count and ``ffn_hidden`` None when kfm's derived width is
    ``intermediate_size``, so a kfm export imports back to the config it came from.
    ``attention_dropout`` is not carried over (kfm trains without dropout).

    Raises:
        HFImportError: naming the config.json key kfm cannot compute exactly: another
            model_type or architecture, ``hidden_act`` other than silu, ``attention_bias`` or
            ``mlp_bias``, a ``rope_type`` other than default (``rope_scaling``), sliding-window
            layers (``layer_types``), ``head_dim`` other than
            ``hidden_size // num_attention_heads``, or head counts that do not divide.
    """
    hf_dir = Path(hf_dir)
    hf = _read_hf_config(hf_dir)
    where = hf_dir / "config.json"
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED:
        raise HFImportError(
            f"{where}: model_type={model_type!r} is not importable; kfm computes exactly "
            f"{', '.join(f'{k} ({v[0]})' for k, v in SUPPORTED.items())}"
        )
    arch, qk_norm = SUPPORTED[model_type]
    archs = getattr(hf, "architectures", None) or [arch]
    if archs != [arch]:
        raise HFImportError(
            f"{where}: architectures={archs}; kfm imports a causal LM ({arch}) only"
        )

    def refuse(key: str, value: Any, why: str) -> HFImportError:
        return HFImportError(
            f"{where}: {key}={value!r} {why}; kfm's model cannot compute it exactly, so it is "
            "not imported (continued pretraining needs the same function the model was trained as)"
        )

    if hf.hidden_act != "silu":
        raise refuse("hidden_act", hf.hidden_act, "is not silu (kfm's MLP is SwiGLU)")
    if getattr(hf, "attention_bias", False):
        raise refuse("attention_bias", True, "adds biases to q/k/v/o (kfm has none)")
    if getattr(hf, "mlp_bias", False):
        raise refuse("mlp_bias", True, "adds biases to the MLP (kfm has none)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse(
            "rope_scaling.rope_type", rope_type, "scales RoPE (kfm's RoPE is the default one)"
        )
    # layer_types is what transformers' Qwen3 attends by (use_sliding_window only fills it).
    layer_types = getattr(hf, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise refuse(
            "layer_types",
            layer_types[sliding[0]],
            f"makes layers {sliding} attend over a sliding window (kfm attends over the full "
            "causal context)",
        )
    d_model, n_heads = int(hf.hidden_size), int(hf.num_attention_heads)
    if d_model % n_heads:
        raise refuse("num_attention_heads", n_heads, f"does not divide hidden_size={d_model}")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and int(head_dim) != d_model // n_heads:
        raise refuse(
            "head_dim",
            head_dim,
            f"differs from hidden_size / num_attention_heads = {d_model // n_heads} (kfm "
            "derives head_dim from them)",
        )
    if (d_model // n_heads) % 2:
        raise refuse("head_dim", d_model // n_heads, "is odd (RoPE rotates pairs)")
    n_kv = int(getattr(hf, "num_key_value_heads", None) or n_heads)
    if n_heads % n_kv:
        raise refuse("num_key_value_heads", n_kv, f"does not divide num_attention_heads={n_heads}")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise refuse("rope_theta", None, "is missing")
    cfg = ModelConfig(
        vocab_size=int(hf.vocab_size),
        d_model=d_model,
        n_layers=int(hf.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        ffn_hidden=int(hf.intermediate_size),
        rope_theta=float(theta),
        max_seq_len=int(hf.max_position_embeddings),
        norm_eps=float(hf.rms_norm_eps),
        qk_norm=qk_norm,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=float(getattr(hf, "initializer_range", 0.02)),
    )
    derived = ModelConfig(d_model=d_model)  # ffn_hidden None, default ffn_multiple_of
    if ffn_hidden_dim(derived) == cfg.ffn_hidden:
        cfg.ffn_hidden = None
    return cfg


# -- weights -------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_hf_weights` read on this rank."""

    tensors: int
    """Parameters filled."""
    bytes_read: int
    """Bytes read from the safetensors files (the stored dtype): this rank's slices only."""
    largest_read: int
    """The largest single read in bytes: the most memory the load holds beyond the model."""
    files: int
    """safetensors files opened."""
    seconds: float


def weight_map(hf_dir: str | Path) -> dict[str, Path]:
    """``{HF tensor name: safetensors file}`` of the folder (model.safetensors, or the shards of
    model.safetensors.index.json), reading only the files' headers.

    Raises:
        HFImportError: no safetensors weights (e.g. only pytorch_model.bin), or an index naming
            a file that is missing.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / _INDEX_FILE
    if index.is_file():
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise HFImportError(f"{index} has no readable weight_map ({e})") from e
        out = {name: hf_dir / file for name, file in entries.items()}
        missing = sorted({str(p) for p in out.values() if not p.is_file()})
        if missing:
            raise HFImportError(f"{index} names shard files that are missing: {missing}")
        return out
    single = hf_dir / _SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    raise HFImportError(
        f"{hf_dir} has neither {_SINGLE_FILE} nor {_INDEX_FILE}: kfm reads safetensors only "
        "(load the model with transformers and save_pretrained() it again to convert)"
    )


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local_target(param: Tensor) -> tuple[Tensor, tuple[slice, ...]]:
    """The tensor to fill on this rank and its index into the full (global) tensor: the whole
    tensor for a plain parameter, this rank's shard for a DTensor (FSDP2 / tensor parallel)."""
    if isinstance(param, DTensor):
        # Private but what DCP uses for the same question: (local shape, offset in the global).
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return param, tuple(slice(0, s) for s in param.shape)


@torch.no_grad()
def load_hf_weights(
    model: nn.Module, hf_dir: str | Path, *, cfg: ModelConfig | None = None
) -> LoadReport:
    """Fill the parameters of the kfm ``Transformer`` ``model`` from the safetensors of the
    transformers folder ``hf_dir``, and recompute its RoPE tables.

    ``model`` may be built on the meta device and then ``to_empty``'d, and may be FSDP2 /
    tensor-parallel sharded (DTensor parameters): each rank then reads only its own slice of
    each tensor (``safe_open(...).get_slice``), one tensor at a time, so peak memory is the
    model's own (sharded) memory plus the largest slice. Values are cast to each parameter's
    dtype. Wrapper prefixes (torch.compile, activation checkpointing) are ignored. With tied
    embeddings, a plain model that ``to_empty`` untied (it does) is tied again; a sharded one
    gets the embedding in both. ``cfg`` defaults to ``model.cfg``.

    Raises:
        HFImportError: a tensor is missing or has another shape than ``cfg`` implies, or the
            folder holds tensors kfm's model has no place for (e.g. biases), all named.
    """
    from safetensors import safe_open

    t0 = time.perf_counter()
    cfg = cfg if cfg is not None else model.cfg  # type: ignore[assignment]
    assert isinstance(cfg, ModelConfig)
    hf_dir = Path(hf_dir)
    files = weight_map(hf_dir)
    to_hf = dict(_name_pairs(cfg))
    if cfg.tie_embeddings and isinstance(model, Transformer):
        if model.output.weight is not model.tok_embeddings.weight and not isinstance(
            model.tok_embeddings.weight, DTensor
        ):
            model.output.weight = model.tok_embeddings.weight
        if "lm_head.weight" not in files:
            to_hf["output.weight"] = to_hf["tok_embeddings.weight"]

    plan: dict[Path, list[tuple[str, Tensor]]] = defaultdict(list)
    missing, unknown = [], []
    for name, param in model.named_parameters():
        hf_name = to_hf.get(_clean(name))
        if hf_name is None:
            unknown.append(_clean(name))
        elif hf_name not in files:
            missing.append(hf_name)
        else:
            plan[files[hf_name]].append((hf_name, param))
    used = {hf_name for items in plan.values() for hf_name, _ in items}
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(
        k for k in files.keys() - used - ignorable if not k.endswith("rotary_emb.inv_freq")
    )
    if unknown:
        raise HFImportError(f"internal: kfm parameters without an HF name: {unknown}")
    if missing or unexpected:
        lines = [f"{hf_dir} does not hold the tensors of its config ({_describe(cfg)}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(sorted(missing))}")
        if unexpected:
            lines.append(
                f"  not part of kfm's model ({len(unexpected)}): {', '.join(unexpected[:20])}"
            )
        raise HFImportError("\n".join(lines))

    bytes_read = largest = 0
    for file, items in plan.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name, target_param in items:
                piece = f.get_slice(hf_name)
                stored = tuple(piece.get_shape())
                if stored != tuple(target_param.shape):
                    raise HFImportError(
                        f"{file.name}: {hf_name} has shape {stored} but the config implies "
                        f"{tuple(target_param.shape)}; config.json and the weights disagree"
                    )
                target, index = _local_target(target_param)
                if target.numel() == 0:
                    continue  # an empty shard (more ranks than rows)
                value = piece[index]  # (local shape) in the stored dtype: the only copy read
                target.copy_(value.to(device=target.device))
                n = value.numel() * value.element_size()
                bytes_read += n
                largest = max(largest, n)
                del value
    _fill_rope(model, cfg)
    return LoadReport(
        tensors=sum(len(v) for v in plan.values()),
        bytes_read=bytes_read,
        largest_read=largest,
        files=len(plan),
        seconds=time.perf_counter() - t0,
    )


def _fill_rope(model: nn.Module, cfg: ModelConfig) -> None:
    """RoPE tables are non-persistent buffers: a meta build + to_empty leaves them garbage."""
    buffers = dict(model.named_buffers())
    cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    for name, buf in buffers.items():
        if name.endswith("rope_cos"):
            buf.copy_(cos)
        elif name.endswith("rope_sin"):
            buf.copy_(sin)


# -- tokenizer -----------------------------------------------------------------------------------


def _copy_tokenizer(hf_dir: Path, dst: Path, vocab_size: int) -> dict[str, Any]:
    """Copy the tokenizer files byte for byte (so its tokenizer_hash is the folder's own) and
    write kfm_tokenizer.json; returns that metadata."""
    from kfm.tokenizer.core import METADATA_FILE, TOKENIZER_FILE, load_tokenizer, tokenizer_hash

    if not (hf_dir / TOKENIZER_FILE).is_file():
        raise HFImportError(
            f"{hf_dir / TOKENIZER_FILE} is missing: kfm needs a fast tokenizer's tokenizer.json "
            "(load the folder's tokenizer with transformers.AutoTokenizer and save_pretrained() "
            "it into the folder to write one)"
        )
    dst.mkdir(parents=True)
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, dst / name)
    try:
        tok = load_tokenizer(dst)
    except (TypeError, ValueError, OSError) as e:
        raise HFImportError(
            f"{hf_dir}: its tokenizer does not load with AutoTokenizer ({e})"
        ) from e
    if len(tok) > vocab_size:
        raise HFImportError(
            f"{hf_dir}: the tokenizer has {len(tok)} tokens but config.json vocab_size="
            f"{vocab_size}: the embedding has no row for some of them"
        )
    meta = {
        "imported_from": str(hf_dir),
        "vocab_size": len(tok),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id,
        "tokenizer_hash": tokenizer_hash(dst),
    }
    (dst / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# -- the import ----------------------------------------------------------------------------------


@dataclass
class ImportResult:
    """What `import_hf` wrote."""

    out: Path
    checkpoint: Path
    """The step dir training starts from (``OUT/checkpoints/step_000000``)."""
    model: ModelConfig
    architecture: str
    tokenizer_hash: str
    reports: list[LoadReport]
    """One per rank, in rank order."""


def _broadcast(obj: Any) -> Any:
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _empty_model(cfg: ModelConfig, world_size: int) -> nn.Module:
    """The model on the meta device (no memory, no init), FSDP2-sharded over every rank when
    there are several, then given uninitialised CPU storage (each rank: its shards only)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from kfm.config import ParallelConfig
        from kfm.parallel.fsdp import apply_fsdp

        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
        apply_fsdp(model, mesh, ParallelConfig(), param_dtype=None, reduce_dtype=torch.float32)
    model.to_empty(device="cpu")
    return model


def _preset(cfg: ModelConfig, out: Path) -> str:
    import yaml

    preset: dict[str, Any] = {
        "model": {k: v for k, v in asdict(cfg).items() if v != getattr(ModelConfig(), k)},
        "tokenizer": {"path": str(out / TOKENIZER_DIR)},
        "checkpoint": {"init_from": str(out)},
    }
    if cfg.max_seq_len < DataConfig().seq_len:  # the default sequence would not fit RoPE's table
        preset["data"] = {"seq_len": cfg.max_seq_len}
    text = yaml.safe_dump(preset, sort_keys=False)
    return (
        f"# Written by `kfm import-hf`: the imported architecture and tokenizer, and init_from.\n"
        f"# Train from it: kfm train {out / TRAIN_PRESET} --data.sources=... (shards packed with\n"
        f"# `kfm pack --tokenizer {out / TOKENIZER_DIR}`), or copy these keys into a preset.\n"
        + text
    )


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ImportResult:
    """Convert the transformers folder ``hf_dir`` into the kfm checkpoint folder ``out_dir``.

    Writes (layout in this module's docstring) the model state as a DCP checkpoint at step 0
    without optimizer state (fp32, whatever the folder's dtype: kfm trains fp32 master weights),
    whose manifest holds the full kfm config (the imported ``model``, ``tokenizer.path`` =
    ``OUT/tokenizer``) and the tokenizer's hash; the tokenizer copied byte for byte;
    ``train.yaml``; and ``kfm_import.json``, by which a later ``overwrite`` recognises the
    folder. Built in ``OUT.tmp-<pid>`` and renamed at the end.

    Under torchrun (a process group is up) every rank calls it: the model is FSDP2-sharded over
    all ranks and each rank reads and writes only its shards; the folder must be on a file
    system every rank sees.

    Raises:
        HFImportError: what `model_config_from_hf` / `load_hf_weights` refuse, a missing or
            non-fast tokenizer, or one larger than the vocabulary.
        OutputError: ``out_dir`` is not new or empty and not an earlier import with
            ``overwrite``, or is, contains or lies inside ``hf_dir``, a checkpoint or a run.
    """
    from kfm.checkpoint import save_checkpoint
    from kfm.checkpoint.stepdir import all_gather
    from kfm.tokenizer.core import tokenizer_hash

    rank, world_size = rank_world()
    hf_dir = Path(hf_dir).resolve()
    cfg = model_config_from_hf(hf_dir)
    weight_map(hf_dir)  # no safetensors: refused before anything is written
    out = check_output_dir(out_dir, "import", inputs=[hf_dir], overwrite=overwrite, flag="OUT")
    hf_cfg = _read_hf_config(hf_dir)
    arch = SUPPORTED[hf_cfg.model_type][0]
    tmp = out.parent / _broadcast(f"{out.name}.tmp-{os.getpid()}")
    try:
        problem = None
        if rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                _copy_tokenizer(hf_dir, tmp / TOKENIZER_DIR, cfg.vocab_size)
            except HFImportError as e:
                problem = str(e)
        problem = _broadcast(problem)
        if problem is not None:
            raise HFImportError(problem)
        tok_hash = tokenizer_hash(tmp / TOKENIZER_DIR)
        model = _empty_model(cfg, world_size)
        report = load_hf_weights(model, hf_dir, cfg=cfg)
        # The manifest's config must itself be valid (kfm eval/export read it back).
        config = Config(
            model=cfg,
            tokenizer=TokenizerConfig(path=str(out / TOKENIZER_DIR)),
            data=DataConfig(seq_len=min(DataConfig().seq_len, cfg.max_seq_len)),
        )
        extra = {
            "tokenizer_hash": tok_hash,
            "imported_from": {"hf_dir": str(hf_dir), "architecture": arch},
        }
        step_dir = save_checkpoint(
            tmp / "checkpoints",
            0,
            model=model,
            optimizer=None,
            trainer_state={"imported_from": str(hf_dir)},
            config=to_dict(config),
            manifest_extra=extra,
        )
        reports = all_gather(report)
        problem = None
        if rank == 0:
            try:
                _finish(tmp, out, cfg, arch, hf_dir, tok_hash, reports, overwrite=overwrite)
            except Exception as e:  # the other ranks raise it too instead of waiting
                problem = f"{type(e).__name__}: {e}"
        problem = _broadcast(problem)  # every rank returns once the folder is in place
        if problem is not None:
            raise HFImportError(f"writing {out} failed: {problem}")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(
        out=out,
        checkpoint=out / "checkpoints" / step_dir.name,
        model=cfg,
        architecture=arch,
        tokenizer_hash=tok_hash,
        reports=reports,
    )


def _finish(
    tmp: Path,
    out: Path,
    cfg: ModelConfig,
    arch: str,
    hf_dir: Path,
    tok_hash: str,
    reports: list[LoadReport],
    *,
    overwrite: bool,
) -> None:
    """Rank 0: the preset and the marker, then the finished folder renamed into place."""
    marker = {
        "format": IMPORT_FORMAT,
        "version": 1,
        "created_by": f"kfm {kfm.__version__}",
        "source": str(hf_dir),
        "architecture": arch,
        "model": asdict(cfg),
        "tokenizer_hash": tok_hash,
        "world_size": len(reports),
        "per_rank": [asdict(r) for r in reports],
    }
    (tmp / TRAIN_PRESET).write_text(_preset(cfg, out), encoding="utf-8")
    (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    publish_dir(tmp, out, overwrite=overwrite)
