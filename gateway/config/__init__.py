"""The gateway's configuration: a validated, immutable snapshot of one YAML file."""

from gateway.config.loader import ConfigError, load_settings, parse_settings
from gateway.config.schema import ModelConfig, Settings, UpstreamConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "Settings",
    "UpstreamConfig",
    "load_settings",
    "parse_settings",
]
