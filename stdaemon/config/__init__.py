"""Configuration: one frozen object built once at start-up."""

from stdaemon.config.loader import database_path, load_config, state_path
from stdaemon.config.schema import Config

__all__ = ["Config", "database_path", "load_config", "state_path"]
