"""The project's config-time error, in a module of its own so that any layer can raise it
without importing :mod:`grace_lightning.config` (which imports the layers' own checks)."""


class ConfigError(ValueError):
    """A bad config value, found at startup: the message names the key and what to change."""
