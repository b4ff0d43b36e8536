"""The one exception type for problems a user can cause and fix.

The CLI prints its message as a single line on stderr and exits with code 2; programming errors
stay ordinary exceptions (exit code 1).
"""


class MidmsError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ConfigError(MidmsError):
    """An invalid configuration value."""
