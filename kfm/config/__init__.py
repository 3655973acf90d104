"""Typed config tree, YAML presets and dotted overrides."""

from kfm.config.loader import (
    ConfigError,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
    validate,
)
from kfm.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DataSourceConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TokenizerConfig",
    "TrainConfig",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "to_dict",
    "validate",
]
