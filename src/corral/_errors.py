"""The exception hierarchy: one base class, one subclass per kind of outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._result import Result

__all__ = ("ConfigError", "CorralError", "GroupFailedError")


class CorralError(Exception):
    """Base class of every exception corral raises on purpose."""


class ConfigError(CorralError, ValueError):
    """Bad arguments: raised before any process starts, naming what is wrong."""


class GroupFailedError(CorralError):
    """Raised by :meth:`Result.raise_for_failure` when at least one rank failed.

    Attributes:
        result: the :class:`Result` whose failures this error explains.
    """

    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(result.describe())

    def __reduce__(self) -> tuple[type[GroupFailedError], tuple[Result]]:
        return (type(self), (self.result,))
