"""Line subscriptions: each piped stream's lines, fanned out to any number of consumers.

A stream passes through corral when it is teed or watched (``watch=``). Its
pump hands every chunk to a ``LineFeed`` that splits it into lines (a line
longer than the pump's cap comes in pieces, as on the console) and gives each
line to the group's ``LineHub``. Each subscriber has a bounded queue: when it
is full, new lines for that subscriber are dropped and counted, and the next
line it gets says how many it missed (``Line.missed``). Nothing ever waits for
a subscriber; with none, a feed does nothing.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Collection

__all__ = ("Line", "LineFeed", "LineHub")

#: The longest piece of a line handed on at once (as the console's tee).
PIECE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Line:
    """One line a rank wrote.

    Attributes:
        rank: the rank.
        stream: ``"out"`` or ``"err"``.
        data: the bytes, with their newline (none on a last line without one,
            or on a piece of a line longer than 64 KiB).
        attempt: the attempt (0 before any restart).
        missed: lines this subscriber lost just before this one because it
            did not keep up (the log files have them).
    """

    rank: int
    stream: str
    data: bytes
    attempt: int = 0
    missed: int = 0


class LineHub:
    """The group's line subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[_Sub] = []
        self._closed = False
        self.attempt = 0

    @property
    def listening(self) -> bool:
        return bool(self._subscribers)

    def publish(self, rank: int, stream: str, data: bytes) -> None:
        line: Line | None = None
        for sub in self._subscribers:
            if sub.ranks is not None and rank not in sub.ranks:
                continue
            if stream not in sub.streams:
                continue
            if len(sub.queue) >= sub.size:
                sub.missed += 1
                continue
            if line is None or sub.missed:
                line = Line(rank, stream, data, self.attempt, sub.missed)
                sub.missed = 0
            sub.queue.append(line)
            sub.wake.set()

    def close(self) -> None:
        """No more lines: every subscription ends once its queue is read."""
        self._closed = True
        for sub in self._subscribers:
            sub.wake.set()

    async def subscribe(
        self, ranks: Collection[int] | None, streams: frozenset[str], size: int
    ) -> AsyncIterator[Line]:
        sub = _Sub(ranks, streams, size)
        self._subscribers.append(sub)
        try:
            while True:
                while sub.queue:
                    yield sub.queue.popleft()
                if self._closed:
                    return
                sub.wake.clear()
                if not sub.queue and not self._closed:
                    await sub.wake.wait()
        finally:
            self._subscribers.remove(sub)


class _Sub:
    __slots__ = ("missed", "queue", "ranks", "size", "streams", "wake")

    def __init__(self, ranks: Collection[int] | None, streams: frozenset[str], size: int) -> None:
        self.ranks = None if ranks is None else frozenset(ranks)
        self.streams = streams
        self.size = size
        self.queue: collections.deque[Line] = collections.deque()
        self.missed = 0
        self.wake = asyncio.Event()


class LineFeed:
    """One piped stream of one rank: chunks in, lines out to the hub."""

    __slots__ = ("_hub", "_marker", "_on_ready", "_partial", "_rank", "_seen", "_stream")

    def __init__(
        self,
        hub: LineHub,
        rank: int,
        stream: str,
        marker: bytes | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._hub = hub
        self._rank = rank
        self._stream = stream
        self._partial = b""
        #: The readiness text, until it is seen (then ``None``): ``on_ready`` is called once.
        self._marker = marker
        self._on_ready = on_ready
        self._seen = b""  # the tail of the last chunk, for a marker cut in two

    def feed(self, data: bytes) -> None:
        marker = self._marker
        if marker is not None:
            window = self._seen + data
            if marker in window:
                self._marker = None
                if self._on_ready is not None:
                    self._on_ready()
            else:
                self._seen = window[-(len(marker) - 1) :] if len(marker) > 1 else b""
        hub = self._hub
        if not hub.listening:
            self._partial = b""
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            hub.publish(self._rank, self._stream, data[start : end + 1])
            start = end + 1
        rest = data[start:]
        while len(rest) >= PIECE:
            hub.publish(self._rank, self._stream, rest[:PIECE])
            rest = rest[PIECE:]
        self._partial = rest

    def flush(self) -> None:
        """End of the stream: a last line without newline."""
        if self._partial and self._hub.listening:
            self._hub.publish(self._rank, self._stream, self._partial)
        self._partial = b""
