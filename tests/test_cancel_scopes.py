"""Cancellation from anyio cancel scopes (issue 9, fault 4), beside asyncio's own.

anyio re-delivers a scope's cancellation to a task at every loop iteration
until the task leaves the scope or enters a shielded one; a close that keeps
waiting out its grace period must not turn that into a busy loop.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from .conftest import spawn_on, watched_console

if TYPE_CHECKING:
    from collections.abc import Callable

#: A rank that ignores SIGTERM (only SIGKILL ends it) and says so.
STUBBORN = ["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]


@pytest.mark.parametrize("canceller", ["anyio", "asyncio"])
async def test_a_cancelled_scope_costs_no_cpu_while_the_close_waits(canceller: str) -> None:
    """Regression (issue 9, fault 4): cancelling the scope around ``async with`` runs the
    full graceful close (1 s here, the rank ignores SIGTERM) without spinning: the
    supervisor's CPU over that second stays near zero."""
    console, out, _ = watched_console()
    started = 0.0
    cancel: Callable[[], object]

    async def body() -> None:
        nonlocal started
        async with spawn_on(STUBBORN, nprocs=1, tee="out", grace=1.0, console=console) as g:
            await out.wait_for(b"ready")
            started = time.process_time()
            cancel()
            await g.wait()

    async with asyncio.timeout(20):
        if canceller == "anyio":
            with anyio.CancelScope() as scope:
                cancel = scope.cancel
                await body()
            assert scope.cancelled_caught
        else:
            task = asyncio.current_task()
            assert task is not None

            def cancel() -> None:
                task.cancel()

            with pytest.raises(asyncio.CancelledError):
                await body()
            task.uncancel()
    spent = time.process_time() - started
    assert spent < 0.3, f"{spent:.2f} CPU-s spent while the close waited out a 1 s grace"


async def test_a_cancelled_explicit_close_still_hurries_under_anyio() -> None:
    """An explicit ``close()`` cancelled by an anyio scope skips the rest of the grace
    (SIGKILL now), finishes the clean-up, and the scope catches the cancellation."""
    console, out, _ = watched_console()
    async with asyncio.timeout(10):  # grace is 60 s: only hurrying ends in time
        group = spawn_on(STUBBORN, nprocs=1, tee="out", grace=60.0, console=console)
        async with group:
            await out.wait_for(b"ready")
            with anyio.CancelScope() as scope:
                closing = asyncio.get_running_loop().call_soon(scope.cancel)
                await group.close()
            assert scope.cancelled_caught
            closing.cancel()
        result = group.poll()
    assert result is not None
    assert result.exit_codes == {0: -signal.SIGKILL}
    assert result.terminated == {0}
