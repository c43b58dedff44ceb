"""evalcluster's cluster layer: config, Ray bootstrap, the watch/evaluate job, CLI and metrics."""

from cluster.config import AppConfig, ConfigError, load_config

__all__ = ["AppConfig", "ConfigError", "load_config"]
