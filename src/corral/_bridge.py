"""corral under trio: its asyncio core on a private loop thread, awaited from trio.

corral's supervisor is built on asyncio (subprocess transports, pidfd readers,
``asyncio.shield``). Under trio (``trio.run``, or anyio's trio backend) every
public coroutine of a group runs on *one* asyncio loop in a daemon thread of
this process, started at the first use; the trio task awaits its outcome
through trio's own token (``run_sync_soon``): no thread per call, none per rank.

* Cancellation of the trio caller is forwarded as a cancellation of the
  asyncio task, so the asyncio-side semantics hold unchanged: a cancelled
  ``wait`` just stops waiting, a cancelled ``close`` hurries, and leaving
  ``async with`` closes the group shielded (the trio side waits for that
  close inside a shielded scope: it always finishes).
* Anything else than asyncio or trio is a clear ``CorralError`` before
  anything is created.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import CorralError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

__all__ = ("backend", "bridged", "check_library", "run_on_core")

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def backend() -> str:
    """``"asyncio"`` or ``"trio"``: the async library running the calling task.

    Raises:
        CorralError: called from another async library, or from no event loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return "trio"
    name = _sniffed()
    raise CorralError(
        f"corral runs under asyncio or trio (directly or through anyio); "
        f"this task runs under {name or 'no event loop'}"
    )


def _sniffed() -> str | None:
    try:
        import sniffio

        found: str = sniffio.current_async_library()
        return found
    except Exception:
        return None


def core_loop() -> asyncio.AbstractEventLoop:
    """The process's corral loop (started at the first call), in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=serve, name="corral-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


async def run_on_core(coro: Coroutine[Any, Any, T], *, shield: bool = False) -> T:
    """Run ``coro`` on the corral loop and await it from the calling trio task.

    ``shield``: the trio caller waits for the end even when cancelled (a
    close must finish); otherwise a cancelled caller cancels the asyncio task
    and waits until that task has *finished* handling it (asyncio-side
    semantics: a cancelled close still kills and reaps), then re-raises.
    The trio task is woken only by the asyncio task's own end, never earlier.
    """
    import trio

    loop = core_loop()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    task: asyncio.Task[T] | None = None
    outcome: list[asyncio.Task[T]] = []

    def wake(finished: asyncio.Task[T]) -> None:  # on the corral loop
        outcome.append(finished)
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the trio run is over; nobody waits
            pass

    def start() -> None:  # on the corral loop
        nonlocal task
        # A context of its own: trio's (sniffio says "trio") must not leak into asyncio.
        task = loop.create_task(coro, context=contextvars.Context())
        task.add_done_callback(wake)

    def cancel() -> None:  # on the corral loop, always after start()
        assert task is not None
        # After the task's first step (already queued): as under asyncio, where an
        # awaited coroutine runs until its first suspension before a cancellation
        # lands, a cancelled close() always gets to start closing.
        loop.call_soon(task.cancel)

    loop.call_soon_threadsafe(start)
    try:
        if shield:
            with trio.CancelScope(shield=True):
                await done.wait()
        else:
            await done.wait()
    except (trio.Cancelled, KeyboardInterrupt) as exc:
        # trio delivers Ctrl-C even inside a shielded scope: it is handled as a
        # cancellation (a shielded call is left to finish), raised once it has.
        if not shield:
            loop.call_soon_threadsafe(cancel)
        while not done.is_set():
            try:
                with trio.CancelScope(shield=True):
                    await done.wait()
            except KeyboardInterrupt:  # another Ctrl-C: the clean-up is bounded, wait on
                continue
        if isinstance(exc, KeyboardInterrupt) or outcome[0].cancelled():
            raise
        # The call finished before the cancellation reached it: its outcome is
        # not lost (a started group is handed over, to be closed by its block);
        # the scope stays cancelled, so trio's next checkpoint raises.
    finished = outcome[0]
    if finished.cancelled():
        raise CorralError("corral's loop cancelled a call that was not cancelled")
    return finished.result()


async def bridged(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """``source`` (an async iterator living on the corral loop) for any caller.

    Under asyncio it is iterated directly; under trio each step runs on the
    corral loop. Closing this iterator closes ``source`` where it lives.
    """

    async def step() -> T:
        return await anext(source)

    try:
        while True:
            try:
                if backend() == "trio":
                    item = await run_on_core(step())
                else:
                    item = await anext(source)
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            if backend() == "trio":
                await run_on_core(aclose(), shield=True)
            else:
                await aclose()


def check_library() -> None:
    """Refuse, before anything is created, an async library corral cannot run under."""
    name = _sniffed()
    if name not in (None, "asyncio", "trio"):
        raise CorralError(
            f"corral runs under asyncio or trio (directly or through anyio), not {name}"
        )
