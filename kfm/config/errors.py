"""The one exception type of config problems."""


class ConfigError(ValueError):
    """A config problem, phrased so that the message alone says how to fix it."""
