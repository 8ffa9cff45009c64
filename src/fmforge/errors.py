"""The exception types for bad input: the CLI prints the message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user: the message names the file/field and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that is wrong; the message names the dotted key and the allowed values."""


class DataError(UserError):
    """A corpus or data file that cannot be used as given."""
