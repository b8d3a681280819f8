"""Containment (SPEC guarantee 2): whatever ends a group, nothing it started survives.

The matrix crosses every way a group can end with every shape a rank can
take. After each run, a check that does not rely on parent links (the pids
the ranks reported, their start times, the group's ``CORRAL_GROUP`` token and
the ranks' session ids, all read from ``/proc``) finds no process of the
group: neither alive nor a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import corral
from corral import _platform, _reap, _watchdog

from .children.contain_rank import run_shape
from .conftest import python

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.skipif(
    not (_platform.HAS_PROC and _platform.HAS_PIDFD), reason="needs Linux /proc and pidfds"
)

CHILDREN = Path(__file__).parent / "children"
RANK = str(CHILDREN / "contain_rank.py")
SUPERVISOR = str(CHILDREN / "contain_supervisor.py")
GRACE = 0.3
NPROCS = 2
SHAPES = ("plain", "child", "setsid", "children50", "ignore_term", "full_pipe", "fork_on_term")
#: Ranks that ignore SIGTERM end only by SIGKILL after the grace period.
SLOW_SHAPES = frozenset({"ignore_term"})


# -- helpers shared with test_faults -----------------------------------------------------


@dataclass
class Report:
    """What the ranks of one group reported in their handshakes."""

    token: str = ""
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> pid
    pids: dict[int, int] = field(default_factory=dict)  # every reported pid -> its starttime


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
                st = _watchdog.read_stat(pid)
                assert st is not None, f"reported pid {pid} is already gone"
                report.pids[pid] = st.starttime
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


def survivors(report: Report, since: int) -> list[str]:
    """Every process of the group still in /proc (alive or zombie), found without parent links."""
    found = []
    for pid, start in report.pids.items():
        st = _watchdog.read_stat(pid)
        if st is not None and st.starttime == start:
            found.append(f"reported pid {pid} ({'zombie' if st.zombie else 'alive'})")
    table = _watchdog.proc_table(skip=(os.getpid(),))
    sessions = set(report.ranks.values())
    for pid, st in table.items():
        if st.starttime < since or pid in report.pids:
            continue
        if st.sid in sessions:
            found.append(f"pid {pid} in a rank's session ({'zombie' if st.zombie else 'alive'})")
        elif _watchdog.has_token(pid, report.token.encode()):
            found.append(f"pid {pid} carries the group's token")
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
    me = os.getpid()
    return {pid for pid, st in _watchdog.proc_table(skip=(me,)).items() if st.ppid == me}


async def reap_new_children(before: set[int]) -> list[int]:
    """Wait for and reap every child of ours not in ``before`` (orphans re-parented to us)."""
    reaped: list[int] = []
    async with asyncio.timeout(10):
        while new := own_children() - before:
            for pid in new:
                await wait_exit(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (it has exited)
                reaped.append(pid)
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


ROOT = Path(__file__).parent.parent
KINDS = ("command", "callable")


def spawn_shape(kind: str, shape: str, fifo: Path, **kwargs: Any) -> corral.Group:
    """A group whose ranks take ``shape``: the rank script, or its function as a callable rank."""
    if kind == "callable":
        return corral.spawn(run_shape, args=[shape, str(fifo)], cwd=ROOT, **kwargs)
    return corral.spawn(rank_argv(shape, fifo), **kwargs)


def _early_exit(group: corral.Group) -> str | None:
    """Why a rank cannot hand-shake any more (it exited), if so."""
    exited = {r.plan.rank: r.returncode for r in group._ranks if r.returncode is not None}
    return f"ranks exited early: {exited}" if exited else None


# -- the matrix ------------------------------------------------------------------------------

IN_PROCESS = ("succeed", "first_failure", "close", "cancel_wait", "exception")
SUPERVISOR_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}


async def _end_in_process(kind: str, ending: str, shape: str, tmp_path: Path) -> None:
    since = _watchdog.boot_ticks()
    with handshakes(tmp_path) as hs:
        group = spawn_shape(
            kind, shape, hs.path, nprocs=NPROCS, grace=GRACE, log_dir=tmp_path / "logs"
        )
        report = Report()
        watchdog_pid = None
        waiting = asyncio.Event()

        async def body() -> corral.Result | None:
            nonlocal report, watchdog_pid
            async with group:
                report = await hs.report(NPROCS, lambda: _early_exit(group))
                assert group._watchdog is not None
                watchdog_pid = group._watchdog.pid
                if ending == "succeed":
                    for pid in report.ranks.values():
                        os.kill(pid, signal.SIGUSR2)
                    return await group.wait()
                if ending == "first_failure":
                    os.kill(report.ranks[0], signal.SIGUSR1)
                    return await group.wait()
                if ending == "close":
                    return await group.close()
                if ending == "exception":
                    raise RuntimeError("boom")
                assert ending == "cancel_wait"
                waiting.set()
                await group.wait()  # cancelled from outside
            return None

        task = asyncio.ensure_future(body())
        async with asyncio.timeout(30):
            if ending == "cancel_wait":
                await waiting.wait()  # the task is now inside group.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            elif ending == "exception":
                with pytest.raises(RuntimeError, match="boom"):
                    await task
            else:
                result = await task
                assert result is not None
                if ending == "succeed":
                    assert result.ok, result.describe()
                elif ending == "first_failure":
                    assert set(result.failures) == {0}
                    assert result.terminated == frozenset(range(1, NPROCS))
                else:
                    assert result.terminated == frozenset(range(NPROCS))
                if shape == "fork_on_term" and ending != "succeed":
                    # Each rank started its daemon on SIGTERM, then exited 0.
                    assert {result.exit_codes[r] for r in result.terminated} == {0}
    assert survivors(report, since) == []
    assert watchdog_pid is not None
    assert _watchdog.read_stat(watchdog_pid) is None, "the watchdog outlived its group"


async def _end_by_signal(kind: str, ending: str, shape: str, tmp_path: Path) -> None:
    sig = SUPERVISOR_SIGNALS[ending]
    since = _watchdog.boot_ticks()
    with handshakes(tmp_path) as hs, subreaper():
        before = own_children()
        errors = open(tmp_path / "supervisor.err", "w+b")  # noqa: SIM115
        sup = subprocess.Popen(
            [sys.executable, SUPERVISOR, kind, shape, str(hs.path), str(NPROCS), str(GRACE)],
            cwd=tmp_path,
            stderr=errors,
        )

        def supervisor_died() -> str | None:
            if sup.poll() is None:
                return None
            errors.seek(0)
            return f"the supervisor exited with {sup.returncode}: {errors.read().decode()}"

        try:
            report = await hs.report(NPROCS, supervisor_died)
            os.kill(sup.pid, sig)
            async with asyncio.timeout(30):
                await wait_exit(sup.pid)
            code = sup.wait()
            if sig == signal.SIGKILL:
                assert code == -signal.SIGKILL
                # No help from the dead supervisor: the watchdog ends the group.
                t0 = time.monotonic()
                async with asyncio.timeout(2):  # SPEC: "within about a second"
                    for pid in report.pids:
                        await wait_exit(pid)
                print(f"{shape}: group dead {time.monotonic() - t0:.3f}s after SIGKILL")
                # Its zombies were re-parented to us (the subreaper, as init): reap them.
                await reap_new_children(before)
            else:
                assert code == 128 + sig
                assert own_children() - before == set(), "the supervisor left children"
        finally:
            if sup.returncode is None:
                sup.kill()
                sup.wait()
            errors.close()
    assert survivors(report, since) == []


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ending", IN_PROCESS + tuple(SUPERVISOR_SIGNALS))
@pytest.mark.parametrize("kind", KINDS)
async def test_nothing_survives(kind: str, ending: str, shape: str, tmp_path: Path) -> None:
    """After any ending of a group, no process it started is alive or a zombie.

    Endings: every rank succeeds, a first failure, close(), cancelling the
    task waiting inside ``async with``, an exception in the block, and
    SIGTERM/SIGINT/SIGKILL to a supervising process. Shapes: a plain rank, one
    with a child, with a setsid() grandchild whose parent exited, with 50
    children, ignoring SIGTERM (with a child), blocked writing a full pipe,
    starting a setsid() daemon when SIGTERM comes (born after close's first
    look at ``/proc``). Each for a command rank and for a Python callable rank.
    """
    if ending in SUPERVISOR_SIGNALS:
        await _end_by_signal(kind, ending, shape, tmp_path)
    else:
        await _end_in_process(kind, ending, shape, tmp_path)


# -- what corral must leave alone ----------------------------------------------------------


async def test_leaves_host_processes_alone(tmp_path: Path) -> None:
    """corral neither signals nor reaps the host's own children, even in new sessions.

    The host (this test) runs a child of its own in a new session and one
    that has already exited (a zombie the host has not waited for yet) while
    a group with orphaned descendants is closed: both are untouched, and the
    host still collects its exit status itself.
    """
    mine = subprocess.Popen(["/bin/sleep", "1000"], start_new_session=True)
    done = subprocess.Popen(["/bin/sh", "-c", "exit 7"], start_new_session=True)
    await wait_exit(done.pid)
    try:
        with handshakes(tmp_path) as hs:
            async with corral.spawn(rank_argv("setsid", hs.path), nprocs=2, grace=GRACE) as g:
                await hs.report(2)
                await g.close()
        assert _watchdog.read_stat(mine.pid) is not None
        assert not _watchdog.read_stat(mine.pid).zombie  # type: ignore[union-attr]
        assert done.wait(timeout=5) == 7  # its status was not stolen
    finally:
        mine.kill()
        mine.wait()


async def test_subreaper_only_while_a_group_lives(tmp_path: Path) -> None:
    """The process is a subreaper only while a group lives (the host's orphans go to init)."""
    assert not _platform._prctl_get_subreaper()
    async with corral.spawn(python("pass"), nprocs=1) as g:
        assert _platform._prctl_get_subreaper()
        await g.wait()
    assert not _platform._prctl_get_subreaper()


async def test_no_signal_handler_installed() -> None:
    """The library installs no signal handler: the application owns signals."""
    sigs = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
    before = {s: signal.getsignal(s) for s in sigs}
    result = await corral.run(python("print('hi')"), nprocs=2, tee="all")
    assert result.ok
    assert {s: signal.getsignal(s) for s in sigs} == before


def test_loop_in_a_non_main_thread(tmp_path: Path) -> None:
    """A group runs, fails fast, and closes completely with its loop in a non-main thread."""
    outcome: list[object] = []

    async def main() -> None:
        since = _watchdog.boot_ticks()
        with handshakes(tmp_path) as hs:
            async with corral.spawn(rank_argv("child", hs.path), nprocs=2, grace=GRACE) as g:
                report = await hs.report(2)
                os.kill(report.ranks[1], signal.SIGUSR1)
                result = await g.wait()
        outcome.extend([result, survivors(report, since)])

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    result, left = outcome
    assert isinstance(result, corral.Result)
    assert set(result.failures) == {1}
    assert left == []


async def test_watchdog_starts_at_low_priority_through_nice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog is started through the system's nice(1): its interpreter starts at +10."""
    prefix = _reap._nice_prefix()
    if not prefix:
        pytest.skip("no nice(1) on this machine (the fallback is tested below)")
    assert prefix[0] in _reap._NICE_PATHS
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(list(args))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    async with corral.spawn(python("pass"), nprocs=1) as group:
        await group.wait()
    monkeypatch.undo()
    watchdog_argv = next(a for a in started if _reap._WATCHDOG_MAIN in a)
    assert watchdog_argv[: len(prefix)] == prefix
    # And that prefix does what it says, on this machine:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run(
        [*prefix, sys.executable, "-I", "-S", "-c", "import os; print(os.getpriority(0, 0))"],
        capture_output=True,
        check=True,
    )
    assert int(out.stdout) == min(19, mine + 10)


async def test_watchdog_is_lowered_without_nice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nice(1), the watchdog is lowered to niceness +10 right after it starts."""
    monkeypatch.setattr(_reap, "_NICE", [])
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    async with corral.spawn(python("pass"), nprocs=1) as group:
        assert group._watchdog is not None
        assert os.getpriority(os.PRIO_PROCESS, group._watchdog.pid) == min(19, mine + 10)
        await group.wait()


async def test_watchdog_starts_without_a_broken_nice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nice(1) that cannot run does not cost the group its watchdog."""
    broken = tmp_path / "nice"
    broken.write_text("not a program")  # and not executable
    monkeypatch.setattr(_reap, "_NICE", [str(broken), "-n", "10"])
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    async with corral.spawn(python("pass"), nprocs=1) as group:
        assert group._watchdog is not None
        assert _reap._NICE == []
        assert os.getpriority(os.PRIO_PROCESS, group._watchdog.pid) == min(19, mine + 10)
        await group.wait()


async def test_a_close_that_fails_leaves_the_sweep_to_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If close itself fails (here: /proc cannot be read once), the watchdog ends the group
    and the zombies are reaped all the same."""
    since = _watchdog.boot_ticks()
    with handshakes(tmp_path) as hs:
        group = spawn_shape("command", "child", hs.path, nprocs=2, grace=GRACE)
        async with asyncio.timeout(20):
            await group.__aenter__()
            report = await hs.report(2, lambda: _early_exit(group))
            assert group._watchdog is not None
            watchdog = group._watchdog.pid

            def unreadable_once() -> dict[int, _watchdog.Stat]:
                monkeypatch.undo()
                raise OSError(errno.EMFILE, "Too many open files")

            monkeypatch.setattr(group, "_table", unreadable_once)
            with pytest.raises(OSError, match="Too many open files"):
                await group.close()
    assert _watchdog.read_stat(watchdog) is None, "the watchdog was not reaped"
    assert survivors(report, since) == []


async def test_the_zombie_sweep_leaves_the_ranks_to_their_group() -> None:
    """A rank's zombie is the group's to reap (by waitpid, once): the sweep skips it."""
    rank = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        await wait_exit(rank.pid)
        table = _reap.snapshot()
        assert table[rank.pid].zombie
        assert _reap.reap_zombie_children({}, [rank.pid], 0, table) == 0
        still = os.waitid(os.P_PID, rank.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # noqa: ASYNC222 (exited)
        assert still is not None, "the sweep reaped a rank"
    finally:
        rank.wait()


def test_a_proc_of_another_pid_namespace_is_never_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its pids are other processes': no scan (not even psutil's, which reads it), a warning."""

    def psutil_scan(*_: object) -> list[_reap.Member]:
        raise AssertionError("psutil would read the foreign /proc")

    monkeypatch.setattr(_platform, "HAS_PROC", False)
    monkeypatch.setattr(_platform, "FOREIGN_PROC", True)
    monkeypatch.setattr(_reap, "_FOREIGN_WARNED", False)
    monkeypatch.setattr(_reap, "_scan_psutil", psutil_scan)
    assert _reap.scan("token", [os.getpid()], 0, ()) == []
    assert "another pid namespace" in caplog.text
    assert _reap.Watchdog.start("token", 0) is None


#: A supervisor of 8 ranks whose first rank SIGKILLs it as soon as it runs.
KILLED_WHILE_STARTING = (
    "import asyncio, sys, corral; "
    "asyncio.run(corral.run(sys.argv[2:], nprocs=8, log_dir=sys.argv[1]))"
)
SUPERVISOR_KILLER = ["/bin/sh", "-c", '[ "$RANK" = 0 ] && kill -9 "$PPID"; exec /bin/sleep 1000']


async def test_supervisor_killed_while_starting_ranks_leaves_nothing(tmp_path: Path) -> None:
    """Regression (stress runs): a supervisor killed while it is still starting its ranks
    (here by its first rank, at once) has a watchdog already, which ends what did start."""
    with subreaper():
        before = own_children()
        sup = subprocess.Popen(
            [sys.executable, "-c", KILLED_WHILE_STARTING, str(tmp_path), *SUPERVISOR_KILLER]
        )
        async with asyncio.timeout(30):
            await wait_exit(sup.pid)
        assert sup.wait() == -signal.SIGKILL
        # Its ranks and watchdog were re-parented to us: each must end on its own.
        t0 = time.monotonic()
        async with asyncio.timeout(2):  # SPEC: "within about a second"
            orphans = await reap_new_children(before)
        print(f"{len(orphans)} orphans ended {time.monotonic() - t0:.3f}s after the SIGKILL")
    assert orphans, "the supervisor was killed before it started anything"


#: A supervisor of one rank; argv: LOG_DIR COMMAND...
ONE_RANK_SUPERVISOR = (
    "import asyncio, sys, corral; "
    "asyncio.run(corral.run(sys.argv[2:], nprocs=1, log_dir=sys.argv[1]))"
)


async def test_watchdog_knows_the_first_rank_without_its_token(tmp_path: Path) -> None:
    """The watchdog is told every rank's pid through its gate (the line that opens the
    gate must not swallow the first pid): a rank that dropped its environment, token
    included, is still ended through its session after the supervisor is SIGKILLed."""
    fifo = tmp_path / "ready.fifo"
    os.mkfifo(fifo)
    rank = ["/usr/bin/env", "-i", "/bin/sh", "-c", f"echo $$ > {fifo}; exec /bin/sleep 1000"]
    with subreaper():
        before = own_children()
        sup = subprocess.Popen([sys.executable, "-c", ONE_RANK_SUPERVISOR, str(tmp_path), *rank])
        try:
            rank_pid = int(await asyncio.wait_for(asyncio.to_thread(fifo.read_text), 30))
            os.kill(sup.pid, signal.SIGKILL)
            assert sup.wait(timeout=30) == -signal.SIGKILL
            async with asyncio.timeout(2):  # SPEC: "within about a second"
                await wait_exit(rank_pid)
                await reap_new_children(before)
        finally:
            if sup.returncode is None:
                sup.kill()
                sup.wait()


@pytest.mark.skipif(not _reap._GATE, reason="no /bin/sh: the watchdog starts ungated")
async def test_watchdog_interpreter_waits_until_the_ranks_are_started() -> None:
    """The watchdog is spawned before the first rank, but its interpreter's start-up
    (CPU the ranks need) waits at the gate until it is told the ranks."""
    watchdog = _reap.Watchdog.start("gate-token", _watchdog.boot_ticks())
    assert watchdog is not None
    try:
        argv = list(watchdog._popen.args)  # type: ignore[arg-type]
        gate = argv.index("/bin/sh")
        assert argv[gate + 1 : gate + 3] == ["-c", 'read -r _; exec "$0" "$@"']
        assert argv[gate + 3] == sys.executable
    finally:
        await watchdog.stop_soon()


async def test_watchdog_kills_the_group_of_an_abandoned_pipe(tmp_path: Path) -> None:
    """The watchdog ends the group when its pipe closes (what ``Group.__del__`` relies on).

    (With the ``child`` shape: a setsid() daemon killed before any scan saw it
    alive would stay a zombie, a documented limit.)
    """
    since = _watchdog.boot_ticks()
    with handshakes(tmp_path) as hs:
        async with corral.spawn(rank_argv("child", hs.path), nprocs=2, grace=GRACE) as g:
            report = await hs.report(2)
            wd = g._watchdog
            assert wd is not None
            wd._close_pipe()  # as if the supervisor had died
            for pid in report.pids:
                await wait_exit(pid)
            result = await g.close()
    assert result.exit_codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL}
    assert survivors(report, since) == []


async def test_unwaited_new_session_child_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (SPEC review): in a process corral owns (the CLI sets
    ``REAP_ORPHAN_LEADERS``), a rank's ``Popen(start_new_session=True)`` child that it
    never waits for, and that dies before any close-time scan sees it alive, is
    re-parented to the supervisor (the subreaper) and reaped at close: no zombie."""
    monkeypatch.setattr(_reap, "REAP_ORPHAN_LEADERS", True)
    code = (
        "import subprocess, sys;"
        "p = subprocess.Popen([sys.executable, '-c', 'pass'], start_new_session=True);"
        "import os; os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT); print(p.pid)"
    )
    async with asyncio.timeout(20):
        result = await corral.run(
            python(code), nprocs=2, redirects="out", log_dir=tmp_path, grace=GRACE
        )
    assert result.ok
    for rank in (0, 1):
        pid = int((tmp_path / str(rank) / "stdout.log").read_text())
        assert _watchdog.read_stat(pid) is None, f"pid {pid} left as a zombie"


async def test_host_child_started_during_a_group_keeps_its_exit_status(tmp_path: Path) -> None:
    """Regression (review): a child the host starts in a new session while a group runs,
    and that exits before the group closes, is not reaped by corral: the host's own
    wait() still gets its exit status (corral is embedded in services)."""
    with handshakes(tmp_path) as hs:
        async with corral.spawn(rank_argv("plain", hs.path), nprocs=1, grace=GRACE) as g:
            await hs.report(1)
            mine = subprocess.Popen(["/bin/sh", "-c", "exit 3"], start_new_session=True)
            await wait_exit(mine.pid)
            await g.close()
    assert mine.wait(timeout=5) == 3
