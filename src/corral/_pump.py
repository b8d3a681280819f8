"""Output pumps: one asyncio read-pipe protocol per teed (rank, stream).

Bytes in, bytes out. Each chunk the loop reads is written verbatim to the
rank's log file, then split into whole lines for the console (in pieces of at
most ``CHUNK`` bytes: byte operations on larger buffers slow down sharply).
A stream starts with the kernel's default 64 KiB pipe; once a read fills a
whole ``CHUNK`` (the rank writes faster than one wake-up drains), its pipe is
grown to ``BUSY_PIPE`` bytes and read in chunks of that size: 4x fewer
wake-ups and file writes for a chatty rank, while idle ranks keep small pipes.
Pipe buffers are pinned kernel memory, and once a user's pipes exceed
``/proc/sys/fs/pipe-user-pages-soft`` (64 MiB by default) the kernel gives that
user's *new* pipes a single-digit number of pages: at most ``MAX_GROWN`` pipes
of this process are grown at a time (16 MiB). The splitter
keeps at most one partial line of ``LINE_CAP`` bytes: a longer line is teed in
pieces, so memory stays bounded whatever a rank writes. No thread, no
``readline()``: ``data_received`` is called straight from the selector.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from typing import IO, TYPE_CHECKING, Final

from . import _platform

if TYPE_CHECKING:
    from pathlib import Path

    from ._lines import LineFeed
    from ._tee import ConsoleStream

__all__ = ("CHUNK", "LINE_CAP", "Pump", "open_pump")

_log = logging.getLogger("corral")

#: Bytes asked of the pipe per read; byte operations on larger chunks slow down sharply.
CHUNK: Final = 65536
#: The longest partial line held for the console before it is teed in pieces.
LINE_CAP: Final = 65536
#: Pipe size and read size of a busy stream.
BUSY_PIPE: Final = 262144
#: How many pipes of this process may be grown at the same time.
MAX_GROWN: Final = 64

_grown = 0  # pipes grown and not yet closed (approximate across threads: a budget, not a lock)


#: Erase from the cursor to the end of the line (ANSI; every terminal corral colours).
_ERASE: Final = b"\x1b[K"
#: Terminals (device, inode) on which a rank's progress line is drawn right now,
#: the cursor back at its start: the next line written there erases it first.
_progress_on: set[tuple[int, int]] = set()


def _terminal_key(target: object) -> tuple[int, int] | None:
    """(device, inode) of a console that is an ANSI terminal, else ``None``."""
    if os.environ.get("TERM") == "dumb":
        return None
    try:
        fd = target.fileno()  # type: ignore[attr-defined]
        if not isinstance(fd, int) or not os.isatty(fd):
            return None
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _collapse(lines: bytes) -> bytes:
    """Each line as a terminal would leave it: its last non-empty ``\r`` segment."""
    out = []
    for line in lines.split(b"\n"):
        if b"\r" in line:
            segments = [seg for seg in line.split(b"\r") if seg]
            line = segments[-1] if segments else b""
        out.append(line)
    return b"\n".join(out)


class _LineTee:
    """Split chunks into prefixed whole lines, one console write per chunk.

    ``\r`` (progress bars such as tqdm's) on a terminal console: a line's
    ``\r`` segments are collapsed to the last non-empty one, as the terminal
    would leave it, so the prefix starts every line shown; and the segment
    being updated is drawn live (``ESC[K prefix segment \r``): the cursor
    stays at the start of that line, and the next line written to the
    terminal, by any rank, erases it first, so no line is glued onto a
    progress line. A console that is not a terminal gets whole lines, bytes
    unchanged (``\r`` included), as before. Log files are never touched.
    """

    __slots__ = ("_console", "_cr", "_nl_prefix", "_partial", "_prefix", "_tty", "droppable")

    def __init__(self, console: ConsoleStream, prefix: bytes) -> None:
        self._console = console
        self._prefix = prefix
        self._nl_prefix = b"\n" + prefix
        self._partial = b""
        self._cr = False  # the held partial line has a \r in it
        self._tty = _terminal_key(console.target)
        #: Set when the group closes: its rest may be dropped from a backed-up
        #: console (never from the log file) rather than block the close.
        self.droppable = False

    @property
    def console(self) -> ConsoleStream:
        """The console stream this splitter writes to."""
        return self._console

    def feed(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        if end == 0:
            self._hold(data)
            return
        head = data[:end] if end < len(data) else data
        if self._partial:
            head = self._partial + head
            self._partial = b""
            self._cr = False
        if self._tty is not None and b"\r" in head:
            head = _collapse(head)
        self._write_lines(head)
        if end < len(data):
            self._hold(data[end:])

    def _write_lines(self, head: bytes) -> None:
        """Write complete lines (``head`` ends in a newline), prefixed."""
        prefix = self._prefix
        if prefix:
            head = prefix + head[:-1].replace(b"\n", self._nl_prefix) + b"\n"
        tty = self._tty
        if tty is not None and tty in _progress_on:
            _progress_on.discard(tty)
            head = _ERASE + head
        self._console.write(head, self.droppable)

    def _hold(self, tail: bytes) -> None:
        partial = self._partial + tail if self._partial else tail
        if self._tty is not None and (self._cr or b"\r" in tail):
            partial = self._progress(partial)
        while len(partial) >= LINE_CAP:
            self._write_lines(partial[:LINE_CAP] + b"\n")
            partial = partial[LINE_CAP:]
            self._cr = False
        self._partial = partial

    def _progress(self, partial: bytes) -> bytes:
        """A partial line with ``\r``: keep its last segment; draw it on a terminal."""
        shown = partial.rstrip(b"\r")
        cut = shown.rfind(b"\r") + 1
        shown = shown[cut:]
        self._cr = True
        tty = self._tty
        if tty is not None and shown and len(shown) < LINE_CAP:
            _progress_on.add(tty)
            self._console.write(_ERASE + self._prefix + shown + b"\r", self.droppable)
        # What a later newline completes: the shown segment, then what follows its \r.
        return shown + b"\r" if partial.endswith(b"\r") else shown

    def flush(self) -> None:
        """End a last line that has no newline (the console gets one; the file does not)."""
        if self._partial:
            partial = _collapse(self._partial) if self._cr else self._partial
            self._partial = b""
            self._cr = False
            self._write_lines(partial + b"\n")


class Pump(asyncio.Protocol):
    """Read one pipe to EOF into a log file and, optionally, the console."""

    def __init__(
        self, rank: int, stream: str, path: Path, tee: _LineTee | None, feed: LineFeed | None
    ) -> None:
        self.rank = rank
        self._feed = feed
        self.stream = stream
        self.path = path
        self.error: str | None = None
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        self._tee = tee
        self._transport: asyncio.ReadTransport | None = None
        self._busy = False
        self._grown = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- paused by a console that does not keep up (see _tee.ConsoleStream) ---
    def pause(self) -> None:
        """Stop reading the pipe for now (the rank blocks once its pipe is full)."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume(self) -> None:
        """Read the pipe again."""
        if self._transport is not None:
            self._transport.resume_reading()

    def closing(self) -> None:
        """The group closes: read to the end, never paused by the console again."""
        if self._tee is not None:
            self._tee.droppable = True
            self._tee.console.detach(self)

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._transport = transport
        if hasattr(transport, "max_size"):
            transport.max_size = CHUNK

    def data_received(self, data: bytes) -> None:
        self._write_file(data)
        tee = self._tee
        size = len(data)
        if tee is not None:
            if size <= CHUNK:
                tee.feed(data)
            else:
                for start in range(0, size, CHUNK):
                    tee.feed(data[start : start + CHUNK])
        if self._feed is not None:
            self._feed.feed(data)
        if size == CHUNK and not self._busy:
            self._grow()

    def _grow(self) -> None:
        """The rank fills its pipe: give it a bigger pipe and read it in bigger chunks."""
        global _grown
        self._busy = True
        transport = self._transport
        if transport is None or not hasattr(transport, "max_size") or _grown >= MAX_GROWN:
            return
        pipe = transport.get_extra_info("pipe")
        if pipe is not None and _platform.CAN_RESIZE_PIPES:
            try:
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, BUSY_PIPE)
            except (OSError, ValueError):
                return  # over the per-user pipe limit (EPERM) or closed: keep the default
            _grown += 1
            self._grown = True
        transport.max_size = BUSY_PIPE

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    # -- file sink ----------------------------------------------------------
    def _write_file(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            # Report it once and stop writing this file; the pipe keeps being
            # drained (so the rank never blocks) and the other ranks' logs flow.
            self.error = f"writing {self.path} failed: {exc}"
            _log.error("corral: rank %d %s: %s", self.rank, self.stream, self.error)
            os.close(fd)
            self._fd = None

    def _finish(self) -> None:
        global _grown
        if self._grown:
            self._grown = False
            _grown -= 1
        if self._tee is not None:
            self._tee.flush()
            self._tee.console.detach(self)
        if self._feed is not None:
            self._feed.flush()
            self._feed = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.done.done():
            self.done.set_result(None)

    # -- forced end -----------------------------------------------------------
    def drain_and_close(self) -> None:
        """Read what is already in the pipe, then close it (a writer escaped the group)."""
        transport = self._transport
        if transport is None or self.done.done():
            return
        pipe = transport.get_extra_info("pipe")
        if pipe is not None:
            try:
                fd = pipe.fileno()
                while True:
                    data = os.read(fd, CHUNK)
                    if not data:
                        break
                    self.data_received(data)
            except (BlockingIOError, OSError, ValueError):
                pass  # nothing more buffered, or already closed
        transport.close()


async def open_pump(
    rank: int,
    stream: str,
    pipe: IO[bytes],
    path: Path,
    console: ConsoleStream | None,
    prefix: bytes,
    feed: LineFeed | None = None,
) -> Pump:
    """Start pumping ``pipe`` into ``path`` (and the console, and line subscribers, when given)."""
    _platform.settle_allocator()
    tee = _LineTee(console, prefix) if console is not None else None
    pump = Pump(rank, stream, path, tee, feed)
    try:
        await asyncio.get_running_loop().connect_read_pipe(lambda: pump, pipe)
    except BaseException:
        pump._finish()
        pipe.close()
        raise
    if console is not None:
        console.attach(pump)
    return pump
