"""Typed configs: the experiment schema, the model zoo, dotted-key overrides, and the
upgrade of saved configs of the first format."""

from .compat import upgrade_config
from .overrides import ConfigError, apply_overrides, from_dict, set_value, to_dict
from .schema import DataConfig, EvalConfig, ExperimentConfig
from .zoo import ZOO, get_config


def config_from_dict(data: dict) -> ExperimentConfig:
    """An experiment config from a saved dict (``config.json``, a checkpoint's json), of
    the current format or (upgraded) the first one."""
    return from_dict(ExperimentConfig, upgrade_config(data))


__all__ = [
    "ZOO",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "apply_overrides",
    "config_from_dict",
    "from_dict",
    "get_config",
    "set_value",
    "to_dict",
    "upgrade_config",
]
