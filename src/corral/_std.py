"""``Std``: which standard streams of a rank go to log files or the console."""

from __future__ import annotations

import enum

from ._errors import ConfigError

__all__ = ("Std",)

_NAMES = {"none": 0, "out": 1, "stdout": 1, "err": 2, "stderr": 2, "all": 3}


class Std(enum.IntFlag):
    """A set of standard streams: ``NONE``, ``OUT`` (stdout), ``ERR`` (stderr), ``ALL``."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = 3

    @classmethod
    def parse(cls, spec: str) -> Std | dict[int, Std]:
        """Parse a command-line stream spec.

        Args:
            spec: one value for every rank (``"3"``, ``"all"``, ``"err"``), or
                ``rank:value`` items separated by commas (``"0:1,1:2"``,
                ``"0:out, 1:err"``). Whitespace around tokens is ignored.

        Returns:
            A ``Std`` for a single value, or a ``dict`` mapping rank to ``Std``.

        Raises:
            ConfigError: an unknown value, an empty item, a negative, malformed
                or repeated rank. The message names the bad token.
        """
        if not isinstance(spec, str):
            raise ConfigError(f"a Std spec must be a str, not {type(spec).__name__}")
        text = spec.strip()
        if not text:
            raise ConfigError("empty Std spec: use a value like 'all', '3' or '0:out,1:err'")
        if ":" not in text and "," not in text:
            return _value(text, spec)
        result: dict[int, Std] = {}
        for item in text.split(","):
            token = item.strip()
            if not token:
                raise ConfigError(f"empty item in Std spec {spec!r}")
            rank_text, sep, value_text = token.partition(":")
            if not sep:
                raise ConfigError(
                    f"Std spec item {token!r} in {spec!r} is not 'rank:value' (e.g. '0:out')"
                )
            rank_text = rank_text.strip()
            if not rank_text.isdigit() or not rank_text.isascii():
                raise ConfigError(
                    f"bad rank {rank_text!r} in Std spec {spec!r}: ranks are integers >= 0"
                )
            rank = int(rank_text)
            if rank in result:
                raise ConfigError(f"rank {rank} is repeated in Std spec {spec!r}")
            result[rank] = _value(value_text.strip(), spec)
        return result


def _value(token: str, spec: str) -> Std:
    """Return the ``Std`` a single value token names, or raise ``ConfigError``."""
    lowered = token.lower()
    if lowered in _NAMES:
        return Std(_NAMES[lowered])
    if lowered.isdigit() and lowered.isascii() and int(lowered) <= 3:
        return Std(int(lowered))
    raise ConfigError(f"unknown Std value {token!r} in {spec!r}: use 0-3 or none, out, err, all")


Std.__module__ = "corral"
