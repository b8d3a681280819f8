"""wait / poll / close / send_signal against real processes and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
from typing import TYPE_CHECKING

import psutil
import pytest

import corral
from corral import CorralError, Group, GroupFailedError, Std

from .children import callable_fns as fns
from .conftest import python, run_on, spawn_on, watched_console

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from .conftest import WatchedIO

SLEEPER = "import time; print('ready', flush=True); time.sleep(600)"
#: A rank that says ``ready``, then answers every SIGTERM with a ``term`` line
#: and runs on (only SIGKILL ends it). sigwait(), not a handler: a signal that
#: arrives right after ``ready`` is never lost.
IGNORE_TERM = textwrap.dedent(
    """
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print('ready', flush=True)
    while True:
        signal.sigwait({signal.SIGTERM})
        print('term', flush=True)
    """
)


@contextlib.asynccontextmanager
async def ready_group(
    code: str, log_dir: Path, *, nprocs: int, grace: float
) -> AsyncIterator[tuple[Group, WatchedIO]]:
    """Spawn ``nprocs`` ranks of ``code`` (stdout teed); once each printed ``ready``,
    yield the group and its watched console stdout."""
    console, out, _ = watched_console()
    async with (
        asyncio.timeout(10),
        spawn_on(
            python(code), nprocs=nprocs, tee="out", grace=grace, log_dir=log_dir, console=console
        ) as group,
    ):
        await out.wait_for(b"ready", nprocs)
        yield group, out


async def test_all_succeed(tmp_path: Path) -> None:
    """Every rank exits 0: ok, no failures, nothing terminated, exit codes recorded."""
    async with asyncio.timeout(10):
        result = await corral.run(python("pass"), nprocs=4, log_dir=tmp_path)
    assert result.ok
    assert result.exit_codes == dict.fromkeys(range(4), 0)
    assert result.failures == {}
    assert result.terminated == frozenset()
    assert result.root_cause is None
    result.raise_for_failure()


async def test_first_failure_closes_the_others(tmp_path: Path) -> None:
    """Rank 0 exits 3 while the others sleep: wait() returns at once, the others are
    terminated (not failures), and the root cause is rank 0."""
    code = textwrap.dedent(
        """
        import os, sys, time
        print('ready', flush=True)
        if os.environ['RANK'] == '0':
            sys.stdin.close()
            sys.exit(3)
        time.sleep(600)
        """
    )
    console, _out, _ = watched_console()
    async with (
        asyncio.timeout(10),
        spawn_on(
            python(code), nprocs=4, tee="out", grace=5, log_dir=tmp_path, console=console
        ) as group,
    ):
        result = await group.wait()
    assert result.exit_codes[0] == 3
    assert set(result.failures) == {0}
    assert result.terminated == {1, 2, 3}
    assert all(result.exit_codes[r] == -signal.SIGTERM for r in (1, 2, 3))
    root = result.root_cause
    assert root is not None
    assert root.rank == 0
    assert root.exitcode == 3
    assert root.signal is None
    assert root.message == "exited with code 3"
    assert root.pid == group.pids[0]
    assert not result.ok
    with pytest.raises(GroupFailedError) as info:
        result.raise_for_failure()
    assert info.value.result is result
    assert "rank 0" in str(info.value)
    assert "exited with code 3" in str(info.value)


async def test_killed_by_a_signal(tmp_path: Path) -> None:
    """A rank killed by SIGSEGV: exitcode -11, signal 'SIGSEGV', message says so."""
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    async with asyncio.timeout(10):
        result = await corral.run(python(code), nprocs=1, log_dir=tmp_path)
    failure = result.failures[0]
    assert failure.exitcode == -11
    assert failure.signal == "SIGSEGV"
    assert failure.message == "killed by SIGSEGV"
    assert result.exit_codes == {0: -11}


@pytest.mark.parametrize(("kind", "code"), [("missing", 127), ("not-executable", 126)])
async def test_unrunnable_executable_is_a_failure(tmp_path: Path, kind: str, code: int) -> None:
    """A missing (127) or non-executable (126) program is a Failure naming the path, not an
    exception; that rank has no pid, and the other ranks are closed."""
    program = tmp_path / "prog"
    if kind == "not-executable":
        program.write_text("#!/bin/sh\n")
        program.chmod(0o644)
    async with (
        asyncio.timeout(10),
        corral.spawn(str(program), nprocs=1, tee="all", log_dir=tmp_path / "logs") as group,
    ):
        assert group.pids == {}
        result = await group.wait()
    # The log files RankLogs names exist (empty) even for a rank that never started.
    assert result.logs[0].stdout is not None
    assert result.logs[0].stdout.read_bytes() == b""
    failure = result.failures[0]
    assert failure.exitcode == code
    assert failure.pid is None
    assert str(program) in failure.message
    assert result.exit_codes == {0: code}


async def test_poll_before_and_after(tmp_path: Path) -> None:
    """poll() is None while a rank runs, then the final Result (same as close's)."""
    console, out, _ = watched_console()
    code = textwrap.dedent(
        """
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # sigwait: no lost signal
        print('ready', flush=True)
        signal.sigwait({signal.SIGUSR1})
        """
    )
    async with (
        asyncio.timeout(10),
        spawn_on(python(code), nprocs=2, tee="out", log_dir=tmp_path, console=console) as group,
    ):
        await out.wait_for(b"ready", 2)
        assert group.poll() is None
        group.send_signal(signal.SIGUSR1)
        result = await group.wait()
        assert group.poll() is result
    assert result.ok


async def test_concurrent_close_returns_one_result(tmp_path: Path) -> None:
    """Three concurrent close() calls and a later one all get the same Result object."""
    async with ready_group(SLEEPER, tmp_path, nprocs=3, grace=5) as (group, _):
        results = await asyncio.gather(group.close(), group.close(), group.close())
        again = await group.close()
        waited = await group.wait()
    assert results[0] is results[1] is results[2] is again is waited
    assert results[0].terminated == {0, 1, 2}
    assert results[0].failures == {}
    assert not results[0].ok


async def test_escalation_to_sigkill(tmp_path: Path) -> None:
    """Ranks ignoring SIGTERM are SIGKILLed after grace; they are terminated, not failed."""
    async with ready_group(IGNORE_TERM, tmp_path, nprocs=2, grace=0.2) as (group, _):
        result = await group.close()
    assert result.exit_codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL}
    assert result.terminated == {0, 1}
    assert result.failures == {}


async def test_leaving_the_block_by_exception_closes_first(tmp_path: Path) -> None:
    """An exception in the async-with body closes the group, then propagates."""
    console, out, _ = watched_console()
    group = spawn_on(
        python(SLEEPER), nprocs=2, tee="out", grace=5, log_dir=tmp_path, console=console
    )
    with pytest.raises(RuntimeError, match="boom"):
        async with asyncio.timeout(10), group:
            await out.wait_for(b"ready", 2)
            raise RuntimeError("boom")
    result = group.poll()
    assert result is not None
    assert result.terminated == {0, 1}
    assert all(not psutil.pid_exists(pid) for pid in group.pids.values())


async def test_double_cancel_still_cleans_up(tmp_path: Path) -> None:
    """A task cancelled twice with raw Task.cancel() while its group closes (ranks ignore
    SIGTERM) still finishes the clean-up before CancelledError propagates."""
    console, out, _ = watched_console()
    group = spawn_on(
        python(IGNORE_TERM),
        nprocs=2,
        tee="out",
        grace=1.0,
        log_dir=tmp_path / "logs",
        console=console,
    )

    entered = asyncio.Event()

    async def body() -> None:
        async with group:
            entered.set()
            await asyncio.sleep(600)  # until cancelled

    async with asyncio.timeout(15):
        task = asyncio.create_task(body())
        # Inside the block (a cancel during the start rolls back with no grace)
        # and both ranks ready to handle SIGTERM:
        await entered.wait()
        await out.wait_for(b"ready", 2)
        task.cancel()
        await out.wait_for(b"term", 2)  # the close is in its grace period now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    result = group.poll()
    assert result is not None
    assert result.exit_codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL}
    assert result.terminated == {0, 1}


async def test_cancelled_close_skips_the_grace_but_finishes(tmp_path: Path) -> None:
    """Cancelling close() during its grace period SIGKILLs at once and finishes cleaning."""
    async with ready_group(IGNORE_TERM, tmp_path, nprocs=1, grace=300) as (group, out):
        closing = asyncio.create_task(group.close())
        await out.wait_for(b"term")  # close() sent SIGTERM: it is in its grace period
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        result = group.poll()
    assert result is not None
    assert result.exit_codes == {0: -signal.SIGKILL}


async def test_close_with_shorter_grace_shortens_a_running_close(tmp_path: Path) -> None:
    """A second close(grace=0) hurries a close that is waiting out a long grace."""
    async with ready_group(IGNORE_TERM, tmp_path, nprocs=1, grace=300) as (group, out):
        slow = asyncio.create_task(group.close())
        await out.wait_for(b"term")  # the slow close is in its grace period
        fast = await group.close(grace=0)
        assert await slow is fast
    assert fast.exit_codes == {0: -signal.SIGKILL}


async def test_grandchild_holding_the_pipe_does_not_block_wait(tmp_path: Path) -> None:
    """A rank exits 0 while its grandchild keeps the teed pipe open: wait() returns, the
    grandchild is ended, and the rank's output is complete."""
    code = textwrap.dedent(
        f"""
        import subprocess, sys
        subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(600)"])
        print("rank done", flush=True)
        """
    )
    console, out, _ = watched_console()
    async with asyncio.timeout(10):
        result = await run_on(
            python(code), nprocs=1, tee="out", grace=5, log_dir=tmp_path, console=console
        )
    assert result.ok
    assert out.getvalue() == b"[0]: rank done\n"


@pytest.mark.parametrize("kind", ["teed", "redirected", "callable"])
async def test_no_fd_beyond_stdio_leaks_into_ranks(kind: str, tmp_path: Path) -> None:
    """Even an inheritable descriptor of the supervisor does not reach a rank, whether its
    streams are teed through pipes, redirected to files, or it runs a Python callable."""
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    logs = tmp_path / "logs"
    try:
        if kind == "callable":
            result = await corral.run(fns.open_fds, nprocs=2, log_dir=logs)
        else:
            result = await run_on(
                python(code),
                nprocs=2,
                redirects="out",
                tee="out" if kind == "teed" else Std.NONE,
                log_dir=logs,
                console=watched_console()[0],
            )
    finally:
        os.close(r)
        os.close(w)
    assert result.ok, result.describe()
    for rank in (0, 1):
        if kind == "callable":
            fds = result.return_values[rank]
        else:
            fds = eval((logs / str(rank) / "stdout.log").read_text())
        # 0, 1, 2 and the descriptor listdir itself opened to read /proc/self/fd.
        assert isinstance(fds, list)
        assert len(fds) == 4, fds
        assert fds[:3] == [0, 1, 2]


async def test_send_signal(tmp_path: Path) -> None:
    """send_signal reaches the chosen ranks' process groups only; bad ranks are refused."""
    code = textwrap.dedent(
        """
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # sigwait: no lost signal
        print('ready', flush=True)
        signal.sigwait({signal.SIGUSR1})
        print('usr1', flush=True)
        """
    )
    console, out, _ = watched_console()
    async with (
        asyncio.timeout(10),
        spawn_on(python(code), nprocs=2, tee="out", log_dir=tmp_path, console=console) as group,
    ):
        await out.wait_for(b"ready", 2)
        with pytest.raises(corral.ConfigError, match="no such rank"):
            group.send_signal(signal.SIGUSR1, ranks=[5])
        group.send_signal(signal.SIGUSR1, ranks=[1])
        await out.wait_for(b"[1]: usr1")
        # Rank 1 is still exiting after its print: let it finish before closing,
        # or close's SIGTERM may kill it during interpreter shutdown.
        # (WNOWAIT: corral still reaps it.)
        await asyncio.to_thread(os.waitid, os.P_PID, group.pids[1], os.WEXITED | os.WNOWAIT)
        result = await group.close()
    assert b"[0]: usr1" not in out.getvalue()
    assert result.exit_codes[1] == 0
    assert result.failures == {}
    assert result.terminated == {0}


async def test_threads_do_not_grow_with_ranks(tmp_path: Path) -> None:
    """Waiting on 64 ranks costs no thread per rank (pidfd exit watching)."""
    if not corral._platform.HAS_PIDFD:
        pytest.skip("needs pidfd")
    me = psutil.Process()
    before = me.num_threads()
    console, out, _ = watched_console()
    async with (
        asyncio.timeout(20),
        spawn_on(
            python(SLEEPER), nprocs=64, tee="out", grace=5, log_dir=tmp_path, console=console
        ) as group,
    ):
        await out.wait_for(b"ready", 64)
        during = me.num_threads()
        await group.close()
    assert during == before


async def test_methods_need_a_started_group(tmp_path: Path) -> None:
    """Using a group before 'async with' is a clear error, not a hang."""
    group = corral.spawn(python("pass"), nprocs=1, log_dir=tmp_path)
    with pytest.raises(CorralError, match="has not started"):
        await group.wait()
    with pytest.raises(CorralError, match="never started"):
        await group.close()
    assert group.poll() is None


async def test_wait_cancelled_while_running_leaves_the_group_running(tmp_path: Path) -> None:
    """Cancelling wait() before any exit only stops waiting; the block's exit closes."""
    console, out, _ = watched_console()
    async with (
        asyncio.timeout(10),
        spawn_on(
            python(SLEEPER),
            nprocs=1,
            tee="out",
            grace=5,
            redirects=Std.ERR,
            log_dir=tmp_path,
            console=console,
        ) as group,
    ):
        await out.wait_for(b"ready")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await group.wait()
        assert group.poll() is None
    assert group.poll() is not None
