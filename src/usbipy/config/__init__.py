"""usbipyd's configuration file (TOML): settings, names, access policy, limits."""

from .daemon import DEFAULT_PATH, DaemonConfig, load, parse
from .toml import ConfigError, Document

__all__ = ["DEFAULT_PATH", "ConfigError", "DaemonConfig", "Document", "load", "parse"]
