"""fp8 training of the eligible Linear layers with torchao (tensorwise, rowwise, MXFP8).

`apply_fp8` swaps qualifying ``nn.Linear`` layers for torchao's float8 training modules (or, for
MXFP8, wraps their weights) in place. It runs on the single-device model BEFORE tensor parallel
and FSDP2 (`parallelize` calls it first): Float8Linear must be in place when FSDP2 wraps the
weights, because the fp8 all-gather relies on torchao's weight subclass being what FSDP2 shards.

Which layers qualify (`fp8_module_filter`):
- plain ``nn.Linear`` whose in_features and out_features are multiples of 16: fp8 GEMMs
  (``torch._scaled_mm``) need both the reduction and the output dimension divisible by 16; for
  MXFP8 the multiple is 32, the MX scaling-block size (one e8m0 scale per 32 elements).
- never the output projection (``output``, logits over the vocabulary): (1) it is tied to the
  input embedding by default, and a float8 weight subclass on a tied tensor would also reach the
  embedding lookup; (2) the logits feed the softmax cross-entropy directly, so its quantisation
  error lands on the loss unfiltered, which is why fp8 recipes conventionally keep the first and
  last layers in bf16; (3) at vocab 128k its GEMM is a few % of a block stack's FLOPs, so little
  speed is given up.

Emulation (``parallel.fp8_emulate``) runs the same casts and scaling but does the matmuls in high
precision on any device; it is how CPU tests exercise the code path. bf16 stays the default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

from kfm.config import ConfigError, ParallelConfig

TORCHAO_MISSING = "parallel.fp8 needs torchao: pip install 'kfm[gpu]'"
MXFP8_MISSING = (
    "parallel.fp8=mxfp8 needs torchao's MXFP8 training config "
    "(torchao.prototype.moe_training.config.MXFP8TrainingOpConfig, as in torchao 0.18); "
    "the installed torchao {version} lacks it: pip install -U 'kfm[gpu]', or use "
    "--parallel.fp8=tensorwise / rowwise"
)
EXCLUDED_FQNS = ("output",)
"""Module names never converted (see the module docstring for why)."""

# Minimum CUDA compute capability: float8 GEMMs need Ada/Hopper (8.9); MX block-scaled GEMMs
# need Blackwell (10.0, e.g. B200).
_MIN_CAPABILITY = {"tensorwise": (8, 9), "rowwise": (8, 9), "mxfp8": (10, 0)}


def _dim_multiple(recipe: str) -> int:
    return 32 if recipe == "mxfp8" else 16


def fp8_module_filter(recipe: str) -> Callable[[nn.Module, str], bool]:
    """Return ``filter(module, fqn) -> bool``: True for the Linear layers `recipe` may convert.

    True for an ``nn.Linear`` (exact type, so an already converted layer is not matched again)
    whose in/out features are multiples of 16 (32 for "mxfp8") and whose name is not in
    `EXCLUDED_FQNS`.
    """
    multiple = _dim_multiple(recipe)

    def module_filter(module: nn.Module, fqn: str) -> bool:
        if type(module) is not nn.Linear or fqn in EXCLUDED_FQNS:
            return False
        return module.in_features % multiple == 0 and module.out_features % multiple == 0

    return module_filter


def _check_config(cfg: ParallelConfig) -> None:
    if cfg.fp8_all_gather and cfg.fp8 != "tensorwise":
        raise ConfigError(
            f"parallel.fp8_all_gather=true needs parallel.fp8=tensorwise (got {cfg.fp8!r}): "
            "torchao's fp8 all-gather shares one scale per weight tensor, which only the "
            "tensorwise recipe has (set --parallel.fp8=tensorwise or --parallel.fp8_all_gather=false)"
        )


def _check_device(model: nn.Module, cfg: ParallelConfig) -> None:
    """Real (non-emulated) fp8 needs a CUDA GPU with fp8 tensor cores; say which flag to flip."""
    if cfg.fp8_emulate:
        return
    devices = {p.device.type for p in model.parameters()}
    on_cpu = "cpu" in devices or not torch.cuda.is_available()
    if on_cpu:
        raise ConfigError(
            f"parallel.fp8={cfg.fp8} without emulation needs a CUDA GPU with fp8 tensor cores "
            "(H100/B200-class); on CPU set --parallel.fp8_emulate=true (slow; for tests) "
            "or --parallel.fp8=none"
        )
    major, minor = torch.cuda.get_device_capability()
    need = _MIN_CAPABILITY[cfg.fp8]
    if (major, minor) < need:
        raise ConfigError(
            f"parallel.fp8={cfg.fp8} needs compute capability >= {need[0]}.{need[1]}, this GPU "
            f"({torch.cuda.get_device_name()}) has {major}.{minor}: use --parallel.fp8=none, "
            "--parallel.fp8=tensorwise (Hopper) or --parallel.fp8_emulate=true"
        )


@functools.cache
def _torchao_version() -> str:
    try:
        import torchao
    except ImportError as e:
        raise ImportError(TORCHAO_MISSING) from e
    return str(getattr(torchao, "__version__", "unknown"))


def _apply_float8(model: nn.Module, cfg: ParallelConfig) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # The recipe fixes the scaling; emulation and fp8 all-gather are per-run switches on top.
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(cfg.fp8),
        emulate=cfg.fp8_emulate,
        enable_fsdp_float8_all_gather=cfg.fp8_all_gather,
    )
    convert_to_float8_training(model, module_filter_fn=fp8_module_filter(cfg.fp8), config=config)


def _apply_mxfp8(model: nn.Module, cfg: ParallelConfig) -> None:
    try:
        from torchao.prototype.moe_training.config import (
            MXFP8TrainingOpConfig,
            MXFP8TrainingRecipe,
        )
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError(MXFP8_MISSING.format(version=_torchao_version())) from e
    # EMULATED does the MX casts with torch ops and the GEMM in high precision, on any device;
    # RCEIL (round-up scale exponents) is torchao's recommended Blackwell recipe.
    recipe = (
        MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL
        if cfg.fp8_emulate
        else MXFP8TrainingRecipe.MXFP8_RCEIL
    )
    quantize_(
        model, MXFP8TrainingOpConfig.from_recipe(recipe), filter_fn=fp8_module_filter(cfg.fp8)
    )


def apply_fp8(model: nn.Module, cfg: ParallelConfig) -> None:
    """Convert `model`'s eligible Linear layers in place to fp8 training per ``cfg.fp8``.

    "none": no-op. "tensorwise" / "rowwise": torchao ``convert_to_float8_training`` with the
    recipe of that name (dynamic scaling; rowwise scales each row with power-of-2 scales).
    "mxfp8": torchao's MXFP8 training config (Blackwell; 1x32 block scales). Call it on the
    single-device model, before tensor parallel and FSDP2. MXFP8 also needs the tokens per
    micro-batch (batch * seq_len) to be a multiple of 32, and bf16 parameters at compute time
    (FSDP2's param_dtype=bf16, the GPU path): torchao 0.18's emulated MXFP8 GEMM fails on fp32
    weights under autocast.

    Raises:
        ImportError: torchao is not installed (names ``pip install 'kfm[gpu]'``), or it lacks the
            MXFP8 training config when cfg.fp8 == "mxfp8".
        ConfigError: fp8_all_gather without the tensorwise recipe, or real (non-emulated) fp8
            on CPU or on a GPU without fp8 tensor cores.
    """
    _check_config(cfg)
    if cfg.fp8 == "none":
        return
    _torchao_version()  # raise the install hint before any other torchao import
    _check_device(model, cfg)
    if cfg.fp8 == "mxfp8":
        _apply_mxfp8(model, cfg)
    else:
        _apply_float8(model, cfg)


def fp8_converted_modules(model: nn.Module) -> list[str]:
    """Names of the modules running fp8: torchao Float8Linear layers, or Linear layers whose
    weight carries an MXFP8 training wrapper. For logging and tests."""

    def is_fp8(module: nn.Module) -> bool:
        if type(module).__name__ == "Float8Linear":
            return True
        return isinstance(module, nn.Linear) and "MXFP8" in type(module.weight.data).__name__

    return [name for name, module in model.named_modules() if is_fp8(module)]


def precompute_fp8_scales(model: nn.Module, cfg: ParallelConfig) -> None:
    """After ``optimizer.step()``: with fp8 all-gather, compute every FSDP2-sharded weight's
    fp8 scale in one all-reduce instead of one per layer inside the next forward.

    A no-op unless cfg.fp8 == "tensorwise" and cfg.fp8_all_gather. Optional for correctness;
    it only removes small collectives from the forward's critical path.
    """
    if cfg.fp8 != "tensorwise" or not cfg.fp8_all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
