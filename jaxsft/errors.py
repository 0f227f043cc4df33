"""Errors meant for people: the CLI prints their message (no traceback) and exits non-zero."""


class JaxsftError(Exception):
    """An expected mistake in the user's input; the message says what and where."""


class ConfigError(JaxsftError):
    """A config key is unknown, of the wrong type or out of range; the message names the key."""


class DataError(JaxsftError):
    """A data file or record is unusable; the message names the file and line."""


class ModelError(JaxsftError):
    """A model directory is missing, unsupported or inconsistent; the message names the path."""


class NonFiniteError(JaxsftError):
    """Training produced a NaN or infinite loss or gradient norm; the message names the step."""
