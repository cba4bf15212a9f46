"""The error types every layer raises for bad input; `densessl` (cli.main) prints each as one
`densessl: error: ...` line instead of a traceback.

They live here, at the bottom, so that a low layer can raise them and the command line can catch
them without importing the layers that raise them."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe, override or eval setting is invalid; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file."""


class InteropError(CheckpointError):
    """An export or import cannot be done; the message says which file, key or architecture."""


class ImageReadError(ValueError):
    """An image file could not be opened or decoded."""


class AnnotationError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the field."""

