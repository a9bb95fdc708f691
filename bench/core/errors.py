"""User-facing errors: the CLI prints their message on one line and exits 2, no traceback."""


class ConfigError(ValueError):
    """A bad config, override, name or missing file; the message names the fix."""
