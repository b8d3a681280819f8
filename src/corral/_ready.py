"""Readiness: how a rank says it is ready, and ``Group.ready()``'s wait for it.

A rank is ready once it printed ``ready_line`` on its stdout (its pump's
``LineFeed`` sees the text and calls :meth:`Readiness.said`), or, with
``ready_fd=True``, once it wrote a byte to the pipe named by
``$CORRAL_READY_FD`` (s6's notification-fd). The pipe is read to its end, so
a rank that writes again never gets SIGPIPE; closing it unwritten means
"never ready" (unless a ready line may still come). Each rank's readiness
is a future on the loop: waiting costs nothing, and nothing polls.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from ._errors import CorralError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._config import GroupPlan
    from ._events import EventLog

__all__ = ("Readiness", "missing")


def missing(plan: GroupPlan) -> str | None:
    """What a rank that is not ready did not do, in words (``None``: it cannot say)."""
    ways = []
    if plan.ready_line is not None:
        ways.append(f"{plan.ready_line.decode()!r} on its stdout")
    if plan.ready_fd:
        ways.append("write to $CORRAL_READY_FD")
    return " or ".join(ways) or None


class Readiness:
    """The ranks of one attempt that said they are ready, and the pipes they say it on."""

    def __init__(self, plan: GroupPlan, events: EventLog, loop: asyncio.AbstractEventLoop) -> None:
        self._plan = plan
        self._events = events
        self._loop = loop
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._pids: dict[int, int] = {}
        #: rank -> the read end of its readiness pipe, until its end or the close.
        self._fds: dict[int, int] = {}
        #: Ranks that closed their pipe unwritten (and have no ready line to come).
        self._never: set[int] = set()
        self._changed = asyncio.Event()

    def started(self, rank: int, pid: int, fd: int | None) -> None:
        """Rank ``rank`` runs; ``fd``: the read end of its readiness pipe (now ours)."""
        self._ready[rank] = self._loop.create_future()
        self._pids[rank] = pid
        if fd is not None:
            self._fds[rank] = fd
            self._loop.add_reader(fd, self._on_fd, rank, fd)

    def said(self, rank: int) -> None:
        """Rank ``rank`` said it is ready (the first time counts)."""
        fut = self._ready.get(rank)
        if fut is not None and not fut.done():
            fut.set_result(None)
            self._events.emit("ready", rank=rank, pid=self._pids.get(rank))

    def close(self) -> None:
        """The attempt is closed: every readiness pipe closes."""
        for rank in list(self._fds):
            self._drop(rank)

    async def wait(
        self,
        wanted: Sequence[int],
        fail_after: float | None,
        *,
        alive: Callable[[int], bool],
        exits: asyncio.Event,
        fail: Callable[[list[int], str], None],
    ) -> None:
        """Until every rank in ``wanted`` is ready (see ``Group.ready``).

        ``exits`` is set at each rank exit; ``fail`` fails the ranks not
        ready in time (corral's verdict), closing the group.
        """
        what = missing(self._plan)
        assert what is not None
        loop = self._loop
        deadline = None if fail_after is None else loop.time() + fail_after
        while True:
            pending = [r for r in wanted if r not in self._ready or not self._ready[r].done()]
            if not pending:
                return
            gone = [r for r in pending if not alive(r)]
            if gone:
                raise CorralError(f"rank(s) {gone} ended before saying ready (no {what})")
            closed = [r for r in pending if r in self._never]
            if closed:
                raise CorralError(
                    f"rank(s) {closed} closed $CORRAL_READY_FD without writing to it: never ready"
                )
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                message = f"not ready within {fail_after} s (no {what})"
                fail(pending, message)
                raise TimeoutError(f"rank(s) {pending} {message}: the group is closing")
            exits.clear()
            self._changed.clear()
            wakers = [
                asyncio.ensure_future(exits.wait()),
                asyncio.ensure_future(self._changed.wait()),
            ]
            waiters: list[asyncio.Future[Any]] = [*(self._ready[r] for r in pending), *wakers]
            try:
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in wakers:
                    w.cancel()

    def _on_fd(self, rank: int, fd: int) -> None:
        """A readiness pipe turned readable: bytes (ready) or its end."""
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.said(rank)
            return
        self._drop(rank)
        fut = self._ready.get(rank)
        if fut is not None and not fut.done() and self._plan.ready_line is None:
            self._never.add(rank)  # closed unwritten: wait() says so at once
            self._changed.set()

    def _drop(self, rank: int) -> None:
        fd = self._fds.pop(rank, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)
