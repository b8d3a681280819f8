"""Containment (SPEC guarantee 2): whatever ends a group, nothing it started survives.

The matrix crosses every way a group can end with every shape a rank can
take, under both containment mechanisms (the group's own PID namespace where
the kernel allows it, the ``/proc`` walk elsewhere). After each run, a check
that does not rely on parent links, nor on corral's own ``/proc`` parser (the
pids the ranks reported and their start times, the group's ``CORRAL_GROUP``
token and the ranks' session ids, read through psutil and ``os.getsid``),
finds no process of the group: neither alive nor a zombie.
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
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from corral import _contain, _platform, _reap, _watchdog
from corral._group import _spawn

from .children.contain_rank import run_shape
from .conftest import python
from .helpers import (
    CHILDREN,
    Report,
    handshakes,
    helper_pid,
    is_zombie,
    own_children,
    rank_argv,
    reap_new_children,
    start_time,
    subreaper,
    survivors,
    use_mechanism,
    wait_exit,
)

pytestmark = pytest.mark.skipif(
    not (_platform.HAS_PROC and _platform.HAS_PIDFD), reason="needs Linux /proc and pidfds"
)

SUPERVISOR = str(CHILDREN / "contain_supervisor.py")
GRACE = 0.3


def grace_for(shape: str) -> float:
    """The grace period a shape's group gets: a rank that starts a daemon on SIGTERM and
    then exits 0 must be able to finish within it even on a loaded machine (the close
    ends as soon as the ranks are gone, so a long grace costs nothing there)."""
    return 10.0 if shape == "fork_on_term" else GRACE


NPROCS = 2
SHAPES = ("plain", "child", "setsid", "children50", "ignore_term", "full_pipe", "fork_on_term")
#: Ranks that ignore SIGTERM end only by SIGKILL after the grace period.
SLOW_SHAPES = frozenset({"ignore_term"})


ROOT = Path(__file__).parent.parent
KINDS = ("command", "callable")


def spawn_shape(kind: str, shape: str, fifo: Path, **kwargs: Any) -> corral.Group:
    """A group whose ranks take ``shape``: the rank script, or its function as a callable rank."""
    if kind == "callable":
        return corral.spawn(run_shape, args=[shape, str(fifo)], cwd=ROOT, **kwargs)
    return corral.spawn(rank_argv(shape, fifo), **kwargs)


def _early_exit(group: corral.Group) -> str | None:
    """Why a rank cannot hand-shake any more (it exited), if so."""
    exited = {r.plan.rank: r.returncode for r in group._attempt._ranks if r.returncode is not None}
    return f"ranks exited early: {exited}" if exited else None


# -- the matrix ------------------------------------------------------------------------------

IN_PROCESS = ("succeed", "first_failure", "close", "cancel_wait", "exception")
SUPERVISOR_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}


async def _end_in_process(kind: str, ending: str, shape: str, tmp_path: Path) -> None:
    since = time.time()
    with handshakes(tmp_path) as hs:
        group = spawn_shape(
            kind, shape, hs.path, nprocs=NPROCS, grace=grace_for(shape), log_dir=tmp_path / "logs"
        )
        report = Report()
        watchdog_pid = None
        waiting = asyncio.Event()

        async def body() -> corral.Result | None:
            nonlocal report, watchdog_pid
            async with group:
                report = await hs.report(NPROCS, lambda: _early_exit(group))
                watchdog_pid = helper_pid(group)
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
    assert start_time(watchdog_pid) is None, "corral's helper process outlived its group"


async def _end_by_signal(kind: str, ending: str, shape: str, tmp_path: Path) -> None:
    sig = SUPERVISOR_SIGNALS[ending]
    since = time.time()
    with handshakes(tmp_path) as hs, subreaper():
        before = own_children()
        errors = open(tmp_path / "supervisor.err", "w+b")  # noqa: SIM115
        sup = subprocess.Popen(
            [
                sys.executable,
                SUPERVISOR,
                kind,
                shape,
                str(hs.path),
                str(NPROCS),
                str(grace_for(shape)),
            ],
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
async def test_nothing_survives(
    kind: str, ending: str, shape: str, tmp_path: Path, mechanism: str
) -> None:
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


@pytest.mark.usefixtures("walk")
async def test_subreaper_only_while_a_group_lives(tmp_path: Path) -> None:
    """Walk: the process is a subreaper only while a group lives (the host's orphans go to init)."""
    assert not _platform._prctl_get_subreaper()
    async with corral.spawn(python("pass"), nprocs=1) as g:
        assert _platform._prctl_get_subreaper()
        await g.wait()
    assert not _platform._prctl_get_subreaper()


async def test_a_namespace_needs_no_subreaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a PID namespace the group's orphans go to its init: this process never becomes
    a subreaper, and the init is gone with the group."""
    use_mechanism("pidns", monkeypatch)
    async with corral.spawn(python("pass"), nprocs=1) as g:
        assert isinstance(g._attempt._contain, _contain.NamespaceContainment)
        init = g._attempt._contain._ns.pid
        assert not _platform._prctl_get_subreaper()
        await g.wait()
    assert start_time(init) is None


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
        since = time.time()
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


@pytest.mark.usefixtures("walk")
async def test_watchdog_runs_at_low_priority() -> None:
    """The watchdog is lowered to niceness +10 before its interpreter starts (at the gate)."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    async with corral.spawn(python("pass"), nprocs=1) as group:
        assert os.getpriority(os.PRIO_PROCESS, helper_pid(group)) == min(19, mine + 10)
        await group.wait()


async def test_a_close_that_fails_still_ends_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    """If close itself fails (here: /proc cannot be read once), the group is ended all the
    same (the namespace's init is killed; the walk's watchdog sweeps) and nothing is left."""
    since = time.time()
    with handshakes(tmp_path) as hs:
        group = spawn_shape("command", "child", hs.path, nprocs=2, grace=GRACE)
        async with asyncio.timeout(20):
            await group.__aenter__()
            report = await hs.report(2, lambda: _early_exit(group))
            helper = helper_pid(group)

            def unreadable_once(*_: object) -> dict[int, _watchdog.Stat]:
                monkeypatch.undo()
                use_mechanism(mechanism, monkeypatch)
                raise OSError(errno.EMFILE, "Too many open files")

            if mechanism == "walk":
                monkeypatch.setattr(_reap, "snapshot", unreadable_once)
            else:
                assert isinstance(group._attempt._contain, _contain.NamespaceContainment)
                monkeypatch.setattr(group._attempt._contain._ns, "members", unreadable_once)
            with pytest.raises(OSError, match="Too many open files"):
                await group.close()
    assert start_time(helper) is None, "corral's helper process was not reaped"
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


#: A supervisor of one rank; argv: LOG_DIR COMMAND...
ONE_RANK_SUPERVISOR = (
    "import asyncio, sys, corral; "
    "asyncio.run(corral.run(sys.argv[2:], nprocs=1, log_dir=sys.argv[1]))"
)


async def watchdog_told(supervisor: int, rank: int) -> None:
    """Wait until the supervisor's watchdog has passed its gate (it was told the ranks)."""
    while True:
        for child in psutil.Process(supervisor).children():
            with contextlib.suppress(psutil.Error):
                if child.pid != rank and child.cmdline()[:1] != ["/bin/sh"]:
                    return
        await asyncio.sleep(0.01)  # no event tells a test that another process exec'ed


@pytest.mark.usefixtures("walk")
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
            # Handshake: the watchdog's gate opens once it was told every rank (README,
            # "Known limits": a token-less rank killed before its pid is told is not found).
            async with asyncio.timeout(30):
                await watchdog_told(sup.pid, rank_pid)
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
@pytest.mark.usefixtures("walk")
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


@pytest.mark.usefixtures("walk")
async def test_watchdog_kills_the_group_of_an_abandoned_pipe(tmp_path: Path) -> None:
    """The watchdog ends the group when its pipe closes (what ``Group.__del__`` relies on).

    (With the ``child`` shape: a setsid() daemon killed before any scan saw it
    alive would stay a zombie, a documented limit.)
    """
    since = time.time()
    with handshakes(tmp_path) as hs:
        async with corral.spawn(rank_argv("child", hs.path), nprocs=2, grace=GRACE) as g:
            report = await hs.report(2)
            assert isinstance(g._attempt._contain, _contain.WalkContainment)
            wd = g._attempt._contain._watchdog
            assert wd is not None
            wd._close_pipe()  # as if the supervisor had died
            for pid in report.pids:
                await wait_exit(pid)
            result = await g.close()
    assert result.exit_codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL}
    assert survivors(report, since) == []


async def test_unwaited_new_session_child_is_reaped(tmp_path: Path, mechanism: str) -> None:
    """Regression (SPEC review): a rank's ``Popen(start_new_session=True)`` child that it
    never waits for, and that dies before any close-time scan sees it alive, leaves no
    zombie: the namespace's init reaps it; with the walk, in a process corral owns (the
    CLI's plan sets ``reap_orphan_leaders``), the supervisor (the subreaper) does."""
    code = (
        "import subprocess, sys;"
        "p = subprocess.Popen([sys.executable, '-c', 'pass'], start_new_session=True);"
        "import os; os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT); print(p.pid)"
    )
    options = corral.SpawnOptions(redirects="out", log_dir=tmp_path, grace=GRACE)
    group = _spawn(python(code), None, {**options, "nprocs": 2}, owns_process=True)
    async with asyncio.timeout(20), group:
        helper = helper_pid(group)
        result = await group.wait()
    assert result.ok
    if mechanism == "pidns":
        # The init is reaped only once every process of its namespace is.
        assert start_time(helper) is None
        return
    for rank in (0, 1):
        pid = int((tmp_path / str(rank) / "stdout.log").read_text())
        assert not is_zombie(pid), f"pid {pid} left as a zombie"


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
