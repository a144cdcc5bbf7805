"""The errors a user can cause. bin/iaf.py prints these as one `error:` line; any other exception is a bug
and keeps its traceback."""

import errno


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting, hpconfig entry or preset that cannot be used."""


class DataError(UserError, RuntimeError):
    """A dataset that is missing, incomplete or corrupt."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be found, read, or does not fit the model."""


class ArgumentError(UserError, ValueError):
    """An argument of the Python API that cannot be used (images of another dtype or shape, k < 1, ...)."""


class NonFiniteError(UserError, RuntimeError):
    """Training met more consecutive non-finite steps than max_skips allows."""


def is_disk_full(error):
    """Whether an OS or TensorFlow error says the disk is full."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the training loop (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
