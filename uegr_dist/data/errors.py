"""The data layer's error type."""


class DataError(ValueError):
    """The training or evaluation data is unusable; the message names the file (or task), row or column, and what
    is wrong."""
