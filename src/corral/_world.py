"""How a group stops, and one round of a multi-node world.

``Stop`` is a group's one stop request (``close()``, a cancellation, a
signal): set once, it carries the close's ``grace`` and first signal, and the
drivers wait on it (a backoff, a world round) as on any other event.

``world_round`` runs this node's current attempt until the world's round
ends: the first failure anywhere (written compare-and-set to the round's
``end`` key by ``_rendezvous.Node``), every node done, or a node closed. It
tells the world this node's end at once (before its own teardown) and
returns the node's Result with the world's root cause.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._rendezvous import stopped

if TYPE_CHECKING:
    from ._attempt import Attempt
    from ._rendezvous import Node
    from ._result import Result

__all__ = ("Stop", "world_round")


class Stop:
    """A group's stop request: no restart after it; what a start in progress closes with."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        #: The ``grace`` and first signal of the close that asked first.
        self.close_args: tuple[float | None, int] = (None, signal.SIGTERM)

    def requested(self) -> bool:
        """Whether a stop was asked (a call: its answer changes across awaits)."""
        return self._event.is_set()

    def request(self, grace: float | None, sig: int) -> None:
        """Ask to stop (the first request chooses ``grace`` and ``sig``)."""
        if not self._event.is_set():
            self.close_args = (grace, sig)
            self._event.set()

    async def sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; False when a stop was asked meanwhile (or before)."""
        if delay > 0 and not self.requested():
            try:
                await asyncio.wait_for(self._event.wait(), delay)
            except TimeoutError:
                pass
        return not self.requested()

    async def or_done(self, task: asyncio.Future[Any]) -> None:
        """Wait until ``task`` is done or a stop is asked."""
        asked: asyncio.Future[Any] = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()


async def world_round(node: Node, attempt: Attempt, stop: Stop) -> tuple[Result, bool]:
    """Run ``attempt`` until the world's round ends.

    Returns:
        Its Result with the world's cause set, and whether the world
        failed (a closed world, stopped by one node, is never restarted).
    """
    world = node.world
    assert world is not None
    end_task = asyncio.ensure_future(node.ended())
    settled = asyncio.ensure_future(attempt.settled())
    try:
        await asyncio.wait({end_task, settled}, return_when=asyncio.FIRST_COMPLETED)
        if settled.done() and not stop.requested():
            # Tell the world at once, before this node's own teardown.
            early = attempt.failures_so_far()
            if early:
                first = min(early, key=lambda f: (f.timestamp, f.rank))
                await node.publish_failure(first)
        if end_task.done() and not settled.done():
            grace, sig = stop.close_args if stop.requested() else (None, signal.SIGTERM)
            result = await attempt.close(grace, sig=sig)
        else:
            result = await attempt.wait()
        if not end_task.done():
            closed = stop.requested()
            await node.publish(result, closed=closed)
            await stop.or_done(end_task)
            if not end_task.done() and not closed:  # closed while other nodes run: they stop
                await node.publish_closed()
        end = await end_task
        await node.end_round()
    except BaseException:
        if not end_task.done():
            await node.publish_closed()  # ends every node's wait, this one's thread too
            await asyncio.wait([end_task])
        await node.end_round()
        raise
    finally:
        settled.cancel()
    # This node's failures say where they are in the world.
    failures = {rank: node.enrich(f) for rank, f in result.failures.items()}
    failure = end.failure
    if end.kind == "failed" and failure is not None and failure.node == world.node:
        # This node's own failure: the local record (logs, traceback) is the root cause.
        failure = failures.get(failure.rank, failure)
    if end.kind == "closed" and end.node != world.node:
        failure = stopped(end.node)
    elif end.kind != "failed":
        failure = None
    return replace(result, failures=failures, world_failure=failure), end.kind == "failed"
