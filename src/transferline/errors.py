"""The errors transferline reports as one clean paragraph: each message says what went wrong,
names the file or parameter, and says what to do. Every one derives from TransferlineError,
which the stage harness and the command line catch; anything else is a bug and keeps its
traceback."""


class TransferlineError(Exception):
    """An error whose message is the whole report (no traceback needed)."""


class StageError(TransferlineError, RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


class DataError(TransferlineError, ValueError):
    """The data set cannot be split or read as asked; the message names the folder, class or
    count."""


class ParamsError(TransferlineError, ValueError):
    """params.yaml is missing, unreadable or holds a bad value."""


class SourceError(TransferlineError, RuntimeError):
    """The data set cannot be fetched; the message says why and what to do."""


class WeightsError(TransferlineError, RuntimeError):
    """The requested weights cannot be loaded (offline, missing or mismatched file)."""


class TrackingError(StageError):
    """The MLflow store cannot be reached or written; the message names it and the fix."""


class ReproduceError(StageError):
    """A run cannot be reproduced here; the message names what is missing and how to get it."""
