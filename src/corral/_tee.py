"""The console side of the tee: whole prefixed lines, one write each.

Each console stream has one lock; a write of whole lines (or of one piece of a
very long line) happens under it in a single ``write`` + ``flush``, so lines
from different ranks, even from groups on other threads' event loops, never
interleave mid-line. Child bytes are passed through untouched.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Final, cast

__all__ = ("Console", "ConsoleStream")

_log = logging.getLogger("corral")

#: ANSI colours cycled over ranks for prefixes on a terminal.
_COLOURS: Final = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(target: object) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(target), threading.Lock())


@dataclass(slots=True)
class ConsoleStream:
    """One console stream (the supervisor's stdout or stderr)."""

    target: IO[bytes] | IO[str]
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    broken: bool = False

    def write(self, data: bytes) -> None:
        """Write whole lines; a broken console disables itself, never the run."""
        if self.broken:
            return
        try:
            with self.lock:
                target = self.target
                if isinstance(target, _BINARY):
                    target.write(data)
                else:
                    cast("IO[str]", target).write(data.decode("utf-8", "replace"))
                target.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            # The console went away (`corral run ... | head -1`) or was closed:
            # stop teeing to it, keep the log files flowing.
            self.broken = True
            _log.warning("corral: tee to %s disabled: %s", self.name, exc)


_BINARY: Final = (io.RawIOBase, io.BufferedIOBase)


def _binary(stream: IO[str] | IO[bytes] | None) -> IO[bytes] | IO[str] | None:
    """Prefer the binary buffer under a text stream: bytes then pass through verbatim."""
    if stream is None:
        return None
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        # Flush what Python code already printed so the order on the console holds.
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
        return buffer  # type: ignore[no-any-return]
    return stream


@dataclass(slots=True)
class Console:
    """Where teed lines go, and how prefixes look.

    Attributes:
        stdout: the stream teed stdout goes to.
        stderr: the stream teed stderr goes to.
        color: colour each rank's prefix (ANSI); default: only on a terminal
            and when ``NO_COLOR`` is unset.
    """

    stdout: ConsoleStream
    stderr: ConsoleStream
    color: bool = False

    @classmethod
    def create(
        cls,
        stdout: IO[bytes] | IO[str] | None = None,
        stderr: IO[bytes] | IO[str] | None = None,
        color: bool | None = None,
    ) -> Console:
        """Build a console over the given streams (default: this process's stdout/stderr)."""
        out = _binary(stdout if stdout is not None else sys.stdout)
        err = _binary(stderr if stderr is not None else sys.stderr)
        if out is None or err is None:
            raise ValueError("no console stream to tee to (sys.stdout or sys.stderr is None)")
        if color is None:
            color = _wants_color(out)
        return cls(
            stdout=ConsoleStream(out, "stdout", _lock_for(out)),
            stderr=ConsoleStream(err, "stderr", _lock_for(err)),
            color=color,
        )

    def render_prefix(self, template: str, rank: int, stream: str) -> bytes:
        """Format the prefix for one (rank, stream), coloured if enabled."""
        text = template.format(rank=rank, stream=stream)
        if self.color and text:
            code = _COLOURS[rank % len(_COLOURS)]
            text = f"\x1b[{code}m{text}\x1b[0m"
        return text.encode("utf-8", "replace")


def _wants_color(stream: object) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):
        return False
