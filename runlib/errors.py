"""The errors a run reports in one line (the entry scripts print them without a traceback), and the stop it ends
with. DataError and DiskFullError are data/shards.py's, where shards are read and files written."""

from __future__ import annotations

from data.shards import DataError, DiskFullError  # noqa: F401  (one place to import a run's errors from)


class ConfigError(ValueError):
    """A bad flag value or combination; main() prints it without a traceback."""


class DeviceError(ConfigError):
    """A device problem of one process (its GPU is missing or too old): every process reports its own."""


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or state; the run stops without saving it (exit 3)."""


class Interrupted(BaseException):
    """The run stopped at a signal (or because its log cannot be written): the message, said already on the terminal
    and in the log, tells what was saved and the command that goes on. A BaseException, so that nothing on the way
    up (torch.compile wraps the exceptions of the code it traces) takes it for a failure."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
