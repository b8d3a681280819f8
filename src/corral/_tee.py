"""The console side of the tee: whole prefixed lines, one write each.

Each console stream has one lock; a write of whole lines (or of one piece of a
very long line) happens under it in a single ``write`` + ``flush``, so lines
from different ranks never interleave mid-line. Child bytes are passed through
untouched. A pipe or terminal console is written without ever blocking the
event loop (see ``ConsoleStream``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Final, Protocol, cast

__all__ = ("Console", "ConsoleStream")

_log = logging.getLogger("corral")

#: ANSI colours cycled over ranks for prefixes on a terminal.
_COLOURS: Final = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(target: object) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(target), threading.Lock())


#: Console bytes held while the console does not take them; above this, the
#: pumps feeding the console stop reading (the ranks then block on their pipes,
#: as they would writing to a slow terminal themselves) until it falls below LOW.
HIGH_WATER: Final = 1 << 20
LOW_WATER: Final = 1 << 18


class _Reader(Protocol):
    """What the console can pause: a pump's pipe transport."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...


@dataclass(slots=True, eq=False)
class ConsoleStream:
    """One console stream (the supervisor's stdout or stderr).

    When the console is a pipe or a terminal, corral writes to it through a
    descriptor of its own, opened non-blocking (``/proc/self/fd/N``: a new open
    file description, so the flags of the host's stdout are left alone). A
    console that does not keep up then never blocks the event loop: what it
    has not taken waits in a bounded buffer, flushed when the descriptor turns
    writable, and above ``HIGH_WATER`` the pumps stop reading. Elsewhere (a
    regular file, an in-memory stream) writes are plain blocking writes.
    """

    target: IO[bytes] | IO[str]
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    broken: bool = False
    _fd: int | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _loop: asyncio.AbstractEventLoop | None = None
    _readers: set[_Reader] = field(default_factory=set)
    _paused: bool = False
    _flushed: asyncio.Event | None = None

    def write(self, data: bytes) -> None:
        """Write whole lines; a broken console disables itself, never the run."""
        if self.broken:
            return
        if self._fd is not None:
            self._write_nonblocking(data)
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
            self._break(exc)

    def _break(self, exc: BaseException) -> None:
        # The console went away (`corral run ... | head -1`) or was closed:
        # stop teeing to it, keep the log files flowing.
        self.broken = True
        self._pending.clear()
        self._disarm()
        self._resume_readers()
        _log.warning("corral: tee to %s disabled: %s", self.name, exc)

    def _write_nonblocking(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        if self._pending:  # keep the order: behind what is already waiting
            self._pending += data
        else:
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._break(exc)
                return
            if written == len(data):
                return
            self._pending += memoryview(data)[written:]
            self._arm()
        if len(self._pending) > HIGH_WATER and not self._paused:
            self._paused = True
            for reader in self._readers:
                reader.pause()

    def _arm(self) -> None:
        if self._loop is None and self._fd is not None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_writer(self._fd, self._on_writable)

    def _disarm(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_writer(self._fd)
        self._loop = None
        if self._flushed is not None:
            self._flushed.set()

    def _on_writable(self) -> None:
        fd = self._fd
        assert fd is not None
        try:
            written = os.write(fd, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._break(exc)
            return
        del self._pending[:written]
        if not self._pending:
            self._disarm()
        if self._paused and len(self._pending) < LOW_WATER:
            self._resume_readers()

    def _resume_readers(self) -> None:
        if self._paused:
            self._paused = False
            for reader in self._readers:
                reader.resume()

    def attach(self, reader: _Reader) -> None:
        """A pump feeding this console: paused while the console is backed up."""
        self._readers.add(reader)
        if self._paused:
            reader.pause()

    def detach(self, reader: _Reader) -> None:
        """The pump is done."""
        self._readers.discard(reader)

    def release_readers(self) -> None:
        """Closing: let every pump read to the end whatever the console's state."""
        self._resume_readers()
        self._readers.clear()

    async def wait_flushed(self, give_up_after: float) -> None:
        """Wait until the console took every pending byte, for at most ``give_up_after`` s.

        A console that takes nothing for that long (an open pipe nobody reads)
        loses what is pending, with a warning: the log files hold every byte.
        """
        if not self._pending:
            return
        self._flushed = asyncio.Event()
        try:
            await asyncio.wait_for(self._flushed.wait(), give_up_after)
        except TimeoutError:
            _log.warning(
                "corral: the console (%s) is not being read: %d byte(s) of teed output "
                "not shown (the log files have them)",
                self.name,
                len(self._pending),
            )
            self._pending.clear()
            self._disarm()
        finally:
            self._flushed = None

    def close(self) -> None:
        """Drop the private descriptor (pending bytes should have been flushed)."""
        self._disarm()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _nonblocking_twin(target: object) -> int | None:
    """A private non-blocking descriptor for a pipe/terminal console, else None."""
    if not sys.platform.startswith("linux"):
        return None
    fileno = getattr(target, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            return None
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None  # a socket (ENXIO), a closed stream, no /proc: blocking writes


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
            stdout=ConsoleStream(out, "stdout", _lock_for(out), _fd=_nonblocking_twin(out)),
            stderr=ConsoleStream(err, "stderr", _lock_for(err), _fd=_nonblocking_twin(err)),
            color=color,
        )

    def release_readers(self) -> None:
        """Closing: the pumps read to the end whatever the console's state."""
        self.stdout.release_readers()
        self.stderr.release_readers()

    async def wait_flushed(self, give_up_after: float) -> None:
        """Wait (bounded) until both streams took every pending byte."""
        await asyncio.gather(
            self.stdout.wait_flushed(give_up_after), self.stderr.wait_flushed(give_up_after)
        )

    def close(self) -> None:
        """Close the private non-blocking descriptors (after :meth:`wait_flushed`)."""
        self.stdout.close()
        self.stderr.close()

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
