"""The exception hierarchy's roots (``GroupFailedError``, a failed run, lives with ``Result``)."""

from __future__ import annotations

__all__ = ("ConfigError", "CorralError")


class CorralError(Exception):
    """Base class of every exception corral raises on purpose."""


class ConfigError(CorralError, ValueError):
    """Bad arguments: raised before any process starts, naming what is wrong."""
