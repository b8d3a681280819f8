"""Helpers shared by the containment and fault tests (an oracle of their own: psutil and
``os.getsid``, never corral's ``/proc`` parser)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

import corral
from corral import _contain, _platform

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CHILDREN = Path(__file__).parent / "children"
RANK = str(CHILDREN / "contain_rank.py")

#: The containment mechanisms every matrix test runs under.
MECHANISMS = ("pidns", "walk")


def use_mechanism(mechanism: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every group of this test (and of supervisors it starts) use ``mechanism``."""
    if mechanism == "pidns" and not _platform.pid_namespaces():
        pytest.skip("no pid namespaces here (needs CAP_SYS_ADMIN)")
    monkeypatch.setenv(_contain.ENV, "1" if mechanism == "pidns" else "0")


def start_time(pid: int) -> float | None:
    """``pid``'s creation time per psutil (an oracle independent of corral's parser)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Report:
    """What the ranks of one group reported in their handshakes."""

    token: str = ""
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> pid
    pids: dict[int, float] = field(default_factory=dict)  # every reported pid -> its start


class Handshakes:
    """A FIFO the ranks write one line to when they are ready; read without polling."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "handshake.fifo"
        os.mkfifo(self.path)
        self._r = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO from reporting EOF between ranks.
        self._w = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._buf = b""

    async def lines(self, n: int) -> list[str]:
        """Wait for ``n`` lines (20 s at most)."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self._r, readable.set)
        try:
            async with asyncio.timeout(20):
                while self._buf.count(b"\n") < n:
                    readable.clear()
                    await readable.wait()
                    with contextlib.suppress(BlockingIOError):
                        self._buf += os.read(self._r, 65536)
        finally:
            loop.remove_reader(self._r)
        lines = self._buf.split(b"\n")
        self._buf = b"\n".join(lines[n:])
        return [line.decode() for line in lines[:n]]

    async def report(self, n: int, unless: Callable[[], str | None] | None = None) -> Report:
        """Wait for ``n`` rank handshakes (``RANK TOKEN PID [PID...]``) and pin their pids.

        ``unless`` is asked every 0.5 s whether waiting is pointless (e.g. the
        supervisor died): its message then fails the test at once.
        """
        report = Report()
        reading = asyncio.ensure_future(self.lines(n))
        try:
            while unless is not None:
                done, _ = await asyncio.wait([reading], timeout=0.5)
                if done:
                    break
                problem = unless()
                if problem:
                    pytest.fail(f"no handshake: {problem}")
            lines = await reading
        finally:
            reading.cancel()
        for line in lines:
            rank, token, *pids = line.split()
            report.token = token.split(":")[-1]
            report.ranks[int(rank)] = int(pids[0])
            for pid in map(int, pids):
                start = start_time(pid)
                assert start is not None, f"reported pid {pid} is already gone"
                report.pids[pid] = start
        return report

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@contextlib.contextmanager
def handshakes(folder: Path) -> Iterator[Handshakes]:
    hs = Handshakes(folder)
    try:
        yield hs
    finally:
        hs.close()


def survivors(report: Report, since: float) -> list[str]:
    """Every process of the group still there (alive or zombie), found without parent links.

    ``since``: ``time.time()`` before the group started.
    """
    found = []
    for pid, start in report.pids.items():
        if start_time(pid) == start:
            found.append(f"reported pid {pid} ({'zombie' if is_zombie(pid) else 'alive'})")
    sessions = set(report.ranks.values())
    token = f"{report.token}"
    for proc in psutil.process_iter(["pid", "create_time"]):
        pid = proc.info["pid"]
        if pid in report.pids or pid == os.getpid() or (proc.info["create_time"] or 0) < since - 1:
            continue
        try:
            sid = os.getsid(pid)
        except OSError:
            continue
        state = "zombie" if is_zombie(pid) else "alive"
        if sid in sessions:
            found.append(f"pid {pid} in a rank's session ({state})")
            continue
        try:
            group_env = proc.environ().get("CORRAL_GROUP", "")
        except psutil.Error:
            continue
        if token and token in group_env.split(":"):
            found.append(f"pid {pid} carries the group's token ({state})")
    return found


async def wait_exit(pid: int) -> None:
    """Wait (event-driven, 10 s at most) until ``pid`` exits; it is not reaped."""
    fd = _platform.pidfd_open(pid)
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(fd, done.set)
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def own_children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def helper_pid(group: corral.Group) -> int:
    """The process corral started beside the ranks: the namespace's init, or the watchdog."""
    contain = group._attempt._contain
    if isinstance(contain, _contain.NamespaceContainment):
        return contain._ns.pid
    assert isinstance(contain, _contain.WalkContainment)
    assert contain._watchdog is not None
    return contain._watchdog.pid


async def reap_new_children(before: set[int]) -> list[int]:
    """Reap, as each exits, every child of ours not in ``before`` (orphans re-parented to us).

    In any order: a namespace's init exits only once the namespace's other
    processes (also re-parented to us) are reaped.
    """
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    watched: dict[int, int] = {}
    reaped: list[int] = []
    try:
        async with asyncio.timeout(10):
            while new := own_children() - before:
                for pid in new:
                    if pid in watched:
                        continue
                    fd = _platform.pidfd_open(pid)
                    if fd is not None:
                        watched[pid] = fd
                        loop.add_reader(fd, changed.set)
                progressed = False
                for pid in new:
                    with contextlib.suppress(ChildProcessError):
                        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # noqa: ASYNC222 (no wait)
                            reaped.append(pid)
                            progressed = True
                if not progressed:
                    changed.clear()
                    await changed.wait()
    finally:
        for fd in watched.values():
            loop.remove_reader(fd)
            os.close(fd)
    return reaped


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make the test process the reaper of orphans (as init would be) for the duration."""
    _platform.acquire_subreaper()
    try:
        yield
    finally:
        _platform.release_subreaper()


def rank_argv(shape: str, fifo: Path) -> list[str]:
    return [sys.executable, RANK, shape, str(fifo)]


def fifos(folder: Path, *names: str) -> list[Path]:
    """Create FIFOs ``folder/name`` for handshakes with ranks; their paths, in order."""
    paths = [folder / name for name in names]
    for path in paths:
        os.mkfifo(path)
    return paths
