"""The console side of the tee: whole prefixed lines, one write each.

Each console stream has one lock; a write of whole lines (or of one piece of a
very long line) happens under it in a single ``write`` + ``flush``, so lines
from different ranks never interleave mid-line. Child bytes are passed through
untouched. A pipe or terminal console is written without ever blocking the
event loop (see ``ConsoleStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Final, Protocol, cast

from . import _platform

if TYPE_CHECKING:
    from collections.abc import Callable

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
#: A closing group's pumps are never paused (a rank's last words must not block
#: it into a SIGKILL); their output is held up to this much, then dropped from
#: the console (the log files keep it) so memory stays bounded.
DROP_WATER: Final = 16 << 20


class _Reader(Protocol):
    """What the console can pause: a pump's pipe transport."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...


class _Writer:
    """The one non-blocking writer of a console *file*.

    stdout and stderr on one terminal (or ``2>&1`` into one pipe) are one file:
    they share this writer, its descriptor and its queue, so a line of one can
    never land inside a partly written line of the other. The descriptor is a
    private open of the file (``/proc/self/fd/N``), so ``O_NONBLOCK`` never
    touches the host's own stdout. A socket cannot be opened again that way
    (systemd's journal is a stream socket): it is written with ``send(...,
    MSG_DONTWAIT)`` on a duplicate, non-blocking per call, flags untouched.
    Groups on several threads' event loops may share it: its state is guarded
    by a lock, and a pump is paused or resumed on its own loop.
    """

    def __init__(self, key: tuple[int, int], fd: int, sock: socket.socket | None = None) -> None:
        self.key = key
        self.fd = fd
        self._sock = sock
        self.refs = 0
        self.pending = bytearray()
        self.queued = 0  # bytes accepted so far
        self.done = 0  # bytes written (or dropped) so far
        self.dropped = 0
        self.broken: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Loops that have the descriptor registered (the owner, and former owners
        #: that have not yet removed theirs); it is closed only once none has.
        self.watched: set[asyncio.AbstractEventLoop] = set()
        self.closing = False
        self.readers: dict[_Reader, asyncio.AbstractEventLoop] = {}
        self.lock = threading.RLock()
        self.paused = False
        self.mid_line = False  # the console shows a torn line: start the next with a newline
        #: One event per waiting close (each on its own loop), set on any progress.
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # -- writing --------------------------------------------------------------
    def write(self, data: bytes, droppable: bool) -> bool:
        """Queue ``data`` (whole lines); False once the console is gone."""
        with self.lock:
            return self._write(data, droppable)

    def _write(self, data: bytes, droppable: bool) -> bool:
        if self.broken is not None:
            return False
        if self.mid_line:
            data = b"\n" + data
            self.mid_line = False
        self.queued += len(data)
        if self.pending:
            if droppable and len(self.pending) > DROP_WATER:
                # A closing group's rest while the console is backed up: the
                # log files have it, and memory stays bounded.
                self.dropped += len(data)
                self.done += len(data)
                return True
            self.pending += data
            if not _alive(self.loop):
                self._arm()  # the loop that watched the console stopped: take over
        else:
            try:
                written = self._send(data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self.done += len(data)  # never to be written: not waited for
                self._break(exc)
                return False
            self.done += written
            if written == len(data):
                return True
            self.pending += memoryview(data)[written:]
            self._arm()
        if len(self.pending) > HIGH_WATER and not self.paused:
            self.paused = True
            for reader, loop in list(self.readers.items()):
                _on_loop(loop, reader.pause)
        return True

    # -- which event loop watches the descriptor --------------------------------
    # Exactly one loop at a time (``self.loop``) has the descriptor registered
    # for writability while bytes are pending. It is whichever loop queued them
    # last, unless a close on another loop waits for the console (it then takes
    # the registration), or the owning loop stopped or is letting go of the
    # console (it then hands the registration to a loop that still pumps into
    # it). A registration left behind on another loop is removed lazily, by
    # that loop itself, the next time it sees it.
    def _arm(self, take: bool = False) -> None:
        """Watch the descriptor from the running loop, if no live loop does (or ``take``)."""
        loop = asyncio.get_running_loop()
        if self.loop is loop or (_alive(self.loop) and not take):
            return
        old, self.loop = self.loop, loop
        loop.add_writer(self.fd, self._on_writable, loop)
        self.watched.add(loop)
        if old is not None:
            _on_loop(old, lambda: self._unwatch(old))

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: drop its registration unless it is (again) the owner."""
        with self.lock:
            if self.loop is not loop and loop in self.watched:
                loop.remove_writer(self.fd)
                self.watched.discard(loop)
                self._close_if_unwatched()

    def close(self) -> None:
        """The last user let go: drop the queue, close once no loop watches the descriptor."""
        with self.lock:
            self.closing = True
            self._drop_pending()
            self._close_if_unwatched()

    def _close_if_unwatched(self) -> None:
        for loop in list(self.watched):
            if loop.is_closed():
                self.watched.discard(loop)  # its registrations went with its selector
            elif not loop.is_running():
                # Stopped: a callback posted to it may never run (closing a loop
                # drops its queue). Nothing runs it now: remove the watch here.
                with contextlib.suppress(Exception):
                    loop.remove_writer(self.fd)
                self.watched.discard(loop)
        if self.closing and not self.watched and self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self._sock is not None:
                self._sock.close()
            else:
                os.close(fd)

    def _disarm(self) -> None:
        """Nothing pending: no loop watches the descriptor any more."""
        loop, self.loop = self.loop, None
        if loop is not None:
            _on_loop(loop, lambda: self._unwatch(loop))

    def leave(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """A user on ``loop`` lets go: if it watched a backlog and no pump on ``loop``
        feeds the console any more, hand the watch to a loop where one still does."""
        with self.lock:
            if loop is None or self.loop is not loop or not self.pending:
                return
            pumping = {other for other in self.readers.values() if _alive(other)}
            if loop in pumping or not pumping:
                return  # still used here, or by nobody else: keep watching here
            self._disarm()
            _on_loop(next(iter(pumping)), self._claim)

    def _claim(self) -> None:
        with self.lock:
            if self.pending:
                self._arm()

    def _on_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            if self.loop is not loop:
                self._unwatch(loop)  # a registration this loop handed over
                return
            self._flush_some()

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the console takes now (``BlockingIOError``: nothing)."""
        if self._sock is not None:
            # MSG_NOSIGNAL: EPIPE, never SIGPIPE, whatever the host did with that signal.
            return self._sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        return os.write(self.fd, data)

    def _flush_some(self) -> None:
        try:
            written = self._send(self.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._break(exc)
            return
        del self.pending[:written]
        self.done += written
        self._notify()
        if not self.pending:
            self._disarm()
        if self.paused and len(self.pending) < LOW_WATER:
            self._resume()

    def _resume(self) -> None:
        self.paused = False
        for reader, loop in list(self.readers.items()):
            _on_loop(loop, reader.resume)

    def drop_pending(self) -> None:
        """Forget what the console has not taken (and let paused pumps read again)."""
        with self.lock:
            self._drop_pending()

    def _drop_pending(self) -> None:
        if self.pending:
            self.mid_line = True  # what was shown may end inside a line
            self.dropped += len(self.pending)
            self.done += len(self.pending)
            self.pending.clear()
        self._disarm()
        if self.paused:
            self._resume()
        self._notify()

    def _notify(self) -> None:
        for loop, event in list(self.waiters):
            _on_loop(loop, event.set)

    def _break(self, exc: BaseException) -> None:
        self.broken = exc
        self._drop_pending()
        self.mid_line = False

    # -- closing ----------------------------------------------------------------
    async def wait_flushed(self, name: str, give_up_after: float) -> None:
        """Wait until every byte queued so far is written; give up only after
        ``give_up_after`` seconds without any progress (a console nobody reads)."""
        target = self.queued
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self.waiters.add(waiter)
        try:
            while self.done < target and self.broken is None:
                waiter[1].clear()
                before = self.done
                with self.lock:
                    if self.pending:
                        self._arm(take=True)  # progress must not hang on another loop
                try:
                    await asyncio.wait_for(waiter[1].wait(), give_up_after)
                except TimeoutError:
                    if self.done == before:
                        lost = len(self.pending)
                        self.drop_pending()
                        self.dropped = 0
                        if lost:
                            _log.warning(
                                "corral: the console (%s) is not being read: %d byte(s) "
                                "of teed output not shown (the log files have them)",
                                name,
                                lost,
                            )
                        return
        finally:
            self.waiters.discard(waiter)
        if self.dropped:
            _log.warning(
                "corral: %d byte(s) of teed output written while closing were not shown: "
                "the console (%s) was backed up (the log files have them)",
                self.dropped,
                name,
            )
            self.dropped = 0


def _on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], object]) -> None:
    """Call ``fn`` on ``loop``: now when it is this thread's running loop, else soon."""
    if loop is None or loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn()
    else:
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # closed meanwhile: its registrations went with its selector


def _alive(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` runs (so a descriptor registered on it gets served)."""
    return loop is not None and loop.is_running() and not loop.is_closed()


_WRITERS: dict[tuple[int, int], _Writer] = {}
_WRITERS_GUARD = threading.Lock()


def _writer_for(target: object) -> _Writer | None:
    """The shared non-blocking writer of a pipe or terminal console, else None."""
    if not _platform.IS_LINUX:
        return None
    fileno = getattr(target, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
        st = os.fstat(fd)
        is_socket = stat.S_ISSOCK(st.st_mode)
        if not (is_socket or stat.S_ISFIFO(st.st_mode) or os.isatty(fd)):
            return None  # a regular file never blocks; other devices: leave alone
        key = (st.st_dev, st.st_ino)
        with _WRITERS_GUARD:
            writer = _WRITERS.get(key)
            if writer is None:
                if is_socket:
                    sock = socket.socket(fileno=os.dup(fd))
                    if sock.type != socket.SOCK_STREAM:  # a datagram's size is bounded
                        sock.close()
                        return None
                    writer = _Writer(key, sock.fileno(), sock)
                else:
                    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
                    writer = _Writer(key, os.open(f"/proc/self/fd/{fd}", flags))
                _WRITERS[key] = writer
            writer.refs += 1
            return writer
    except (OSError, ValueError, io.UnsupportedOperation):
        return None  # a closed stream, no /proc: blocking writes


def _release_writer(writer: _Writer) -> None:
    try:
        writer.leave(asyncio.get_running_loop())
    except RuntimeError:
        pass  # released outside any loop: a writing or closing user re-arms it
    with _WRITERS_GUARD:
        writer.refs -= 1
        if writer.refs > 0:
            return
        del _WRITERS[writer.key]
    writer.close()


@dataclass(slots=True, eq=False)
class ConsoleStream:
    """One console stream (the supervisor's stdout or stderr).

    A pipe or terminal console is written without ever blocking the event loop
    (see ``_Writer``): what it has not taken waits in a bounded queue, and above
    ``HIGH_WATER`` the pumps feeding it stop reading. Elsewhere (a regular
    file, an in-memory stream) writes are plain blocking writes under a lock.
    """

    target: IO[bytes] | IO[str]
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    broken: bool = False
    _writer: _Writer | None = None

    def write(self, data: bytes, droppable: bool = False) -> None:
        """Write whole lines; a broken console disables itself, never the run.

        ``droppable``: the lines come from a closing group and may be dropped
        (they are in the log file) while the console is backed up.
        """
        if self.broken:
            return
        writer = self._writer
        if writer is not None:
            if not writer.write(data, droppable):
                self._disable(writer.broken)
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
            self._disable(exc)

    def _disable(self, exc: BaseException | None) -> None:
        # The console went away (`corral run ... | head -1`) or was closed:
        # stop teeing to it, keep the log files flowing.
        self.broken = True
        _log.warning("corral: tee to %s disabled: %s", self.name, exc)

    def attach(self, reader: _Reader) -> None:
        """A pump feeding this console: paused while the console is backed up."""
        writer = self._writer
        if writer is not None:
            with writer.lock:
                writer.readers[reader] = asyncio.get_running_loop()
                if writer.paused:
                    reader.pause()

    def detach(self, reader: _Reader) -> None:
        """The pump stops following the console's back-pressure (and reads again)."""
        writer = self._writer
        if writer is not None:
            with writer.lock:
                if writer.readers.pop(reader, None) is not None and writer.paused:
                    reader.resume()

    async def wait_flushed(self, give_up_after: float) -> None:
        """Wait until the console took what was written so far (see ``_Writer``)."""
        if self._writer is not None:
            await self._writer.wait_flushed(self.name, give_up_after)

    def close(self) -> None:
        """Let go of the shared writer (its descriptor closes with its last user)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            _release_writer(writer)


_BINARY: Final = (io.RawIOBase, io.BufferedIOBase)


def _stream(target: IO[bytes] | IO[str] | None, name: str) -> ConsoleStream:
    """A console stream over ``target``; over nothing (``sys.stdout`` is None: the
    process was started with that descriptor closed), one that is disabled."""
    if target is None:
        _log.warning("corral: tee to %s disabled: this process has no %s", name, name)
        return ConsoleStream(io.BytesIO(), name, broken=True)
    return ConsoleStream(target, name, _lock_for(target), _writer=_writer_for(target))


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
        if color is None:
            color = out is not None and _wants_color(out)
        return cls(stdout=_stream(out, "stdout"), stderr=_stream(err, "stderr"), color=color)

    async def wait_flushed(self, give_up_after: float) -> None:
        """Wait (bounded) until both streams took every pending byte."""
        await asyncio.gather(
            self.stdout.wait_flushed(give_up_after), self.stderr.wait_flushed(give_up_after)
        )

    def close(self) -> None:
        """Let go of the shared console writers (after :meth:`wait_flushed`)."""
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
