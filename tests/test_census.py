"""The ``/proc`` census: when the pid cursor lets close skip a full walk of ``/proc``.

The rules are checked with a scripted cursor (the machine's real one moves
whenever anything on it starts a process); the kernel fact they rest on, and
the fallback to full walks, with real processes.
"""

from __future__ import annotations

import subprocess
import sys
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
    """A scripted cursor and ``/proc``: counts every full walk and every stat read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cursor = 100
        self.procs: dict[int, _watchdog.Stat] = {1: OLD}
        self.walks = 0
        self.reads: list[int] = []
        monkeypatch.setattr(_reap, "pid_cursor", lambda: self.cursor if _reap._CURSOR_OK else None)
        monkeypatch.setattr(_reap, "_CURSOR_OK", True)
        monkeypatch.setattr(_reap, "_CURSOR_WINDOW", 60.0)
        monkeypatch.setattr(_reap, "snapshot", self._snapshot)
        monkeypatch.setattr(_watchdog, "read_stat", self._read_stat)

    def start(self, pid: int, st: _watchdog.Stat = YOUNG) -> int:
        self.cursor += 1
        self.procs[pid] = st
        return pid

    def _snapshot(self) -> dict[int, _watchdog.Stat]:
        self.walks += 1
        return dict(self.procs)

    def _read_stat(self, pid: int) -> _watchdog.Stat | None:
        self.reads.append(pid)
        return self.procs.get(pid)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return Machine(monkeypatch)


def test_only_the_groups_own_processes_means_no_walk(machine: Machine) -> None:
    """The cursor moved by the group's own starts alone: no descendant exists, nothing is read."""
    census = _reap.Census()
    census.own(machine.start(101))
    census.own(machine.start(102))
    census.check()
    assert census.take(SINCE) == {}
    assert (machine.walks, machine.reads) == (0, [])


def test_any_other_start_means_a_full_walk(machine: Machine) -> None:
    """One more process than the group started (a rank's child, anything): a full walk."""
    census = _reap.Census()
    census.own(machine.start(101))
    machine.start(102)  # a child of the rank, or a stranger: the cursor cannot tell
    assert census.take(SINCE) == {1: OLD, 101: YOUNG, 102: YOUNG}
    assert machine.walks == 1


def test_unchanged_cursor_rereads_only_the_young(machine: Machine) -> None:
    """Nothing started since the last table: its young processes are read again, no walk."""
    census = _reap.Census()
    census.own(machine.start(101))
    machine.start(102)
    census.take(SINCE)
    machine.procs[102] = _watchdog.Stat(ppid=1, sid=7, starttime=SINCE + 5, zombie=True)
    del machine.procs[101]
    table = census.take(SINCE)
    assert machine.walks == 1
    assert sorted(machine.reads) == [101, 102]  # not the old pid 1
    assert table == {102: machine.procs[102]}


def test_a_start_after_the_last_table_means_a_full_walk(machine: Machine) -> None:
    """A process born between two tables (e.g. a rank forking on SIGTERM) forces a walk."""
    census = _reap.Census()
    census.own(machine.start(101))
    machine.start(102)
    census.take(SINCE)
    machine.start(103)
    assert 103 in census.take(SINCE)
    assert machine.walks == 2


def test_the_cursor_is_trusted_only_within_its_window(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the window a lap of the pid space cannot be ruled out: always a full walk."""
    monkeypatch.setattr(_reap, "_CURSOR_WINDOW", 0.0)
    census = _reap.Census()
    census.own(machine.start(101))
    census.take(SINCE)
    census.take(SINCE)
    assert machine.walks == 2


def test_a_lagging_cursor_turns_the_census_off(machine: Machine) -> None:
    """A cursor that did not count the group's own starts (a sandbox) is never used again."""
    census = _reap.Census()
    census.own(101)  # started, but the cursor did not move
    census.check()
    assert _reap._CURSOR_OK is False
    census.take(SINCE)
    assert machine.walks == 1


def test_the_kernel_cursor_counts_every_start() -> None:
    """The fact the census rests on: each process started moves /proc/loadavg's cursor."""
    before = _reap.pid_cursor()
    if before is None:
        pytest.skip("no usable pid cursor here: the census always walks /proc")
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(3)]
    for p in procs:
        p.wait()
    after = _reap.pid_cursor()
    assert after is not None
    assert after - before >= 3 or after < before  # (or the pid space wrapped)
    assert procs[-1].pid <= after or after < before


@pytest.mark.parametrize("shape", ["setsid", "fork_on_term"])
async def test_full_walks_alone_still_contain(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cursor (full walks every time), descendants are found and ended all the same."""
    monkeypatch.setattr(_reap, "_CURSOR_OK", False)
    await _end_in_process("command", "close", shape, tmp_path)
