"""Run configuration: typed dataclasses, YAML loading, CLI overrides, validation."""

from uegr_dist.config.loading import ConfigError, config_to_dict, load_config, parse_overrides
from uegr_dist.config.schema import (
    AdversaryConfig,
    ASAConfig,
    AverageConfig,
    Config,
    DataConfig,
    DropoutConfig,
    FreeLBConfig,
    HyPeConfig,
    MaskConfig,
    MethodConfig,
    ModelConfig,
    RDropConfig,
    SMARTConfig,
    TrainConfig,
)

__all__ = [
    "ASAConfig",
    "AdversaryConfig",
    "AverageConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DropoutConfig",
    "FreeLBConfig",
    "HyPeConfig",
    "MaskConfig",
    "MethodConfig",
    "ModelConfig",
    "RDropConfig",
    "SMARTConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
]
