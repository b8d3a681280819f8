"""Consoles that misbehave (issue 9, faults 3 and 5): none costs the run time or the loop.

A console whose reader is gone must not make a run wait for it; a console
that is a stream socket nobody reads (systemd's journal is one) must never
block the event loop: signals, closes and timers keep working.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from corral._tee import Console

from .conftest import python, run_on, spawn_on
from .helpers import wait_exit

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux consoles")

#: What the supervisor says when it gave up waiting for a console.
STALLED = "is not being read"


def _corral(*argv: str, stdout: int, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "corral", "run", *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )


async def test_cli_into_a_pipe_whose_reader_is_gone(tmp_path: Path) -> None:
    """Regression (issue 9, fault 3): ``corral run -- echo hi | true``: the broken pipe
    disables the tee at once; the run does not wait for the console (it used to give up
    after 2 s and report "0 byte(s) of teed output not shown")."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    try:
        proc = _corral("--", "/bin/echo", "hi", stdout=w, cwd=tmp_path)
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(asyncio.to_thread(proc.communicate), 30)
    assert proc.returncode == 0, err
    text = err.decode()
    assert "tee to stdout disabled" in text
    assert STALLED not in text
    assert "not shown" not in text


async def test_library_console_whose_reader_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through the library: the close does not wait for a broken console."""
    r, w = os.pipe()
    os.close(r)
    out = os.fdopen(w, "wb")
    console = Console.create(stdout=out, stderr=out, color=False)
    try:
        with caplog.at_level(logging.WARNING, logger="corral"):
            async with asyncio.timeout(30):
                result = await run_on(
                    python("print('hi' * 1000)"),
                    nprocs=2,
                    tee="out",
                    log_dir=tmp_path,
                    console=console,
                )
    finally:
        console.close()
        out.close()
    assert result.ok, result.describe()
    assert STALLED not in caplog.text
    assert (tmp_path / "0" / "stdout.log").read_text() == "hi" * 1000 + "\n"


#: A rank that floods its stdout (10 MiB) and says on stderr when it starts.
FLOOD = (
    "import os, sys\n"
    "os.write(2, b'flooding\\n')\n"
    "chunk = b'x' * 1023 + b'\\n'\n"
    "for _ in range(10 * 1024):\n"
    "    os.write(1, chunk)\n"
)


async def test_cli_on_a_stream_socket_nobody_reads_still_obeys_sigterm(tmp_path: Path) -> None:
    """Regression (issue 9, fault 5): stdout is a stream socket nobody reads and the
    ranks write 10 MiB: the supervisor's loop is never blocked in a write, so SIGTERM
    still closes the group and ends corral with 128+15 (it used to ignore every signal
    but SIGKILL)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            proc = _corral(
                "-n",
                "2",
                "--grace",
                "0.5",
                "--",
                *python(FLOOD),
                stdout=theirs.fileno(),
                cwd=tmp_path,
            )
        finally:
            theirs.close()
        try:
            # The console is in use (and then left unread): the socket's buffer fills.
            first = await asyncio.wait_for(asyncio.to_thread(ours.recv, 4096), 30)
            assert first
            assert proc.stderr is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 30)
            while line.startswith(b"corral: "):  # its own notes (OMP_NUM_THREADS) come first
                line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 30)
            assert b"flooding" in line
            # Both ranks flood; wait until the supervisor has more than the socket holds.
            await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 30)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await wait_exit(proc.pid)
            assert proc.wait() == 128 + signal.SIGTERM
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


async def test_library_console_socket_never_blocks_the_loop(tmp_path: Path) -> None:
    """A console that is an unread stream socket: while ranks flood it, the loop keeps
    running timers, and ``close()`` ends the group (the backlog is dropped, the logs
    have every byte)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = theirs.makefile("wb")
    console = Console.create(stdout=out, stderr=out, color=False)
    try:
        async with asyncio.timeout(60):
            async with spawn_on(
                python(FLOOD), nprocs=2, tee="out", log_dir=tmp_path, console=console, grace=0.5
            ) as group:
                # The console is being written (then left unread).
                await asyncio.wait_for(asyncio.to_thread(ours.recv, 1), 30)
                # The loop is free: ten timer ticks pass while the ranks flood.
                for _ in range(10):
                    await asyncio.sleep(0.01)
                result = await group.close()
    finally:
        console.close()
        out.close()
        theirs.close()
        ours.close()
    assert set(result.exit_codes) == {0, 1}
