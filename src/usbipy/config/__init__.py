"""usbipyd's settings: each once (:mod:`.options`), from its options and its
configuration file (TOML: settings, names, access policy, limits)."""

from .file import DEFAULT_PATH, DaemonConfig, load, parse
from .limits import Limits
from .settings import Settings, config_path, describe, read_settings
from .toml import ConfigError, Document

__all__ = ["DEFAULT_PATH", "ConfigError", "DaemonConfig", "Document", "Limits", "Settings",
           "config_path", "describe", "load", "parse", "read_settings"]
