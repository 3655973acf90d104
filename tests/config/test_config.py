import dataclasses
from pathlib import Path

import pytest
import yaml

from kfm.config import Config, ConfigError, load_config, parse_overrides, schema, to_dict

REPO = Path(__file__).resolve().parents[2]


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["--optim.lr=3e-4", "--model.n_kv_heads", "2"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_kv_heads == 2
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*'optim.lr'"):
        load_config(None, ["--optim.lrr=1e-3"])
    preset = tmp_path / "p.yaml"
    preset.write_text("modle:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match=r"p.yaml.*unknown config key 'modle'.*'model'"):
        load_config(preset)


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps='many'.*expected int, got str"):
        load_config(None, ["--train.steps=many"])
    with pytest.raises(ConfigError, match=r"model.qk_norm=1.*expected bool"):
        load_config(None, ["--model.qk_norm=1"])
    with pytest.raises(ConfigError, match=r"train.dtype='fp16' is not one of 'fp32' \| 'bf16'"):
        load_config(None, ["--train.dtype=fp16"])
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  sources:\n    - name: a\n")  # path missing
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*path"):
        load_config(preset)


def test_malformed_yaml_names_file_and_line(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("model:\n  d_model: 64\n   n_layers: [2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+"):
        load_config(preset)
    preset.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(preset)


def test_cross_field_validation_names_the_flag():
    with pytest.raises(ConfigError, match=r"--model.n_kv_heads to one of \[1, 2, 4\]"):
        load_config(None, ["--model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"--train.micro_batch_size"):
        load_config(None, ["--train.global_batch_size=6", "--train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"data.seq_len"):
        load_config(None, ["--data.seq_len=4096", "--model.max_seq_len=2048"])


def test_parallel_combinations_are_checked():
    with pytest.raises(ConfigError, match=r"--train.dtype=bf16"):
        load_config(None, ["--parallel.fp8=mxfp8"])
    with pytest.raises(ConfigError, match=r"--parallel.fp8=tensorwise"):
        load_config(None, ["--parallel.fp8=rowwise", "--parallel.fp8_all_gather=true"])
    with pytest.raises(ConfigError, match=r"--parallel.tp > 1"):
        load_config(None, ["--parallel.loss_parallel=true"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section and a key"):
        parse_overrides(["--lr=1"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--optim.lr"])


def test_every_field_has_a_docstring_and_a_single_default():
    """Defaults are declared once, each with a one-line docstring under it (STYLE.md)."""
    source = (REPO / "kfm/config/schema.py").read_text()
    for cls in (getattr(schema, n) for n in dir(schema)):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or cls is Config:
            continue
        for f in dataclasses.fields(cls):
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            after = source.split(line, 1)[1].lstrip().splitlines()[0]
            assert after.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset):
    load_config(preset)


def test_clock_like_values_stay_strings_and_dicts_are_typed(tmp_path):
    """YAML 1.1 would read 24:00:00 as the base-60 integer 86400; a Slurm time must stay a string.
    dict[str, float] sections check keys and values."""
    from dataclasses import dataclass, field

    from kfm.config.loader import build_section, parse_overrides, read_yaml

    @dataclass(kw_only=True, slots=True)
    class Section:
        time: str = ""
        lr: float = 0.0
        table: dict[str, float] = field(default_factory=dict)

    path = tmp_path / "c.yaml"
    path.write_text('time: 24:00:00\nlr: 3e-4\ntable: {"5": 0.15, "6": 1}\n')
    section = build_section(Section, read_yaml(path), "s")
    assert section.time == "24:00:00" and section.lr == 3e-4
    assert section.table == {"5": 0.15, "6": 1.0}
    assert parse_overrides(["--s.time=30:00"]) == {"s": {"time": "30:00"}}
    with pytest.raises(ConfigError, match=r"s\.table\.5='x' has the wrong type"):
        build_section(Section, {"table": {"5": "x"}}, "s")


def _numeric_fields() -> list[str]:
    """Every scalar int/float field of the config tree, as 'section.key'."""
    import typing

    hints = typing.get_type_hints(Config)
    keys = []
    for section, cls in hints.items():
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is list:
                continue
            args = set(typing.get_args(tp)) - {type(None)} or {tp}
            if args & {int, float}:
                keys.append(f"{section}.{name}")
    return keys


def test_every_numeric_field_has_a_range():
    """A number added to the schema without a range would reach torch unchecked."""
    from kfm.config.loader import NUMERIC_RANGES

    fields = _numeric_fields()
    assert "optim.lr" in fields and "train.global_batch_size" in fields
    assert sorted(set(fields) - set(NUMERIC_RANGES)) == []
    assert sorted(set(NUMERIC_RANGES) - set(fields)) == []  # no stale entries


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.global_batch_size=0", r"train.global_batch_size=0 must be >= 1 \(set --train"),
        ("--optim.lr=-1e-3", r"optim.lr=-0.001 must be > 0 \(set --optim.lr\)"),
        ("--optim.lr=.nan", r"optim.lr=nan must be a finite number"),
        ("--optim.lr=0", r"optim.lr=0.0 must be > 0"),
        ("--optim.betas=[0.9, 1.5]", r"optim.betas\[1\]=1.5 must be in \[0, 1\)"),
        ("--optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be >= 0"),
        ("--schedule.min_lr_ratio=2", r"schedule.min_lr_ratio=2.0 must be in \[0, 1\]"),
        ("--train.seed=-1", r"train.seed=-1 must be >= 0"),
        ("--data.seed=-5", r"data.seed=-5 must be >= 0"),
        ("--train.micro_batch_size=0", r"train.micro_batch_size=0 must be >= 1"),
        ("--parallel.dp_shard=0", r"parallel.dp_shard=0 must be >= 1 or -1"),
        ("--health.straggler_factor=0.5", r"health.straggler_factor=0.5 must be > 1 or 0"),
        ("--model.init_std=0", r"model.init_std=0.0 must be > 0"),
        ("--eval.batches=0", r"eval.batches=0 must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_allowed_special_values_still_load():
    cfg = load_config(
        None, ["--parallel.dp_shard=-1", "--health.straggler_factor=0", "--optim.grad_clip=0"]
    )
    assert (cfg.parallel.dp_shard, cfg.health.straggler_factor, cfg.optim.grad_clip) == (-1, 0, 0)
