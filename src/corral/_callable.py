"""Prepare a Python callable to run as a rank (see ``_child`` for the other side).

A callable rank is a fresh interpreter running ``python -m corral._child CALL RESULT``:
``CALL`` is a pickle of ``(fn, args)`` written to the rank's folder, ``RESULT``
the file the child leaves its pickled return value in. Files, not pipes, so a
return value of any size can never fill a buffer and deadlock either side.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

__all__ = ("CallSpec", "prepare")

CALL_FILE: Final = "call.pkl"
RESULT_FILE: Final = "result.pkl"


@dataclass(frozen=True, slots=True)
class CallSpec:
    """A callable that has been checked to be sendable to a child interpreter."""

    fn: Callable[..., object]
    name: str

    def rank_argv(
        self, rank: int, args: Sequence[object], rank_dir: Path
    ) -> tuple[tuple[str, ...], Path]:
        """Write the rank's call file and return its argv and result-file path.

        Raises:
            ConfigError: an argument cannot be pickled (names the rank and argument).
        """
        try:
            payload = pickle.dumps((self.fn, tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ConfigError(
                f"args[{rank}] for {self.name} cannot be sent to the rank: {exc}"
            ) from exc
        call_file = rank_dir / CALL_FILE
        call_file.write_bytes(payload)
        result_file = rank_dir / RESULT_FILE
        argv = (sys.executable, "-m", "corral._child", str(call_file), str(result_file))
        return argv, result_file


def prepare(fn: Callable[..., object]) -> CallSpec:
    """Check that ``fn`` can be sent to a fresh interpreter (pickled by reference).

    Raises:
        ConfigError: ``fn`` is a lambda, a closure, a nested function or is
            otherwise not importable by name from a child interpreter.
    """
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if "<lambda>" in name or "<locals>" in name:
        raise ConfigError(
            f"cannot run {name!r} as a rank: a lambda or a nested function cannot be "
            "imported by a fresh interpreter; define it at module level"
        )
    try:
        pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ConfigError(f"cannot run {name!r} as a rank: it cannot be pickled ({exc})") from exc
    return CallSpec(fn=fn, name=name)
