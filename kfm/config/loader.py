"""YAML presets + dotted CLI overrides -> a validated :class:`Config`.

Every error is a :class:`ConfigError` naming the file or flag that fixes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from kfm.config.errors import ConfigError
from kfm.config.faults import parse_fault
from kfm.config.schema import Config

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers: ``time: 24:00:00`` (a Slurm time limit)
    stays the string it looks like instead of becoming the integer 86400."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys: {', '.join(prefix + v for v in sorted(valid))}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if get_origin(tp) is dict:
        key_tp, value_tp = get_args(tp)
        return f"dict[{_type_name(key_tp)}, {_type_name(value_tp)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}={value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
        key_tp, value_tp = get_args(tp)
        return {
            _coerce(k, key_tp, f"{where} key"): _coerce(v, value_tp, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}={value!r}: expected None")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} has the wrong type: expected bool (true/false)")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(
            f"{where}={value!r} has the wrong type: expected {tp.__name__}, got {type(value).__name__}"
        )
    return value


def build_section(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build the dataclass ``cls`` from a YAML mapping, checking keys and types; ``where`` is the
    dotted prefix errors name (e.g. ``"quality"``). ``__post_init__`` ValueErrors become ConfigError.

    Raises:
        ConfigError: unknown key (closest valid key suggested), wrong type, or a failed check.
    """
    try:
        return _build(cls, data, where)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            hint = _suggest(key, names, f"{where}." if where else "")
            raise ConfigError(f"unknown config key '{path}': {hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. data.sources[i].path) is missing
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
        node = child
    node[leaf] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``top``, recursively for nested dicts (neither is modified)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset; a malformed file raises ConfigError with the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"malformed YAML in {path}{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--optim.lr=3e-4', '--train.steps', '20']`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --section.key=value"
            )
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            raw, i = args[i + 1], i + 1
        if "." not in key:
            raise ConfigError(f"--{key}: overrides name a section and a key, e.g. --optim.lr=3e-4")
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
        i += 1
    return tree


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset at ``path`` <- dotted ``overrides``; validated."""
    data = read_yaml(path) if path else {}
    source = str(path) if path else "defaults"
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source += " + command-line overrides"
    return config_from_dict(data, source)


def to_dict(cfg: Any) -> Any:
    """Config -> plain dict/list/scalars (YAML/JSON serialisable)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _Range:
    """Allowed values of one numeric field: lo <= x (lo < x if lo_open) and x <= hi (x < hi)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()
    """Values allowed outside the range (e.g. -1 = "the rest of the world")."""

    def ok(self, x: float) -> bool:
        if x in self.also:
            return True
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        parts = []
        if self.lo is not None and self.hi is not None:
            parts.append(
                f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            )
        elif self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        elif self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        parts += [f"{v:g}" for v in self.also]
        return " or ".join(parts)


_POSITIVE = _Range(lo=0, lo_open=True)
_AT_LEAST_1 = _Range(lo=1)
_NON_NEGATIVE = _Range(lo=0)
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
"""data.sources[].language: an IETF-style code, part of a metric name (val_bpb/lang/ko)."""
_FRACTION = _Range(lo=0, hi=1)

NUMERIC_RANGES: dict[str, _Range] = {
    "model.vocab_size": _AT_LEAST_1,
    "model.d_model": _AT_LEAST_1,
    "model.n_layers": _AT_LEAST_1,
    "model.n_heads": _AT_LEAST_1,
    "model.n_kv_heads": _AT_LEAST_1,
    "model.ffn_hidden": _AT_LEAST_1,
    "model.ffn_multiple_of": _AT_LEAST_1,
    "model.rope_theta": _POSITIVE,
    "model.max_seq_len": _AT_LEAST_1,
    "model.norm_eps": _POSITIVE,
    "model.init_std": _POSITIVE,
    "model.logit_softcap": _NON_NEGATIVE,
    "tokenizer.vocab_size": _AT_LEAST_1,
    "tokenizer.min_frequency": _AT_LEAST_1,
    "tokenizer.n_reserved": _NON_NEGATIVE,
    "tokenizer.max_chars": _AT_LEAST_1,
    "data.seq_len": _AT_LEAST_1,
    "data.seed": _NON_NEGATIVE,  # numpy's default_rng refuses negative seeds
    "optim.lr": _POSITIVE,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.grad_clip": _NON_NEGATIVE,
    "optim.z_loss": _NON_NEGATIVE,
    "optim.muon_momentum": _Range(lo=0, hi=1, hi_open=True),
    "optim.muon_momentum_start": _Range(lo=0, hi=1, hi_open=True),
    "optim.muon_momentum_warmup": _NON_NEGATIVE,
    "optim.muon_ns_steps": _Range(lo=1, hi=99),
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.decay_fraction": _FRACTION,
    "schedule.decay_steps": _NON_NEGATIVE,
    "schedule.min_lr_ratio": _FRACTION,
    "train.steps": _AT_LEAST_1,
    "train.global_batch_size": _AT_LEAST_1,
    "train.micro_batch_size": _AT_LEAST_1,
    "train.batch_ramp_start": _NON_NEGATIVE,
    "train.batch_ramp_steps": _NON_NEGATIVE,
    "train.seed": _NON_NEGATIVE,  # numpy.random.seed refuses negative seeds
    "train.peak_tflops": _POSITIVE,
    "train.ema_decay": _Range(lo=0, hi=1, hi_open=True),
    "parallel.dp_replicate": _Range(lo=1, also=(-1,)),
    "parallel.dp_shard": _Range(lo=1, also=(-1,)),
    "parallel.tp": _AT_LEAST_1,
    "parallel.ac_every": _AT_LEAST_1,
    "parallel.collective_timeout_s": _POSITIVE,
    "checkpoint.interval": _NON_NEGATIVE,
    "checkpoint.keep_last": _NON_NEGATIVE,
    "logging.interval": _AT_LEAST_1,
    "eval.interval": _NON_NEGATIVE,
    "eval.batches": _AT_LEAST_1,
    "eval.task_limit": _NON_NEGATIVE,
    "eval.task_fewshot": _NON_NEGATIVE,
    "guard.spike_sigma": _NON_NEGATIVE,
    "guard.spike_window": _Range(lo=2),
    "guard.max_consecutive_skips": _AT_LEAST_1,
    "health.watchdog_s": _NON_NEGATIVE,
    "health.watchdog_first_step_s": _NON_NEGATIVE,
    "health.straggler_factor": _Range(lo=1, lo_open=True, also=(0,)),
    "health.straggler_min_s": _NON_NEGATIVE,
}
"""The allowed range of every scalar int/float field of the config (None, where a field allows
it, is always accepted); a test checks that no numeric field of the schema is missing here, so a
bad number fails at load time (and `--dry-run`) instead of deep inside training."""


def _check_numbers(cfg: Config) -> None:
    for key, allowed in NUMERIC_RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number (set --{key})")
        if not allowed.ok(value):
            raise ConfigError(f"{key}={value} must be {allowed.describe()} (set --{key})")
    for i, beta in enumerate(cfg.optim.betas):
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ConfigError(
                f"optim.betas[{i}]={beta} must be in [0, 1) (set --optim.betas='[0.9, 0.95]')"
            )
    for i, src in enumerate(cfg.data.sources):
        if not (math.isfinite(src.weight) and src.weight > 0):
            raise ConfigError(
                f"data.sources[{i}].weight={src.weight} must be a finite number > 0 "
                f"(source {src.name!r})"
            )
        if src.language is not None and not _LANGUAGE.fullmatch(src.language):
            raise ConfigError(
                f"data.sources[{i}].language={src.language!r} must be a language code such as "
                f"en, ko or zh-hant (letters, digits and '-'; source {src.name!r})"
            )


def validate(cfg: Config) -> None:
    """Range checks of every number, then cross-field checks; each error names the flag that
    fixes it."""
    _check_numbers(cfg)
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model} (set --model.n_heads)"
        )
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"head_dim = d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE "
            "(change --model.d_model or --model.n_heads)"
        )
    n_kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    if n_kv <= 0 or m.n_heads % n_kv:
        divisors = [k for k in range(1, m.n_heads + 1) if m.n_heads % k == 0]
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
            f"(set --model.n_kv_heads to one of {divisors})"
        )
    if m.zero_init_head and m.tie_embeddings:
        raise ConfigError(
            "model.zero_init_head=true needs an untied head: a tied head is the embedding table, "
            "which must not start at zero (set --model.tie_embeddings=false)"
        )
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} must be in 1..model.max_seq_len={m.max_seq_len} "
            "(set --data.seq_len or --model.max_seq_len)"
        )
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: names must be unique, got {names}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size={t.micro_batch_size} (set --train.micro_batch_size)"
        )
    _check_batch_ramp(cfg)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must have two values, e.g. [0.9, 0.95]")
    par = cfg.parallel
    if par.loss_parallel and par.tp == 1:
        raise ConfigError(
            "parallel.loss_parallel=true needs tensor parallelism (set --parallel.tp > 1)"
        )
    if par.fp8 == "mxfp8" and cfg.train.dtype != "bf16":
        # torchao's MXFP8 training expects bf16 parameters (FSDP2's bf16 param dtype); with fp32
        # weights under autocast its emulated kernels fail.
        raise ConfigError("parallel.fp8=mxfp8 needs bf16 parameters: set --train.dtype=bf16")
    if par.fp8_all_gather and par.fp8 != "tensorwise":
        raise ConfigError("parallel.fp8_all_gather=true needs --parallel.fp8=tensorwise")
    if cfg.optim.name == "muon":
        if par.backend == "deepspeed":
            # ZeRO hands the optimizer flat 1-D partitions of many parameters: no matrix to
            # orthogonalise.
            raise ConfigError(
                "optim.name=muon is not supported with parallel.backend=deepspeed; use "
                "parallel.backend=fsdp (or --optim.name=adamw)"
            )
        import torch  # here, not at the top: loading a config needs no torch otherwise

        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(
                f"optim.name=muon needs torch >= 2.9 (torch.optim.Muon); torch {torch.__version__} "
                "is installed: pip install 'torch>=2.9', or set --optim.name=adamw"
            )
    if t.ema_decay > 0 and par.backend == "deepspeed":
        # The DeepSpeed engine owns its (partitioned) fp32 weights; kfm has no hook on them.
        raise ConfigError(
            "train.ema_decay > 0 is not supported with parallel.backend=deepspeed; use "
            "parallel.backend=fsdp (or --train.ema_decay=0)"
        )
    for spec in cfg.debug.faults:
        parse_fault(spec)
    h = cfg.health
    if h.profile_steps and (
        len(h.profile_steps) != 2 or not 1 <= h.profile_steps[0] <= h.profile_steps[1]
    ):
        raise ConfigError(
            f"health.profile_steps={h.profile_steps} must be [first, last] with "
            "1 <= first <= last, e.g. --health.profile_steps='[10, 12]'"
        )


def _check_batch_ramp(cfg: Config) -> None:
    """train.batch_ramp_*: the checks that need no world size (kfm/train/ramp.py checks the
    data-parallel multiple once the mesh is known)."""
    t = cfg.train
    start, steps, full = t.batch_ramp_start, t.batch_ramp_steps, t.global_batch_size
    if start == 0:
        if steps:
            raise ConfigError(
                f"train.batch_ramp_steps={steps} needs train.batch_ramp_start > 0 (the global "
                "batch at step 1): set --train.batch_ramp_start, or --train.batch_ramp_steps=0"
            )
        return
    if cfg.parallel.backend == "deepspeed":
        raise ConfigError(
            "train.batch_ramp_start > 0 is not supported with parallel.backend=deepspeed; use "
            "parallel.backend=fsdp (or --train.batch_ramp_start=0)"
        )
    if steps < 1:
        raise ConfigError(
            f"train.batch_ramp_start={start} needs train.batch_ramp_steps >= 1 (the steps over "
            "which the batch grows): set --train.batch_ramp_steps, or --train.batch_ramp_start=0"
        )
    if start > full:
        raise ConfigError(
            f"train.batch_ramp_start={start} must be <= train.global_batch_size={full} (the "
            "batch grows up to it): lower --train.batch_ramp_start"
        )
    fits = [d for d in range(t.micro_batch_size, full + 1, t.micro_batch_size) if full % d == 0]
    if start % t.micro_batch_size or full % start:
        raise ConfigError(
            f"train.batch_ramp_start={start} must be a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} and divide train.global_batch_size={full} (the batch grows in "
            f"stages of batch_ramp_start sequences): set --train.batch_ramp_start to one of "
            f"{', '.join(map(str, fits[:6]))}"
        )


# re-exported for callers that only need types
__all__ = [
    "ConfigError",
    "config_from_dict",
    "deep_merge",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "to_dict",
    "validate",
]
