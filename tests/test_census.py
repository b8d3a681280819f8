"""The ``/proc`` census: when the kernel's counters let close skip a full walk of ``/proc``.

The rules are checked with scripted counters (the machine's real ones move
whenever anything on it starts a process); the kernel facts they rest on, and
the fallback to full walks, with real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from corral import _platform, _reap, _watchdog

from .test_containment import _end_in_process

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not (_platform.HAS_PROC and _platform.HAS_PIDFD), reason="needs Linux /proc and pidfds"
)

SINCE = 1000
YOUNG = _watchdog.Stat(ppid=1, sid=7, starttime=SINCE + 5, zombie=False)
OLD = _watchdog.Stat(ppid=1, sid=1, starttime=SINCE - 5, zombie=False)


class Machine:
    """Scripted counters and ``/proc``: counts every full walk and every stat read.

    ``start`` creates a process here (both counters move, the process shows);
    ``begin_fork`` only starts one (its pid taken: the cursor moves) and
    ``end_fork`` makes it visible (the fork count moves); ``elsewhere`` is a
    process outside this pid namespace (only the fork count moves);
    ``failed_fork`` a fork that failed after taking a pid (only the cursor).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cursor = 100
        self.forks = 5000
        self.clock = 0.0
        self.procs: dict[int, _watchdog.Stat] = {1: OLD}
        self.walks = 0
        self.reads: list[int] = []
        monkeypatch.setattr(_reap, "counters", self._counters)
        monkeypatch.setattr(_reap, "_CURSOR_OK", True)
        monkeypatch.setattr(_reap, "_FORKS_OK", True)
        monkeypatch.setattr(_reap, "_PID_MAX", 32768)  # 2 CPUs or more: a window of ms
        monkeypatch.setattr(_reap, "walk", self._walk)
        monkeypatch.setattr(_watchdog, "read_stat", self._read_stat)

    def start(self, pid: int, st: _watchdog.Stat = YOUNG) -> int:
        self.begin_fork()
        self.end_fork(pid, st)
        return pid

    def begin_fork(self) -> None:
        self.cursor += 1

    def end_fork(self, pid: int, st: _watchdog.Stat = YOUNG) -> None:
        self.forks += 1
        self.procs[pid] = st

    def elsewhere(self) -> None:
        self.forks += 1

    def failed_fork(self) -> None:
        self.cursor += 1

    def _counters(self) -> _reap.Counters:
        cursor_ok, forks_ok = _reap._CURSOR_OK, _reap._FORKS_OK
        return _reap.Counters(
            self.cursor if cursor_ok else None,
            len(self.procs) if cursor_ok else None,
            self.forks if forks_ok else None,
            self.clock,
        )

    def _walk(self, since: int, at: object = None) -> dict[int, _watchdog.Stat]:
        self.walks += 1
        return {pid: st for pid, st in self.procs.items() if st.starttime >= since}

    def _read_stat(self, pid: int) -> _watchdog.Stat | None:
        self.reads.append(pid)
        return self.procs.get(pid)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return Machine(monkeypatch)


def started_group(machine: Machine, *pids: int) -> _reap.Census:
    census = _reap.Census(SINCE)
    for pid in pids:
        census.own(machine.start(pid))
    census.check()
    return census


def test_only_the_groups_own_pids_means_no_walk(machine: Machine) -> None:
    """No pid allocated here but the group's own: no descendant exists, nothing is read."""
    census = started_group(machine, 101, 102)
    machine.elsewhere()  # another pid namespace's fork: not ours
    assert census.take() == {}
    assert (machine.walks, machine.reads) == (0, [])


def test_any_other_pid_means_a_full_walk(machine: Machine) -> None:
    """One more pid than the group's own (a rank's child, a stranger, a failed fork): a walk."""
    census = started_group(machine, 101)
    machine.failed_fork()
    assert census.take() == {101: YOUNG}
    assert machine.walks == 1


def test_a_fork_in_flight_at_the_first_table_is_not_lost(machine: Machine) -> None:
    """A rank's fork that has its pid but is not visible yet: the cursor already says so."""
    census = started_group(machine, 101)
    machine.begin_fork()  # pid 102 allocated, the fork still in flight
    assert census.take() == {101: YOUNG}  # a full walk, not "no descendant"
    machine.end_fork(102)
    assert 102 in census.take()  # the fork count moved: a walk again
    assert machine.walks == 2


def test_a_fork_straddling_a_walk_is_not_lost(machine: Machine) -> None:
    """alloc_pid() moves the cursor before the process shows and is counted: a walk
    between the two cannot see it, and the next table must not trust the still cursor."""
    census = started_group(machine, 101)
    machine.start(102)  # a descendant: the next table is a full walk
    machine.begin_fork()  # pid 103 allocated, its fork still in flight
    assert 103 not in census.take()
    machine.end_fork(103)  # visible, counted
    assert 103 in census.take()
    assert machine.walks == 2


def test_nothing_visible_since_the_last_table_rereads_only_the_young(machine: Machine) -> None:
    """No task became visible since the last table: its young processes are read again."""
    census = started_group(machine, 101)
    machine.start(102)
    census.take()
    machine.failed_fork()  # moves the cursor, creates nothing
    machine.procs[102] = _watchdog.Stat(ppid=1, sid=7, starttime=SINCE + 5, zombie=True)
    del machine.procs[101]
    table = census.take()
    assert machine.walks == 1
    assert sorted(machine.reads) == [101, 102]
    assert table == {102: machine.procs[102]}


def test_nothing_new_after_a_table_of_only_our_own_reads_nothing(machine: Machine) -> None:
    """A walk that found no young process but the group's own, nothing created since: no read."""
    census = started_group(machine, 101)
    machine.failed_fork()
    assert census.take() == {101: YOUNG}  # a full walk: nothing proven
    assert census.take() == {}
    assert (machine.walks, machine.reads) == (1, [])


def test_a_start_after_the_last_table_means_a_full_walk(machine: Machine) -> None:
    """A process born between two tables (e.g. a rank forking on SIGTERM) forces a walk."""
    census = started_group(machine, 101)
    machine.start(102)
    census.take()
    machine.start(103)
    assert 103 in census.take()
    assert machine.walks == 2


def test_the_cursor_is_trusted_only_within_its_window(machine: Machine) -> None:
    """Past the time a lap of the free pids takes, the cursor proves nothing."""
    census = started_group(machine, 101)
    machine.clock += 1.0
    census.take()
    assert machine.walks == 1


def test_a_cursor_behind_our_own_pids_is_not_trusted(machine: Machine) -> None:
    """A cursor that never counted the group's own pids (a stale copy) proves nothing."""
    census = _reap.Census(SINCE)
    census.own(machine.start(5000))  # a pid above the cursor it was given
    assert machine.cursor < 5000
    census.take()
    assert machine.walks == 1


def test_a_lagging_counter_is_turned_off(machine: Machine) -> None:
    """A counter that missed the group's own starts (a sandbox) is never used again."""
    census = _reap.Census(SINCE)
    census.own(101)  # started, but neither counter moved
    census.check()
    assert (_reap._CURSOR_OK, _reap._FORKS_OK) == (False, False)
    census.take()
    assert machine.walks == 1


def test_counters_mounted_over_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A /proc/loadavg that is not the kernel's (LXCFS mounts its own) is never read."""
    monkeypatch.setattr(_reap, "_COUNTERS_OK", None)
    monkeypatch.setattr(_reap, "_CURSOR_OK", True)
    monkeypatch.setattr(_reap, "_FORKS_OK", True)
    monkeypatch.setattr(_reap, "_PID_MAX", None)
    monkeypatch.setattr(_reap, "_mounted_over", lambda: {"/proc/loadavg", "/sys"})
    now = _reap.counters()
    assert (_reap._CURSOR_OK, _reap._FORKS_OK) == (False, True)
    assert now.cursor is None
    assert now.forks is not None


def test_a_walk_rereads_no_process_known_to_be_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a first walk, only young or new processes are read: old ones are known by
    the inode of their /proc entry, which a recycled pid does not keep (kernel 6.14+)."""
    monkeypatch.setattr(_reap, "_INODES_SAFE", True)
    entries = [(1, 11), (500, 50), (600, 60)]
    stats = {1: OLD, 500: OLD, 600: YOUNG}
    reads: list[int] = []

    def read_stat(pid: int) -> _watchdog.Stat | None:
        reads.append(pid)
        return stats.get(pid)

    monkeypatch.setattr(_reap, "_SEEN", {})
    monkeypatch.setattr(_reap, "_SEEN_AT", None)
    monkeypatch.setattr(_reap, "counters", lambda: _reap.Counters(None, None, None, 0.0))
    monkeypatch.setattr(_reap, "_proc_entries", lambda: list(entries))
    monkeypatch.setattr(_watchdog, "read_stat", read_stat)
    assert _reap.walk(SINCE) == {600: YOUNG}  # the old ones are read, not returned
    assert sorted(reads) == [1, 500, 600]
    reads.clear()
    assert _reap.walk(SINCE) == {600: YOUNG}
    assert reads == [600]  # young: its state may have changed
    entries[1] = (500, 51)  # pid 500 exited; a new process got the pid: a new inode
    stats[500] = YOUNG
    reads.clear()
    assert _reap.walk(SINCE) == {500: YOUNG, 600: YOUNG}
    assert sorted(reads) == [500, 600]
    reads.clear()
    assert _reap.walk(SINCE - 10) == {1: OLD, 500: YOUNG, 600: YOUNG}  # an older group
    assert sorted(reads) == [1, 500, 600]


def test_a_pid_handed_out_since_the_last_walk_is_read_whatever_its_inode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pid the cursor handed out since the last walk may be a new process showing the
    old one's /proc inode for a moment (kernels 5.7-6.14): it is read. Inode 1 (none
    could be made) is never trusted. Before 6.14 the inode alone never decides."""
    monkeypatch.setattr(_reap, "_INODES_SAFE", True)
    entries = [(500, 50), (700, 1)]
    reads: list[int] = []
    clock = {"cursor": 400}

    def read_stat(pid: int) -> _watchdog.Stat | None:
        reads.append(pid)
        return OLD

    def walk_reads(cursor: int) -> list[int]:
        clock["cursor"] = cursor
        reads.clear()
        _reap.walk(SINCE)
        return sorted(reads)

    monkeypatch.setattr(_reap, "_SEEN", {})
    monkeypatch.setattr(_reap, "_SEEN_AT", None)
    monkeypatch.setattr(_reap, "_PID_MAX", 32768)
    monkeypatch.setattr(_reap, "counters", lambda: _reap.Counters(clock["cursor"], 100, None, 0.0))
    monkeypatch.setattr(_reap, "_proc_entries", lambda: list(entries))
    monkeypatch.setattr(_watchdog, "read_stat", read_stat)
    assert walk_reads(400) == [500, 700]  # the first walk reads everything
    assert walk_reads(400) == [700]  # 500: same inode, no pid handed out; 700: inode 1
    assert walk_reads(520) == [500, 700]  # 401..520 handed out: 500 may be new
    assert walk_reads(520) == [700]
    assert walk_reads(300) == [700]  # a wrap: the range is unknown, the inode decides
    monkeypatch.setattr(_reap, "_INODES_SAFE", False)  # a kernel before 6.14
    assert walk_reads(310) == [700]  # the cursor's range still decides
    assert walk_reads(200) == [500, 700]  # a wrap: without trusted inodes, read


def test_a_real_walk_reads_only_young_and_new_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this machine: the second walk reads no process the first one knew to be old."""
    since = _watchdog.boot_ticks()
    _reap.walk(since)
    known = dict(_reap._SEEN)
    reads: list[int] = []
    real_read = _watchdog.read_stat

    def read_stat(pid: int) -> _watchdog.Stat | None:
        reads.append(pid)
        return real_read(pid)

    monkeypatch.setattr(_watchdog, "read_stat", read_stat)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        table = _reap.walk(since)
        inodes = dict(_reap._proc_entries())
    finally:
        child.communicate(b"")
    assert child.pid in table
    old_again = [
        pid
        for pid in reads
        if pid in known and known[pid][1] < since and known[pid][0] == inodes.get(pid)
    ]
    assert old_again == []


def test_the_kernel_counters_count_every_start() -> None:
    """The facts the census rests on: each process started moves both counters."""
    before = _reap.counters()
    if before.cursor is None and before.forks is None:
        pytest.skip("no usable counters here: the census always walks /proc")
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(3)]
    for p in procs:
        p.wait()
    after = _reap.counters()
    if before.forks is not None:
        assert after.forks is not None
        assert after.forks - before.forks >= 3
    if before.cursor is not None:
        assert after.cursor is not None
        assert after.cursor - before.cursor >= 3 or after.cursor < before.cursor  # (a wrap)
        assert procs[-1].pid <= after.cursor or after.cursor < before.cursor


@pytest.mark.parametrize("shape", ["setsid", "fork_on_term"])
async def test_full_walks_alone_still_contain(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the counters (a full walk every time), descendants are found and ended the same."""
    monkeypatch.setattr(_reap, "_COUNTERS_OK", False)
    await _end_in_process("command", "close", shape, tmp_path)


# -- a process in the middle of an execve -------------------------------------------------


def test_an_execve_shows_its_arguments_before_its_environment_and_runs_meanwhile() -> None:
    """The kernel fact ``_after_exec`` rests on: between showing its new arguments and
    its new environment, a process in ``execve`` is running (R) or in the kernel (D).
    A huge environment makes that copy last long enough to be caught from another CPU;
    on a machine too busy to catch it within a few seconds the test cannot tell."""
    env = {f"CORRAL_TEST_{i}": "x" * 16 for i in range(20_000)}
    states: list[bytes] = []
    deadline = time.monotonic() + 5.0
    while not states and time.monotonic() < deadline:
        pid = os.posix_spawn("/bin/true", ["/bin/true"], env)  # returns once in execve
        reaped = False
        try:
            while not reaped:
                cmdline = _head(pid, "cmdline")
                stat = _head(pid, "stat")
                if cmdline and stat and _head(pid, "environ") == b"":
                    states.append(stat[stat.rfind(b")") + 2 :][:1])
                reaped = os.waitpid(pid, os.WNOHANG) != (0, 0)
        finally:
            if not reaped:
                os.waitpid(pid, 0)
    if not states:
        pytest.skip("the machine is too busy to catch an execve in the act")
    assert set(states) <= {b"R", b"D"}


@pytest.mark.parametrize(
    ("environ_now", "cmdline", "state", "expected"),
    [
        (b"", b"", b"R", None),  # before the new arguments
        (b"", b"/bin/sleep\0", b"R", None),  # copying the environment
        (b"", b"/bin/sleep\0", b"D", None),  # ... after a page fault
        (b"", b"/bin/sleep\0", b"S", False),  # settled, its environment empty
        (b"CORRAL_GROUP=t\0", b"/bin/sleep\0", b"R", True),  # through meanwhile
        (b"A=b\0", b"/bin/sleep\0", b"R", False),  # through: not ours
        (None, b"/bin/sleep\0", b"R", False),  # gone
    ],
)
def test_a_process_without_environment_is_unsure_while_it_may_be_in_execve(
    monkeypatch: pytest.MonkeyPatch,
    environ_now: bytes | None,
    cmdline: bytes,
    state: bytes,
    expected: bool | None,
) -> None:
    """Regression (stress runs): a ``setsid()`` daemon caught while the kernel copies its
    environment shows its arguments but no token yet; it must be scanned again, not taken
    for a stranger. ``environ_now`` is what it shows when read again, last: an exec that
    went through meanwhile is seen with its token."""
    files = {"cmdline": cmdline, "stat": b"7 (sleep) " + state + b" 1 7 7"}
    monkeypatch.setattr(_watchdog, "read_environ", lambda pid: environ_now)
    monkeypatch.setattr(_watchdog, "_head", lambda pid, name, size=1: files[name][:size])
    assert _watchdog._after_exec(7, b"t") is expected


@pytest.mark.parametrize(
    ("env", "expected"), [({}, False), ({"CORRAL_GROUP": "other:t"}, True), ({"A": "b"}, False)]
)
def test_a_settled_process_is_told_apart(env: dict[str, str], expected: bool) -> None:
    """Past its execve (stopped, so neither running nor in the kernel): no longer unsure;
    a member exactly when its environment carries the token."""
    child = subprocess.Popen(
        [sys.executable, "-S", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"],
        env=env,
    )
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)  # the handshake: it stopped itself
        assert os.WIFSTOPPED(status)
        assert _watchdog._after_exec(child.pid, b"t") is expected
    finally:
        child.kill()
        child.wait()


def _head(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read(64)
    except OSError:
        return None
