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


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM stopped a command; the message says what was kept. A BaseException,
    like KeyboardInterrupt, so no `except Exception` swallows it; the CLI prints the message and
    exits with `exit_code` (128 + the signal's number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DiskFullError(JaxsftError):
    """A file system has no room for what is being written; the message names the path, and the
    free space (and the space needed, where known)."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def free_bytes(path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing parent), or None."""
    import shutil
    from pathlib import Path

    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (an OSError, or TensorStore's RESOURCE_EXHAUSTED from Orbax) says no space is left."""
    import errno

    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)


def disk_full(path, what: str, needed: int | None = None, after: str = "") -> DiskFullError:
    """The one-line error for `what` at `path` meeting a full file system."""
    free = free_bytes(path)
    room = f"{_mib(free)} free" if free is not None else "no space left"
    if needed is not None:
        room += f", {_mib(needed)} needed"
    return DiskFullError(f"{what} {path}: no space left on device ({room}){after}")


def check_free_space(path, needed: int, what: str, after: str = "") -> None:
    """Raises `DiskFullError` before writing `needed` bytes at `path` when clearly less is free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise disk_full(path, what, needed, after)
