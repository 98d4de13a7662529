"""The errors smear raises: ``SmearError`` (one line and a hint for the user) and its kinds."""

from __future__ import annotations


class SmearError(Exception):
    """An error a user can act on; the CLI prints it as one line and exits non-zero."""

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ImageReadError(SmearError):
    """An image could not be read (missing, unreadable, truncated, too large)."""


class ConfigError(SmearError):
    """A configuration file or override is wrong."""


class ModelError(SmearError):
    """A model folder is missing or incomplete."""


class DataError(SmearError):
    """A dataset folder is missing, empty or malformed."""


#: the hint of a training run refused because its run folder already holds one
RESUME_HINT = "pass --resume to continue it, or a new --out"
