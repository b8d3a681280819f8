"""The same corral under asyncio and under trio (through anyio, and from plain trio.run).

Each test is a plain function running its body with ``anyio.run`` on both
backends (pytest-asyncio owns the ``async def`` tests of this suite), so the
guarantees are checked the same way on each: real ranks, byte-exact logs,
cancellation that closes, nothing left behind (the autouse fixture).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import corral

from .conftest import python

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

trio = pytest.importorskip("trio")

BACKENDS = ["asyncio", "trio"]


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


def survives_sigterm(folder: Path) -> tuple[Path, str]:
    """A FIFO and a rank's code: it writes "r" to the FIFO once its SIGTERM handler is
    in, then "t" at each SIGTERM, which it survives (only SIGKILL ends it)."""
    fifo = folder / "term"
    os.mkfifo(fifo)
    code = (
        "import signal, time\n"
        f"def on_term(*_): open({str(fifo)!r}, 'w').write('t')\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        f"open({str(fifo)!r}, 'w').write('r')\n"
        "while True: time.sleep(600)\n"
    )
    return fifo, code


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_logs_every_byte(backend: str, tmp_path: Path) -> None:
    """corral.run: exit codes, return of a byte-exact log (no newline at the end)."""
    code = "import os, sys; sys.stdout.write('x' * 70000 + '\\n' + os.environ['RANK'])"

    async def body() -> None:
        result = await corral.run(python(code), nprocs=3, redirects="out", log_dir=tmp_path)
        assert result.ok
        assert result.exit_codes == {0: 0, 1: 0, 2: 0}

    run_on(backend, body)
    for r in range(3):
        assert (tmp_path / str(r) / "stdout.log").read_text() == "x" * 70000 + f"\n{r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancel_scope_closes_the_group(backend: str, tmp_path: Path) -> None:
    """anyio.move_on_after around the block: the ranks are closed (terminated) before it
    returns; the close is shielded, so it finishes inside the cancelled scope."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    code = f"import time; open({str(fifo)!r}, 'w').write('r'); time.sleep(600)"
    seen: dict[str, object] = {}

    async def body() -> None:
        group = corral.spawn(python(code), nprocs=1, log_dir=tmp_path / "l", grace=5)
        with anyio.move_on_after(30) as scope:
            async with group:
                assert await anyio.to_thread.run_sync(fifo.read_text) == "r"
                seen["pids"] = dict(group.pids)
                scope.cancel()
                await group.wait()
        seen["result"] = group.poll()

    run_on(backend, body)
    result = seen["result"]
    assert isinstance(result, corral.Result)
    assert result.terminated == {0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_events_and_lines(backend: str, tmp_path: Path) -> None:
    """A failing rank: its root cause; the events and watched lines reach a trio consumer."""
    code = "import os, sys; print('line', os.environ['RANK'], flush=True); sys.exit(3)"

    async def body() -> None:
        async with corral.spawn(python(code), nprocs=1, log_dir=tmp_path, watch="out") as g:
            lines = g.lines()
            result = await g.wait()
            got = [line.data async for line in lines]
            kinds = [e.kind async for e in g.events()]
        assert result.root_cause is not None
        assert result.root_cause.exitcode == 3
        assert kinds[0] == "start"
        assert kinds[-1] == "closed"
        assert got in ([b"line 0\n"], [])  # the line may come before the subscription

    run_on(backend, body)


def test_plain_trio_run(tmp_path: Path) -> None:
    """trio.run without anyio: start/close explicitly."""

    async def body() -> None:
        group = corral.spawn(python("import time; time.sleep(600)"), nprocs=2, log_dir=tmp_path)
        await group.start()
        try:
            assert len(group.pids) == 2
        finally:
            result = await group.close(grace=5)
        assert result.terminated == {0, 1}

    trio.run(body)


def test_another_async_library_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    """Under an async library corral cannot run under: a clear error, no folder."""
    sniffio = pytest.importorskip("sniffio")
    token = sniffio.current_async_library_cvar.set("curio")
    try:
        with pytest.raises(corral.CorralError, match="not curio"):
            corral.spawn([sys.executable, "-c", "pass"], nprocs=1, log_dir=tmp_path / "x")
    finally:
        sniffio.current_async_library_cvar.reset(token)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_close_returns_only_once_every_rank_is_reaped(
    backend: str, tmp_path: Path
) -> None:
    """close(grace=60) on a rank that survives SIGTERM, cancelled mid-grace: the close
    SIGKILLs and reaps before the cancellation reaches the caller (never earlier)."""
    fifo, code = survives_sigterm(tmp_path)
    pids: dict[int, int] = {}

    async def body() -> None:
        group = corral.spawn(python(code), nprocs=1, log_dir=tmp_path / "l")
        await group.start()
        try:
            assert await anyio.to_thread.run_sync(fifo.read_text) == "r"
            pids.update(group.pids)
            async with anyio.create_task_group() as tg:
                tg.start_soon(group.close, 60)
                assert await anyio.to_thread.run_sync(fifo.read_text) == "t"
                tg.cancel_scope.cancel()
            for pid in pids.values():  # reaped: not even a zombie is left
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            await group.close(grace=0)

    run_on(backend, body)
    assert pids


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_in_an_already_cancelled_scope_still_closes(backend: str, tmp_path: Path) -> None:
    """start(), then close() from a scope cancelled before the call (a ``finally`` of a
    cancelled block): the close still runs, hurried, and every rank is reaped."""
    pids: dict[int, int] = {}

    async def body() -> None:
        group = corral.spawn(python("import time; time.sleep(600)"), nprocs=2, log_dir=tmp_path)
        await group.start()
        pids.update(group.pids)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await group.close(grace=60)
        result = group.poll()
        assert result is not None
        assert result.terminated == {0, 1}

    run_on(backend, body)
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_call_that_finished_is_not_lost_to_a_late_cancellation() -> None:
    """The asyncio side finished, then trio's scope is cancelled before the caller
    woke: the result is handed over (the next checkpoint raises), never dropped."""
    import threading

    from corral import _bridge

    finished = threading.Event()

    async def work() -> str:
        finished.set()
        return "started group"

    got: list[str] = []

    async def body() -> None:
        async def caller(scope: Any) -> None:  # a trio.CancelScope
            with scope:
                got.append(await _bridge.run_on_core(work()))
                await trio.lowlevel.checkpoint()
                got.append("not reached")

        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, scope)
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            finished.wait(10)  # blocks trio: the wake-up cannot run before the cancel
            scope.cancel()

    trio.run(body)
    assert got == ["started group"]


def test_ctrl_c_under_trio_returns_only_once_the_close_has_finished(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) while a close(grace=60) waits on a rank that survives SIGTERM:
    trio's KeyboardInterrupt leaves trio.run only after the close hurried to SIGKILL
    and reaped every rank."""
    import signal

    fifo, code = survives_sigterm(tmp_path)
    pids: dict[int, int] = {}
    group = corral.spawn(python(code), nprocs=1, log_dir=tmp_path / "l")

    async def body() -> None:
        await group.start()
        assert await trio.to_thread.run_sync(fifo.read_text) == "r"
        pids.update(group.pids)

        def wait_and_press() -> None:
            assert fifo.read_text() == "t"
            # From a worker thread, while trio idles: trio raises it in the main
            # task, which is waiting in close().
            os.kill(os.getpid(), signal.SIGINT)

        async def press_ctrl_c() -> None:
            await trio.to_thread.run_sync(wait_and_press)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(press_ctrl_c)
            await group.close(60)

    interrupted = False
    try:
        trio.run(body)
    except* KeyboardInterrupt:  # out of the nursery, in a group
        interrupted = True
    assert interrupted
    assert pids
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert group.poll() is not None
