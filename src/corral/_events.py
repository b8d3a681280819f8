"""What happens to a group, as a stream of events any number of consumers can follow.

A group appends each event to its history (bounded by what can happen: a few
events per rank and attempt) and wakes its waiting consumers; it never waits
for them. A consumer iterates from the start of the history, so one that
subscribes late still learns what already happened, and its iteration ends
after the group's ``closed`` event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from ._result import Result

__all__ = ("Event", "EventLog")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to a group.

    Attributes:
        kind: ``"start"`` (a rank started: ``rank``, ``pid``), ``"exit"`` (a
            rank exited: ``rank``, ``pid``, ``exitcode``, ``failed``),
            ``"closing"`` (corral began closing the attempt), ``"hang"`` (a
            rank showed no progress for ``hang_timeout``: ``detail["idle"]``), ``"restart"``
            (attempt ``attempt`` begins after a failure), ``"rendezvous"``
            (this node joined a round: ``detail`` has ``node``, ``nnodes``,
            ``world_size``), ``"closed"`` (the group is closed: the last event).
        time: when, in seconds since the epoch.
        attempt: the attempt it belongs to (0 before any restart).
        rank: the rank, for rank events.
        pid: the rank's pid, for rank events.
        exitcode: Popen convention, for ``exit``.
        failed: for ``exit``: the rank failed on its own (not ended by corral's close).
        detail: anything else worth knowing (e.g. the failure's message).
    """

    kind: str
    time: float
    attempt: int = 0
    rank: int | None = None
    pid: int | None = None
    exitcode: int | None = None
    failed: bool = False
    detail: dict[str, object] = field(default_factory=dict)


class EventLog:
    """A group's history of events, and its consumers' wake-up."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._changed: asyncio.Event | None = None
        self._closed = False
        #: The attempt events are stamped with (the group advances it).
        self.attempt = 0
        #: Called with the final Result (or None) as the group closes.
        self.on_closed: Callable[[Result | None], None] | None = None

    def close(self, result: Result | None, **detail: object) -> None:
        """The group is closed: the last event, and the ``on_closed`` hook."""
        if self._closed:
            return
        self.emit("closed", detail={"ok": result is not None and result.ok, **detail})
        if self.on_closed is not None:
            self.on_closed(result)

    @property
    def history(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def emit(self, kind: str, **fields: object) -> None:
        """Record an event now (never blocks; safe from any callback on the loop)."""
        if self._closed:
            return
        event = Event(kind, time.time(), self.attempt, **fields)  # type: ignore[arg-type]
        self._events.append(event)
        if kind == "closed":
            self._closed = True
        if self._changed is not None:
            self._changed.set()

    async def follow(self) -> AsyncIterator[Event]:
        """Every event from the first, as it comes; ends after ``closed``."""
        seen = 0
        while True:
            while seen < len(self._events):
                event = self._events[seen]
                seen += 1
                yield event
                if event.kind == "closed":
                    return
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            if seen < len(self._events):
                continue
            await self._changed.wait()
