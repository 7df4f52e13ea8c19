"""The error every stage turns into one clean paragraph (the message says what to do)."""


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


class DataError(ValueError):
    """The data set cannot be split or read as asked; the message names the folder, class or
    count."""
