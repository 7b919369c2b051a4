"""Typed errors. CLIs print these as one line (no traceback) and exit with status 2."""

from __future__ import annotations


class BitNetError(Exception):
    """A user-facing error: the message names what is wrong and what was expected."""


class ConfigError(BitNetError):
    """A bad recipe, config key or value."""


class DataError(BitNetError):
    """Missing or unusable training data."""


class CheckpointError(BitNetError):
    """A checkpoint or model directory that does not fit the model or cannot be read."""
