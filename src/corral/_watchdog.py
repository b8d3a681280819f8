"""The per-group watchdog, and the ``/proc`` membership rules it shares with ``_reap``.

If the supervising process dies without closing its group (SIGKILL, a crash,
``os._exit``), nothing in it can run any more, and its ranks would be
re-parented and live on. So every group on Linux has one small helper
process, started by the supervisor with ``python -I -S`` importing this file
as a top-level module from its folder (no ``site``, no corral import, its
cached bytecode: about 7 ms of CPU, a few MB; a shell holds it back until
the ranks are started, see ``_reap._GATE``), in a
session of its own (a ``killpg`` of the ranks or a terminal's SIGINT does not
reach it). The supervisor feeds it each rank's pid as soon as the rank is
started, through a pipe of its own (not the gate's), one decimal pid per line.
It waits, doing nothing, for either:

* the supervisor's exit (a pidfd on it turns readable), or
* end of file on the pipe (the supervisor died, or it closed the pipe on
  purpose to have the group killed now, as ``Group.__del__`` does).

Then it SIGKILLs every process of the group, rescanning ``/proc`` until none
is left, and exits. On a normal close the supervisor SIGKILLs and reaps it
after the group is gone: it never outlives its group.

This file must stay importable as a plain script: standard library only, no
relative imports, nothing imported beyond ``os``, ``select``, ``signal``,
``sys`` and ``time``. ``_reap`` imports the membership functions from it, so the
supervisor and the watchdog apply exactly the same rules.

Membership (no parent links needed, so re-parented orphans are found):

* the session id is one of the group's *valid* sessions (every rank leads its
  own session, whose id is the rank's pid; descendants keep it unless they
  call ``setsid``) and the process started after the group did;
* or ``CORRAL_GROUP`` in its environment names the group's token (inherited
  through ``fork``/``exec``: this finds ``setsid`` daemons);
* or its parent is a member (found in the same snapshot).

A session id is *valid* while its number cannot belong to anybody else: the
supervisor keeps every rank unreaped (a zombie once it exits) until the group
is closed, so the rank's pid, which is its session and process-group id, is
not recycled while the group lives.
"""

from __future__ import annotations

import os
import select
import sys
import time

# ``typing`` and ``signal`` (which imports ``enum``) would triple the
# watchdog's start-up time: neither is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Collection, Iterable, Mapping
    from typing import Final
else:
    import _signal

GROUP_KEY: Final = b"CORRAL_GROUP="
#: The parent of every kernel thread (which has no arguments and no environment).
_KTHREADD: Final = 2
#: Pause before rescanning when a process was caught in the middle of an execve.
UNSURE_RETRY: Final = 0.002
#: Kill-and-rescan rounds before the watchdog gives up on a process that keeps forking.
KILL_ROUNDS: Final = 50
#: Longest wait for SIGKILLed processes to die in one round (they die in microseconds).
ROUND_TIMEOUT: Final = 1.0


_READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC


class Stat:
    """The fields of ``/proc/PID/stat`` that membership needs."""

    __slots__ = ("ppid", "sid", "starttime", "zombie")

    def __init__(self, ppid: int, sid: int, starttime: int, zombie: bool) -> None:
        self.ppid = ppid
        self.sid = sid
        self.starttime = starttime
        self.zombie = zombie


def read_stat(pid: int) -> Stat | None:
    """Return ``pid``'s :class:`Stat`, or ``None`` when it is gone (reaped)."""
    # os.open/os.read, not open(): this runs for every process on the machine
    # at each close, and a buffered file object costs twice as much.
    try:
        fd = os.open(f"/proc/{pid}/stat", _READ_FLAGS)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is the state; ppid, pgrp, session follow; starttime is field 22 (index 19).
    return Stat(int(fields[1]), int(fields[3]), int(fields[19]), fields[0] in (b"Z", b"X"))


def proc_table(skip: Collection[int] = ()) -> dict[int, Stat]:
    """Snapshot every process in ``/proc`` (except ``skip``): pid -> :class:`Stat`."""
    table: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in skip:
            continue
        st = read_stat(pid)
        if st is not None:
            table[pid] = st
    return table


def has_token(pid: int, token: bytes) -> bool:
    """True when ``pid``'s initial environment has ``token`` in ``CORRAL_GROUP``."""
    environ = read_environ(pid)
    return environ is not None and carries(environ, token)


def read_environ(pid: int) -> bytes | None:
    """``pid``'s initial environment (empty for a moment during ``execve``); None if gone."""
    try:
        fd = os.open(f"/proc/{pid}/environ", _READ_FLAGS)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def carries(environ: bytes, token: bytes) -> bool:
    """True when ``environ`` has ``token`` in ``CORRAL_GROUP``.

    The value is a ``:``-separated list: a group started from inside another
    group's rank carries both tokens.
    """
    start = environ.find(GROUP_KEY)
    while start >= 0:
        if start == 0 or environ[start - 1] == 0:
            end = environ.find(b"\0", start)
            value = environ[start + len(GROUP_KEY) : end if end >= 0 else None]
            if token in value.split(b":"):
                return True
        start = environ.find(GROUP_KEY, start + 1)
    return False


def members(
    table: Mapping[int, Stat],
    token: bytes,
    sessions: Collection[int],
    since: int,
    exclude: Collection[int] = (),
    unsure: tuple[int, set[int]] | None = None,
) -> set[int]:
    """Return the pids in ``table`` that belong to the group (see the module docstring).

    Args:
        table: a :func:`proc_table` snapshot.
        token: the group's ``CORRAL_GROUP`` token.
        sessions: the group's valid session ids (the ranks' pids).
        since: boot ticks when the group started; older processes never match by session.
        exclude: pids never reported (they still link their children into the group).
        unsure: ``(parent, into)``: add to ``into`` the children of ``parent``
            (any parent when it is 0) that are not members but cannot be told
            apart yet: a process in the middle of ``execve`` shows an empty
            environment for a moment, so a ``setsid()`` daemon re-parented to
            ``parent`` is invisible then. The caller scans again shortly.
    """
    found: set[int] = set()
    empty: list[int] = []  # young processes that showed no environment at all
    for pid, st in table.items():
        # The token is new: no process older than the group can carry it.
        if st.starttime < since:
            continue
        if st.sid in sessions:
            found.add(pid)
        elif not st.zombie and (environ := read_environ(pid)) is not None:
            if carries(environ, token):
                found.add(pid)
            elif not environ:
                empty.append(pid)
    # Children of members are members, even with a cleared environment.
    roots = found | (set(sessions) & table.keys())
    frontier = list(roots)
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st.ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in roots:
                roots.add(child)
                found.add(child)
                frontier.append(child)
    if unsure is not None:
        parent, into = unsure
        for pid in empty:
            ppid = table[pid].ppid
            if pid in found or pid in exclude:
                continue
            if not (ppid == parent or (parent == 0 and ppid != _KTHREADD)):
                continue
            settled = _after_exec(pid, token)
            if settled is None:
                into.add(pid)
            elif settled:
                found.add(pid)  # its exec went through meanwhile: the token shows now
    return found - set(exclude)


def _after_exec(pid: int, token: bytes) -> bool | None:
    """For a process that showed no environment: whether it carries ``token`` now,
    or None while it may still be in the middle of an ``execve``.

    An ``execve`` shows first neither arguments nor environment, then, while
    the kernel copies the environment onto the new stack, the arguments only
    (for as long as that copy takes, a page fault or a preemption included).
    A process whose own environment is empty looks like the second state, so
    that one counts only while the process runs or waits in the kernel (R, D).
    The environment is read last: if it is still empty then, the exec was not
    through when the arguments and the state were read.
    """
    cmdline = _head(pid, "cmdline")
    stat = _head(pid, "stat", 4096)
    environ = read_environ(pid)
    if environ is None or cmdline is None or stat is None:
        return False  # gone
    if environ:
        return carries(environ, token)
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return None if not cmdline or state in (b"R", b"D") else False


def _head(pid: int, name: str, size: int = 1) -> bytes | None:
    """The first ``size`` bytes of ``/proc/PID/name``; None when it cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", _READ_FLAGS)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def boot_ticks() -> int:
    """Now, in clock ticks since boot: the unit of ``/proc/PID/stat``'s starttime.

    ``CLOCK_BOOTTIME``, the clock the start times are kept on (time namespace
    offsets included, as for them); ``/proc/uptime`` where it is missing.
    """
    try:
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    # Round down and step back a tick: a rank started in this tick must match.
    return max(0, int(uptime * os.sysconf("SC_CLK_TCK")) - 1)


# -- the watchdog program ------------------------------------------------------------------


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _exited(fd: int) -> bool:
    """True when the process behind pidfd ``fd`` has exited (the pidfd is readable)."""
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def _send(fd: int, sig: int) -> bool:
    try:
        _signal.pidfd_send_signal(fd, sig)
    except OSError:
        return False
    return True


class _Watch:
    def __init__(self, supervisor: int, token: bytes, since: int, pids_fd: int) -> None:
        self.supervisor = supervisor
        self.pids_fd = pids_fd
        self.token = token
        self.since = since
        self.ranks: dict[int, int | None] = {}  # rank pid -> pidfd
        self.sup_fd = _pidfd(supervisor)
        # Opened, then checked: if our parent is still the supervisor, the pidfd is its.
        self.sup_gone = os.getppid() != supervisor
        self._buf = b""

    def add_ranks(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.strip().isdigit():
                self._add_rank(int(line))

    def _add_rank(self, pid: int) -> None:
        if pid in self.ranks:
            return
        fd = _pidfd(pid)
        if fd is not None and not self._supervisor_alive():
            # The supervisor is gone: the rank may have been reaped by its new
            # parent and the pid reused. Keep it only if it still looks like ours.
            st = read_stat(pid)
            if st is None or st.sid != pid or st.starttime < self.since:
                os.close(fd)
                fd = None
        self.ranks[pid] = fd

    def _supervisor_alive(self) -> bool:
        if self.sup_gone:
            return False
        if self.sup_fd is not None and _exited(self.sup_fd):
            self.sup_gone = True
        return not self.sup_gone

    def wait_for_the_end(self) -> None:
        """Block until the supervisor dies or closes the pipe, reading rank pids meanwhile."""
        poller = select.poll()
        poller.register(self.pids_fd, select.POLLIN)
        if self.sup_fd is not None:
            poller.register(self.sup_fd, select.POLLIN)
        while not self.sup_gone:
            for fd, _events in poller.poll():
                if fd == self.sup_fd:
                    self.sup_gone = True
                    continue
                data = os.read(self.pids_fd, 65536)
                if not data:
                    return
                self.add_ranks(data)
        # Read what the supervisor sent before it died (never block: the write
        # end may have leaked into another process).
        os.set_blocking(self.pids_fd, False)
        try:
            while data := os.read(self.pids_fd, 65536):
                self.add_ranks(data)
        except OSError:
            pass

    def valid_sessions(self, table: Mapping[int, Stat]) -> set[int]:
        """Rank pids that can still only be the group's session ids."""
        valid = set()
        for pid, fd in self.ranks.items():
            if fd is not None and _send(fd, 0):
                valid.add(pid)  # the rank (alive or a zombie) still holds the number
            elif pid not in table:
                valid.add(pid)  # nobody holds the number: only old session members can use it
        return valid

    def kill_group(self) -> None:
        """SIGKILL every process of the group; rescan until none is alive."""
        me = os.getpid()
        skip = {me, self.supervisor}
        for _ in range(KILL_ROUNDS):
            table = proc_table(skip)
            sessions = self.valid_sessions(table)
            for sid in sessions:
                fd = self.ranks.get(sid)
                if fd is not None and _send(fd, 0):
                    try:
                        os.killpg(sid, _signal.SIGKILL)
                    except OSError:
                        pass
            dying: list[int] = []
            unsure: set[int] = set()
            for pid in members(table, self.token, sessions, self.since, skip, (0, unsure)):
                st = table[pid]
                if st.zombie:
                    continue
                fd = _pidfd(pid)
                if fd is None:
                    continue
                now = read_stat(pid)
                if now is None or now.starttime != st.starttime or not _send(fd, _signal.SIGKILL):
                    os.close(fd)
                    continue
                dying.append(fd)
            for fd in self.ranks.values():
                if fd is not None:
                    _send(fd, _signal.SIGKILL)
            if dying:
                _wait_all(dying)
            elif unsure:
                select.select([], [], [], UNSURE_RETRY)  # an execve hides a process: look again
            else:
                return

    def close(self) -> None:
        for fd in self.ranks.values():
            if fd is not None:
                os.close(fd)


def _wait_all(fds: Iterable[int]) -> None:
    """Wait until every pidfd in ``fds`` is readable (its process exited), then close them."""
    pending = set(fds)
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        ready = poller.poll(int(ROUND_TIMEOUT * 1000))
        if not ready:
            break
        for fd, _events in ready:
            poller.unregister(fd)
            pending.discard(fd)
            os.close(fd)
    for fd in pending:
        os.close(fd)


def main(argv: list[str]) -> int:
    """Run the watchdog: ``argv[1:]`` is ``SUPERVISOR_PID TOKEN SINCE_TICKS PIDS_FD``.

    The ranks' pids arrive on ``PIDS_FD``, one per line, as each rank starts;
    its end of file (the supervisor died, or let go) is the signal to act.
    """
    for sig in (_signal.SIGINT, _signal.SIGHUP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU):
        _signal.signal(sig, _signal.SIG_IGN)
    supervisor, token, since, pids_fd = int(argv[1]), argv[2].encode(), int(argv[3]), int(argv[4])
    watch = _Watch(supervisor, token, since, pids_fd)
    watch.wait_for_the_end()
    watch.kill_group()
    watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
