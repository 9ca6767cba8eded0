"""The errors of checkpoint reading and writing: every one a :class:`CheckpointError` whose message
is user-facing (the commands print it and exit 2)."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint reading/writing problem (message is user-facing)."""


class MissingConfigError(CheckpointError):
    pass


class MissingShardError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class TensorNotFoundError(CheckpointError, KeyError):
    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(CheckpointError):
    pass


class PickleRefusedError(CheckpointError):
    pass


class NoCheckpointError(CheckpointError):
    pass


class OutputExistsError(CheckpointError):
    pass


class OutputWriteError(CheckpointError):
    """The output could not be created or written (read-only location, permissions, disk full); the
    temporary directory has been removed and nothing was written at OUT."""


class UnsafeOutputError(CheckpointError):
    """The output would be written into, over or around the input."""
