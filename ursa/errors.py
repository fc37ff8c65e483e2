"""User-facing errors: each carries one clear line saying what is wrong and what to do.

The CLI prints the message and exits with status 2 (bad input); nothing here is a bug.
"""

from __future__ import annotations


class UrsaError(Exception):
    """A problem with the user's input that they can fix; the CLI shows only the message."""

    exit_code = 2


class DataError(UrsaError):
    """The data folder, CSV or an image cannot be used as given."""


class ImageError(DataError):
    """One file is not a readable image (corrupt, truncated, too large or not an image)."""

    def __init__(self, path: object, reason: str, kind: str = "unreadable") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


class ModelFileError(UrsaError):
    """A model file is missing, truncated, or not an ursa model."""


class ModelOutputError(ModelFileError):
    """A model gave probabilities that are not finite numbers (NaN or infinity): its weights are damaged."""


class ArchError(UrsaError):
    """An architecture name that ursa cannot build (or cannot load weights for offline)."""


class DivergedError(UrsaError):
    """Training stopped because the loss diverged; the last good weights were kept."""

    exit_code = 3


class WriteError(UrsaError):
    """A file could not be written (the message names it); nothing half-written is left behind."""


class NoSpaceError(WriteError):
    """The disk (or quota) filled up while ursa was writing a file; nothing half-written is left behind."""


class BusyError(UrsaError):
    """Another ursa process is using this run folder or data folder (it holds the folder's lock)."""
