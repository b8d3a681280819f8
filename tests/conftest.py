"""Shared fixtures: every test must leave no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from typing import TYPE_CHECKING, Unpack

import psutil
import pytest

from corral._group import _run, _spawn
from corral._tee import Console

from .helpers import MECHANISMS, use_mechanism

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _typeshed import ReadableBuffer

    import corral
    from corral._config import Entrypoint, SpawnOptions


def python(code: str) -> list[str]:
    """argv running ``code`` in a fresh, unbuffered interpreter (never a PATH shim)."""
    return [sys.executable, "-u", "-c", code]


#: Every process this test session starts inherits this marker, so the leftover
#: check below never touches processes of another test run on the same machine.
SESSION_KEY = "CORRAL_TEST_SESSION"
SESSION = f"{os.getpid()}-{os.urandom(4).hex()}"
os.environ[SESSION_KEY] = SESSION
_SESSION_NEEDLE = f"{SESSION_KEY}={SESSION}\0".encode()


def _marked_pids() -> set[int]:
    """This session's processes carrying a corral group marker, found without parent links."""
    found: set[int] = set()
    if not os.path.isdir("/proc/self"):
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
                if b"CORRAL_GROUP=" in environ and _SESSION_NEEDLE in environ:
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def _parent_is(proc: psutil.Process, pid: int) -> bool:
    try:
        return proc.ppid() == pid
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.status()} {proc.cmdline()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a descendant or a marked process (alive or zombie)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    marked_before = _marked_pids()
    yield
    left: dict[int, psutil.Process] = {}
    for p in me.children(recursive=True):
        if p.pid not in before:
            left[p.pid] = p
    for pid in _marked_pids() - marked_before:
        try:
            left.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    if not left:
        return
    report = [_describe(p) for p in left.values()]
    for p in left.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    # Reap ours in any order (a namespace's init is reaped only after the
    # namespace's other processes, which may be our children too).
    ours = {p.pid for p in left.values() if _parent_is(p, me.pid)}
    for _ in range(100 * len(ours)):
        if not ours:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # until one of them can be reaped
        for pid in list(ours):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    ours.discard(pid)
            if not psutil.pid_exists(pid):
                ours.discard(pid)
    pytest.fail("test left processes behind:\n  " + "\n  ".join(report))


class WatchedIO(io.BytesIO):
    """A console stream that lets a test await a handshake line the tee wrote."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def write(self, data: ReadableBuffer, /) -> int:
        n = super().write(data)
        self._changed.set()
        return n

    async def wait_for(self, pattern: bytes, count: int = 1) -> None:
        """Return once ``pattern`` has been written ``count`` times (bound it with a timeout)."""
        while self.getvalue().count(pattern) < count:
            self._changed.clear()
            await self._changed.wait()


def watched_console() -> tuple[Console, WatchedIO, WatchedIO]:
    """A colourless console over two WatchedIO streams (stdout, stderr)."""
    out, err = WatchedIO(), WatchedIO()
    return Console.create(stdout=out, stderr=err, color=False), out, err


@pytest.fixture(params=MECHANISMS)
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per containment mechanism."""
    name: str = request.param
    use_mechanism(name, monkeypatch)
    return name


@pytest.fixture
def walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the /proc walk (the watchdog's tests)."""
    use_mechanism("walk", monkeypatch)


def spawn_on(
    entrypoint: Entrypoint, *, console: Console, **options: Unpack[SpawnOptions]
) -> corral.Group:
    """``corral.spawn`` teeing to ``console`` (the library's private way, as the CLI's)."""
    return _spawn(entrypoint, console, options)


async def run_on(
    entrypoint: Entrypoint, *, console: Console, **options: Unpack[SpawnOptions]
) -> corral.Result:
    """``corral.run`` teeing to ``console``."""
    return await _run(entrypoint, console, options)
