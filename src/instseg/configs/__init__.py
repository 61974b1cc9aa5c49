"""Typed configs: the model zoo and dotted-key overrides."""

from .overrides import ConfigError, apply_overrides, from_dict, set_value, to_dict
from .zoo import ZOO, DataConfig, EvalConfig, ExperimentConfig, get_config

__all__ = [
    "ZOO",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "apply_overrides",
    "from_dict",
    "get_config",
    "set_value",
    "to_dict",
]
