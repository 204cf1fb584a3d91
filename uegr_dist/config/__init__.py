"""Run configuration: typed dataclasses, YAML loading, CLI overrides, validation."""

from uegr_dist.config.loading import ConfigError, config_to_dict, load_config, parse_overrides
from uegr_dist.config.schema import (
    AdversaryConfig,
    Config,
    DataConfig,
    DropoutConfig,
    MaskConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "AdversaryConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DropoutConfig",
    "MaskConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
]
