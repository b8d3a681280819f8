"""Line subscriptions: each piped stream's lines, fanned out to any number of consumers.

A stream passes through corral when it is teed or watched (``watch=``). Its
pump hands every chunk to a ``LineFeed``, which keeps the chunk's whole lines
together as one bytes object (the line begun in the previous chunk completed
in front: at most one copy per chunk) and gives that batch to the group's
``LineHub``. A line longer than ``PIECE`` that does not end in the chunk comes
in pieces, as on the console. The feed keeps the partial line whether or not
anyone listens, so a subscriber that joins mid-line gets that line whole.

Each subscriber has a queue bounded in lines (``maxsize``): a batch that does
not fit is cut at a line boundary, what does not fit is dropped and counted,
and the next batch the subscriber gets says how many lines it missed
(``missed``). Nothing ever waits for a subscriber; with none, a feed only
keeps its partial line. Batches are shared between subscribers (the same bytes
object), but a batch object that carries a ``missed`` count is that
subscriber's own.

Consumers take batches (:class:`Lines`, ``group.lines(batched=True)``) or
single lines (:class:`Line`): the per-line iterator splits each batch in the
consumer's own task, never in the pump.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from . import _bridge
from ._errors import CorralError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator

T = TypeVar("T")

__all__ = (
    "Following",
    "Line",
    "LineFeed",
    "LineHub",
    "Lines",
    "Subscription",
    "each_line",
    "on_caller",
)

#: The longest piece of a line handed on at once (as the console's tee).
PIECE: Final = 64 * 1024

#: The window a chunk is split in: the copy of a batch out of a chunk costs
#: several times less per byte on 64 KiB than on the pump's 256 KiB reads.
STEP: Final = 64 * 1024

#: One line with its newline (the batches are split on ``\n`` only, never on ``\r``).
_LINE: Final = re.compile(rb"[^\n]*\n")


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


@dataclass(frozen=True, slots=True)
class Lines:
    """Consecutive whole lines one rank wrote on one stream, delivered at once.

    What ``group.lines(batched=True)`` yields: one object per chunk read from
    the rank's pipe instead of one per line, so a subscriber keeps up with
    any rank the tee keeps up with.

    Attributes:
        rank: the rank.
        stream: ``"out"`` or ``"err"``.
        data: the lines, each with its newline, exactly as the rank wrote
            them (the batches of a stream, joined, are a stretch of its log
            file). A batch that does not end with a newline is one line: a
            piece of a line longer than 64 KiB, or a last line without one.
        attempt: the attempt (0 before any restart).
        missed: lines this subscriber lost just before these because it did
            not keep up (the log files have them).
        count: how many lines ``data`` holds (at least 1). It is counted
            when first read (``bytes.count``, about 3 GB/s), not by the pump.

    Iterating a batch gives each line as ``bytes``, with its newline (split on
    ``\\n`` only: a ``\\r`` stays inside its line).
    """

    rank: int
    stream: str
    data: bytes
    attempt: int = 0
    missed: int = 0
    _count: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        """How many lines ``data`` holds (at least 1); counted at the first use."""
        if not self._count:
            object.__setattr__(self, "_count", _count(self.data))
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        return iter(_split(self.data))


def _count(data: bytes) -> int:
    """Lines in a batch: whole lines, or one line without newline."""
    return data.count(b"\n") or 1


def _lines_in(data: bytes, start: int, end: int) -> int:
    """Lines in ``data[start:end]`` (``start``, ``end``: line boundaries of a batch)."""
    if end <= start:
        return 0
    return data.count(b"\n", start, end) if data.endswith(b"\n") else 1


def _split(data: bytes) -> list[bytes]:
    if data.endswith(b"\n"):
        return _LINE.findall(data)
    return [data]  # a piece, or a last line without newline: one line


def _cut(data: bytes, lines: int) -> int:
    """The offset just after the ``lines``-th newline of ``data`` (which has more)."""
    end = 0
    find = data.find
    for _ in range(lines):
        end = find(b"\n", end) + 1
    return end


def _keep(data: bytes, sub: _Sub) -> int:
    """How many bytes of ``data`` (whole lines) fit in the subscriber's queue."""
    size = len(data)
    room = sub.maxbytes - sub.queued
    if size <= room:
        return size
    keep = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
    if not keep and not sub.queue:  # an empty queue always takes one line, however long
        keep = data.find(b"\n") + 1 or size
    return keep


class LineHub:
    """The group's line subscribers.

    Subscribers are added from any thread (``lines()`` under trio registers
    from the trio thread): the list is replaced, never changed in place, so
    ``publish`` reads it without a lock.
    """

    def __init__(self) -> None:
        self._subscribers: tuple[_Sub, ...] = ()
        self._lock = threading.Lock()
        self._closed = False
        self.attempt = 0

    @property
    def listening(self) -> bool:
        return bool(self._subscribers)

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, rank: int, stream: str, data: bytes) -> None:
        """Whole lines of one stream (or one line without newline) to each subscriber.

        Only bytes are measured here: lines are counted (``bytes.count``) only
        for what a subscriber drops, and for subscribers bounded in lines.
        """
        shared: Lines | None = None
        size = len(data)
        for sub in self._subscribers:
            if stream not in sub.streams or (sub.ranks is not None and rank not in sub.ranks):
                continue
            keep = _keep(data, sub)
            lines = 0  # lines kept, when counted
            if sub.maxlines is not None and keep:
                lines = _lines_in(data, 0, keep)
                room = sub.maxlines - sub.lines
                if lines > room:
                    keep, lines = (_cut(data, room), room) if room > 0 else (0, 0)
            dropped = _lines_in(data, keep, size) if keep < size else 0  # the newest lines
            if not keep:
                sub.missed += dropped
                continue
            missed, sub.missed = sub.missed, dropped  # those lost before it; after it
            if keep == size and not missed:  # the same object for every such subscriber
                if shared is None:
                    shared = Lines(rank, stream, data, self.attempt)
                batch = shared
            else:  # its own object: the missed count is this subscriber's
                batch = Lines(rank, stream, data[:keep], self.attempt, missed)
            if lines:
                object.__setattr__(batch, "_count", lines)
                sub.lines += lines
            sub.queue.append(batch)
            sub.queued += keep
            sub.wake.set()

    def close(self) -> None:
        """No more lines: every subscription ends once its queue is read."""
        self._closed = True
        for sub in self._subscribers:
            sub.wake.set()

    def subscribe(
        self,
        ranks: Collection[int] | None,
        streams: frozenset[str],
        maxbytes: int,
        maxlines: int | None = None,
    ) -> Subscription:
        """A subscriber, registered now: it gets every line completed from now on."""
        sub = _Sub(ranks, streams, maxbytes, maxlines)
        if not self._closed:
            with self._lock:
                self._subscribers = (*self._subscribers, sub)
        return Subscription(self, sub)

    def _remove(self, sub: _Sub) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)


class _Sub:
    __slots__ = (
        "ended",
        "lines",
        "loop",
        "maxbytes",
        "maxlines",
        "missed",
        "queue",
        "queued",
        "ranks",
        "streams",
        "waiting",
        "wake",
    )

    def __init__(
        self,
        ranks: Collection[int] | None,
        streams: frozenset[str],
        maxbytes: int,
        maxlines: int | None,
    ) -> None:
        self.ranks = None if ranks is None else frozenset(ranks)
        self.streams = streams
        self.maxbytes = maxbytes
        self.maxlines = maxlines
        self.queue: collections.deque[Lines] = collections.deque()
        self.queued = 0  # bytes in the queue
        self.lines = 0  # lines in the queue, counted only with maxlines
        self.missed = 0
        self.ended = False
        self.loop: asyncio.AbstractEventLoop | None = None  # where __anext__ waits
        self.waiting = 0
        # Bound to a loop at its first wait (the corral loop, where __anext__ runs).
        self.wake = asyncio.Event()


class Subscription:
    """One subscriber's batches: an async iterator of :class:`Lines`.

    Registered when created; it ends when the hub is closed (once its queue
    is read), or when it is closed (``aclose()``) or garbage-collected, which
    unregisters it at once.
    """

    __slots__ = ("_hub", "_sub")

    def __init__(self, hub: LineHub, sub: _Sub) -> None:
        self._hub = hub
        self._sub = sub

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Lines:
        sub = self._sub
        while True:
            if sub.queue:
                batch = sub.queue.popleft()
                sub.queued -= len(batch.data)
                if sub.maxlines is not None:
                    sub.lines -= batch.count
                return batch
            if sub.ended or self._hub.closed:
                self._end()
                raise StopAsyncIteration
            sub.wake.clear()
            sub.loop = asyncio.get_running_loop()
            sub.waiting += 1
            try:
                await sub.wake.wait()
            finally:
                sub.waiting -= 1

    async def aclose(self) -> None:
        self._end()

    def _end(self) -> None:
        sub = self._sub
        if not sub.ended:
            sub.ended = True
            self._hub._remove(sub)
        sub.queue.clear()
        sub.queued = sub.lines = 0
        if sub.waiting and sub.loop is not None:  # another task waits on it: it ends too
            try:
                sub.loop.call_soon_threadsafe(sub.wake.set)  # from any thread (trio's, GC)
            except RuntimeError:
                pass  # that loop is closed

    def __del__(self) -> None:
        self._end()


def on_caller(subscription: Subscription) -> AsyncIterator[Lines]:
    """The batches for the calling task: direct under asyncio, bridged under trio."""
    try:
        direct = _bridge.backend() == "asyncio"
    except CorralError:  # no event loop yet: decided at each step
        direct = False
    return subscription if direct else _bridge.bridged(subscription)


# The per-line iterator builds its Line objects through the slots directly:
# the frozen dataclass __init__ (object.__setattr__ per field) is 2.4x slower.
_new = object.__new__
_set_rank, _set_stream, _set_data, _set_attempt, _set_missed = (
    vars(Line)[name].__set__ for name in ("rank", "stream", "data", "attempt", "missed")
)


async def each_line(batches: AsyncIterator[Lines]) -> AsyncIterator[Line]:
    """Each line of each batch: the batches are split here, in the consumer's task."""
    try:
        async for batch in batches:
            rank, stream, attempt, missed = batch.rank, batch.stream, batch.attempt, batch.missed
            for data in _split(batch.data):
                line = _new(Line)
                _set_rank(line, rank)
                _set_stream(line, stream)
                _set_data(line, data)
                _set_attempt(line, attempt)
                _set_missed(line, missed)
                yield line
                missed = 0
    finally:
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()


class Following(Generic[T]):
    """What ``group.lines()`` returns: an async iterator that can be closed before it starts.

    ``aclose()`` (or dropping it) unregisters the subscription at once, even
    when it was never iterated (closing an unstarted async generator would
    not run its clean-up).
    """

    __slots__ = ("_items", "_subscription")

    def __init__(self, items: AsyncIterator[T], subscription: Subscription) -> None:
        self._items = items
        self._subscription = subscription

    def __aiter__(self) -> Following[T]:
        return self

    def __anext__(self) -> Awaitable[T]:
        return self._items.__anext__()  # no extra coroutine per item

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()
        self._subscription._end()  # a no-op when the iteration already ended it


class LineFeed:
    """One piped stream of one rank: chunks in, batches of whole lines out to the hub."""

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
        #: The line begun and not yet ended (shorter than PIECE), kept even
        #: with no subscriber: one that joins mid-line gets the line whole.
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
        size = len(data)
        if size <= STEP or not self._hub.listening:
            self._window(data, 0, size)
        else:  # in steps: copies of a cache-sized window are several times faster
            for start in range(0, size, STEP):
                self._window(data, start, min(start + STEP, size))

    def _window(self, data: bytes, start: int, stop: int) -> None:
        """``data[start:stop]``: its whole lines to the hub (with the partial line before)."""
        end = data.rfind(b"\n", start, stop) + 1
        partial = self._partial
        if not end:  # no line ends here
            piece = data if stop - start == len(data) else data[start:stop]
            self._rest(partial + piece if partial else piece)
            return
        hub = self._hub
        if hub.listening:
            if partial:
                head = b"".join((partial, memoryview(data)[start:end]))  # one copy
            elif end - start == len(data):
                head = data  # no copy
            else:
                head = data[start:end]
            self._partial = b""
            hub.publish(self._rank, self._stream, head)
        self._rest(data[end:stop] if end < stop else b"")

    def _rest(self, rest: bytes) -> None:
        """Keep a partial line; hand on the pieces of one that reached ``PIECE``."""
        if len(rest) >= PIECE:
            hub = self._hub
            whole = len(rest) - len(rest) % PIECE
            if hub.listening:
                for start in range(0, whole, PIECE):
                    hub.publish(self._rank, self._stream, rest[start : start + PIECE])
            rest = rest[whole:]
        self._partial = rest

    def flush(self) -> None:
        """End of the stream: a last line without newline."""
        if self._partial and self._hub.listening:
            self._hub.publish(self._rank, self._stream, self._partial)
        self._partial = b""
