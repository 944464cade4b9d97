"""The configuration model, its sources and the flags generated from it."""

from fantasytalk_cli.config.load import ConfigError, config_hash, config_to_yaml, load_config
from fantasytalk_cli.config.schema import FtalkConfig

__all__ = ["ConfigError", "FtalkConfig", "config_hash", "config_to_yaml", "load_config"]
