"""Find, signal and reap the descendants of a group's ranks; run its watchdog.

Parent links are not enough: once a rank dies its children are re-parented,
and a daemon that called ``setsid()`` leaves the rank's session and process
group. Membership is decided from a ``/proc`` snapshot by the rules in
``_watchdog`` (session id, ``CORRAL_GROUP`` token, parent a member), shared
with the watchdog process so both see the same group.

Nothing outside the group is ever signalled or reaped:

* a rank is reaped only when the group closes, so its pid (its session and
  process-group id) is never recycled while its group lives, and the session
  rule cannot match a stranger;
* every other process is signalled through a pidfd opened *after* the scan
  and checked against the start time the scan saw, so a recycled pid is
  never hit;
* a zombie is reaped only when it is this process's child (re-parented to us
  as the subreaper) *and* was identified as a member, again through a pidfd
  whose start time matches (``waitid(P_PIDFD)``): the host's own children
  and their exit statuses are left alone.

Elsewhere than Linux the scan falls back to psutil's parent links, taken
before the first signal, and there is no watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import _platform, _watchdog

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping

__all__ = (
    "Census",
    "Counters",
    "Member",
    "Watchdog",
    "boot_ticks_now",
    "counters",
    "open_member",
    "reap_member",
    "reap_zombie_children",
    "scan",
    "signal_member",
    "snapshot",
)

_log = logging.getLogger("corral")
_HAS_P_PIDFD: Final = hasattr(os, "P_PIDFD") and hasattr(os, "waitid")


@dataclass(frozen=True, slots=True)
class Member:
    """A descendant process of the group (never a rank itself)."""

    pid: int
    ppid: int
    starttime: int
    zombie: bool


def boot_ticks_now() -> int:
    """The current time in clock ticks since boot, the unit of ``/proc/PID/stat``'s starttime."""
    if not _platform.HAS_PROC:
        return 0
    return _watchdog.boot_ticks()


#: Every child this process started through corral (ranks, watchdogs) and has
#: not reaped yet, across all groups: never mistaken for an orphan to reap.
_OWN_CHILDREN: set[int] = set()
#: Niceness of a watchdog, relative to the supervisor's (it runs only while
#: the supervisor is alive and idle).
_WATCHDOG_NICE: Final = 10
_NICE: list[str] | None = None


def _nice_prefix() -> list[str]:
    """``nice -n 10`` to start the watchdog with, or ``[]`` where there is no nice(1).

    The watchdog's interpreter start-up (~7 ms of CPU) must not compete with
    the ranks or with the supervisor: nothing waits for it, and it needs no
    speed until the supervisor dies. Lowered only after ``Popen`` returns, it
    would run its first milliseconds at full priority, and the supervisor,
    woken from ``vfork`` on the same CPU, waits behind it for a whole time
    slice (measured: 2.5 ms instead of 0.7 ms to start it on 2 busy cores).
    Through nice(1), the first image ``exec``'d is small and the interpreter
    starts already lowered.

    Only the system's own nice(1) is used (not one found on ``PATH``): a
    wrapper that did not ``exec`` would become the watchdog's parent, and the
    watchdog would take the supervisor for dead.
    """
    global _NICE
    if _NICE is None:
        found = next((p for p in _NICE_PATHS if os.access(p, os.X_OK)), None)
        _NICE = [found, "-n", str(_WATCHDOG_NICE)] if found else []
    return _NICE


_NICE_PATHS: Final = ("/usr/bin/nice", "/bin/nice")

#: The watchdog is started before the first rank, so that no rank ever lives
#: without one; but its interpreter's start-up (~7 ms of CPU) would then
#: compete with the ranks' own. A shell holds it at this gate, blocked on the
#: pipe, until the supervisor's first line (sent once the ranks are started)
#: or end of file (the supervisor died): then it ``exec``s the interpreter.
_GATE: Final = (
    ["/bin/sh", "-c", 'read -r _; exec "$0" "$@"'] if os.access("/bin/sh", os.X_OK) else []
)
#: Errors that mean nice(1) cannot run here at all (not a passing shortage).
_NICE_BROKEN: Final = frozenset(
    {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EPERM}
)


def _spawn_watchdog(program: list[str], stdin: int) -> subprocess.Popen[bytes]:
    """Start ``program`` through nice(1), or without it if nice(1) cannot run here."""
    global _NICE
    while True:
        prefix = _nice_prefix()
        try:
            return subprocess.Popen(
                [*prefix, *program],
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            if not prefix or exc.errno not in _NICE_BROKEN:
                raise
            _NICE = []  # it cannot run here: never try it again


#: The watchdog program: ``_watchdog`` imported as a top-level module from its
#: folder (after the standard library's), so its cached bytecode is used; run
#: by path, the script would be compiled again at every start (+25% CPU).
_WATCHDOG_FOLDER: Final = os.path.dirname(os.path.abspath(_watchdog.__file__))
_WATCHDOG_MAIN: Final = (
    f"import sys; sys.path.append({_WATCHDOG_FOLDER!r}); import _watchdog; "
    "sys.exit(_watchdog.main(sys.argv))"
)


def register_own(pid: int) -> None:
    """Record a child corral started (a rank or a watchdog) until it is reaped."""
    _OWN_CHILDREN.add(pid)


def forget_own(pid: int) -> None:
    """The child ``pid`` corral started has been reaped."""
    _OWN_CHILDREN.discard(pid)


#: Reap zombie session leaders re-parented to this process that no scan ever
#: saw alive (see :func:`reap_zombie_children`). Off in the library: such a
#: zombie cannot be told apart from a child the host itself started with
#: ``start_new_session=True`` and will wait for. On in the CLI, which owns its
#: process: every child there is corral's.
REAP_ORPHAN_LEADERS: bool = False

#: When to note the host's children (see :func:`host_children`): after a few
#: clock ticks, so a short-lived group never pays the walk.
HOST_NOTE_DELAY: Final = 3 / os.sysconf("SC_CLK_TCK")


def host_children(since: int, token: str, table: Mapping[int, _watchdog.Stat]) -> frozenset[int]:
    """Children of this process started after ``since`` (boot ticks), except the group's.

    Start times have the resolution of a clock tick (10 ms): a child the host
    started just before a group looks as young as the group. Noting them keeps
    close from taking them for orphans. A child that carries the group's token
    is a re-parented member, not the host's.

    Args:
        since: the group's start, in boot ticks.
        token: the group's ``CORRAL_GROUP`` token.
        table: a table of (at least) every process started since ``since``.
    """
    me = os.getpid()
    token_b = token.encode()
    return frozenset(
        pid
        for pid, st in table.items()
        if st.ppid == me and st.starttime >= since and not _watchdog.has_token(pid, token_b)
    )


def snapshot() -> dict[int, _watchdog.Stat]:
    """Every process but this one (empty where there is no ``/proc``)."""
    if not _platform.HAS_PROC:
        return {}
    return _watchdog.proc_table(skip=(os.getpid(),))


#: What walks of ``/proc`` read, for the next ones: pid -> (the inode number
#: of ``/proc/PID``, start tick), and the counters read just before.
_SEEN: dict[int, tuple[int, int]] = {}
_SEEN_AT: Counters | None = None


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


#: Whether the inode of ``/proc/PID`` alone proves a pid was not recycled. From
#: 5.7 to 6.14 the kernel freed a pid a moment before dropping its ``/proc``
#: entry: a new process given that pid then could show the old inode. There,
#: only the pid cursor's range (a recent last walk) lets a walk skip a process.
_INODES_SAFE: Final = _kernel_at_least(6, 14)


def _proc_entries() -> list[tuple[int, int]]:
    """``(pid, inode of /proc/PID)`` of every process, from one read of ``/proc``."""
    with os.scandir("/proc") as entries:
        return [(int(e.name), e.inode()) for e in entries if e.name.isdigit()]


def walk(since: int, at: Counters | None = None) -> dict[int, _watchdog.Stat]:
    """Every process but this one started at or after ``since`` (boot ticks).

    Every membership rule concerns only such young processes. Reading
    ``/proc/PID/stat`` costs about 7 us a process; a walk reads it only for
    processes it does not already know to be older than ``since``. A
    process is known when an earlier walk read it under the same pid *and*
    nothing can have put a new process under that pid since:

    * the pid is outside the range the pid cursor handed out since that walk
      (:class:`Counters`; only while no lap of the free pids was possible),
      or, past that and only on kernels from 6.14 on (:data:`_INODES_SAFE`),
    * the inode of ``/proc/PID`` (given free by the listing) is the same: a
      new process under a recycled pid has a new ``struct pid``, so a new
      inode. (Inode 1 is what the kernel reports when it could not make one:
      never trusted.)

    So a walk after the first one in a process costs one listing plus one
    read per young (or new) process, whatever the machine runs.

    Args:
        since: boot ticks; older processes are not returned.
        at: :func:`counters` read just before (read now if not given).
    """
    global _SEEN, _SEEN_AT
    if not _platform.HAS_PROC:
        return {}
    me = os.getpid()
    seen, before = _SEEN, _SEEN_AT
    if at is None:
        at = counters()  # before the listing
    handed_out = _handed_out(before, at)
    now: dict[int, tuple[int, int]] = {}
    table: dict[int, _watchdog.Stat] = {}
    for pid, ino in _proc_entries():
        if pid == me:
            continue
        known = seen.get(pid)
        if (
            known is not None
            and known[1] < since
            and known[0] == ino
            and ino > 1
            and (
                not handed_out[0] < pid <= handed_out[1] if handed_out is not None else _INODES_SAFE
            )
        ):
            now[pid] = known
            continue
        st = _watchdog.read_stat(pid)
        if st is None:
            continue  # gone since the listing
        now[pid] = (ino, st.starttime)
        if st.starttime >= since:
            table[pid] = st
    _SEEN, _SEEN_AT = now, at
    return table


def _handed_out(before: Counters | None, now: Counters) -> tuple[int, int] | None:
    """``(low, high)``: the pids allocated between two readings are in ``low < pid <= high``.

    None when that cannot be known: no cursor, a wrap, or time enough for a
    lap of the free pids.
    """
    if before is None or before.cursor is None or now.cursor is None or now.tasks is None:
        return None
    if now.cursor < before.cursor or now.at - before.at > _cursor_window(now.tasks):
        return None
    return before.cursor, now.cursor


@dataclass(frozen=True, slots=True)
class Counters:
    """Two kernel counters of process creation, read together (see :class:`Census`)."""

    #: The last pid allocated in this pid namespace (``/proc/loadavg``'s last
    #: field): ``alloc_pid()`` moves it for every new process or thread, at
    #: the very start of the fork, even one that then fails.
    cursor: int | None
    #: The tasks that exist now (``/proc/loadavg``'s fourth field, after the /).
    tasks: int | None
    #: Successful forks since boot, machine-wide (``processes`` in
    #: ``/proc/stat``): counted at the very end of a fork, in the same critical
    #: section that makes the new task visible in ``/proc``.
    forks: int | None
    #: ``time.monotonic()`` when they were read.
    at: float


def counters() -> Counters:
    """Read the counters now (``None`` fields where they cannot be trusted)."""
    at = time.monotonic()
    if not _counters_usable():
        return Counters(None, None, None, at)
    cursor = tasks = None
    if _CURSOR_OK:
        cursor, tasks = _read_loadavg()
    return Counters(cursor, tasks, _read_forks() if _FORKS_OK else None, at)


def _read_loadavg() -> tuple[int | None, int | None]:
    """``/proc/loadavg``: ``(last pid allocated, tasks)``, e.g. ``0.39 0.51 0.63 1/73 12345``."""
    try:
        fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fields = os.read(fd, 256).split()
        finally:
            os.close(fd)
        return int(fields[4]), int(fields[3].partition(b"/")[2])
    except (OSError, ValueError, IndexError):
        return None, None


def _read_forks() -> int | None:
    # The line comes after the per-CPU and interrupt lines: a few KiB on a
    # small machine, more on a big one. Read in chunks until it is complete.
    try:
        fd = os.open("/proc/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = b""
        while chunk := os.read(fd, 16384):
            data += chunk
            start = data.find(b"\nprocesses ")
            end = data.find(b"\n", start + 1) if start >= 0 else -1
            if end >= 0:
                return int(data[start + 11 : end])
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)
    return None


#: An upper bound on pid allocations per second per CPU, failed forks included
#: (about 170 000 were measured on one vCPU with a fork failing on a pids
#: cgroup limit, the cheapest kind): with a 3x margin.
_ALLOCS_PER_CPU_S: Final = 500_000


def _cursor_window(tasks: int) -> float:
    """How long an unchanged cursor span is proof that nothing else allocated a pid (seconds).

    The cursor could come back to an expected value only after a full lap of
    the free pids (``pid_max`` - 300 reserved - the ``tasks`` holding one),
    which takes at least this long at :data:`_ALLOCS_PER_CPU_S`.
    """
    if _PID_MAX is None:
        return 0.0
    free = _PID_MAX - 300 - tasks
    return min(1.0, max(0, free) / ((os.cpu_count() or 1) * _ALLOCS_PER_CPU_S))


def _read_pid_max() -> int | None:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _mounted_over() -> set[str]:
    """Files of ``/proc`` that something mounted over (LXCFS's virtualised ``loadavg``...)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            points = {line.split()[4] for line in f if len(line.split()) > 4}
    except OSError:
        return set()
    return {p.decode(errors="replace") for p in points}


def _counters_usable() -> bool:
    """Probe once (lazily: not at import) whether the counters mean what they should."""
    global _COUNTERS_OK, _CURSOR_OK, _FORKS_OK, _PID_MAX
    if _COUNTERS_OK is None:
        # /proc must show this process's own pid namespace, or its pids (and
        # the cursor's) mean something else.
        same_ns = _platform.HAS_PROC  # which already means: this pid namespace's /proc
        if same_ns:
            # A file mounted over the kernel's (LXCFS serves a loadavg of its
            # own, refreshed every few seconds) is not the kernel's counter.
            over = _mounted_over()
            _CURSOR_OK = _CURSOR_OK and "/proc/loadavg" not in over
            _FORKS_OK = _FORKS_OK and "/proc/stat" not in over
            _PID_MAX = _read_pid_max()
        _COUNTERS_OK = same_ns
    return _COUNTERS_OK


#: ``/proc`` shows this process's pid namespace; None until probed.
_COUNTERS_OK: bool | None = None
#: Each counter is turned off for good if it is not the kernel's own or if it
#: ever misses processes this process itself started (some sandboxes).
_CURSOR_OK = True
_FORKS_OK = True
_PID_MAX: int | None = None


def _nothing_new(before: Counters, now: Counters) -> bool:
    """True when no task became visible in ``/proc`` between two readings.

    Only the fork count can say so: it is counted in the same critical
    section that makes a new task visible, so a task not in a walk that
    followed ``before`` (a fork still in flight then) moves it. The cursor
    cannot: it moves when a fork *starts*, and a fork that started before
    ``before`` may become visible only after the walk.
    """
    return before.forks is not None and now.forks is not None and now.forks == before.forks


def _only_own_allocated(start: Counters, now: Counters, own: Collection[int]) -> bool:
    """True when, since ``start``, no pid was allocated in this namespace but ``own``'s.

    Only the cursor can say so: it moves when a fork starts, so a descendant
    still being forked has already moved it; the fork count would not have.
    Trusted within the time a lap of the free pids takes, and only if it has
    seen all of ``own``.
    """
    if start.cursor is None or now.cursor is None or now.tasks is None or not own:
        return False
    return (
        now.cursor - start.cursor == len(own)
        and now.cursor >= max(own)
        and now.at - start.at <= _cursor_window(now.tasks)
    )


class Census:
    """The ``/proc`` tables of one group, walking no more of ``/proc`` than it must.

    Every membership rule concerns only descendants of the ranks, created
    after the group started. Two kernel counters (:class:`Counters`) tell
    whether any such process can exist, so a full walk of ``/proc`` (one read
    per process on the machine, about 1 ms per 100) is skipped when they
    prove it useless:

    * the pid cursor moved by the group's own processes (:meth:`own`) alone
      since just before the first of them: no other fork even started here,
      the ranks have no descendant; the table is empty, nothing is read;
    * the fork count has not moved since the last table: no task became
      visible since; the young processes of that table are read again (none
      at all if they were only the group's own).

    Otherwise it walks ``/proc`` (:func:`walk`: one listing, and one read
    per process not known to be older than the group). A table holds every
    process started since the group (``since``), so every descendant of the
    ranks, and the ranks too unless they have none.
    """

    def __init__(self, since: int) -> None:
        self._since = since
        self._start = counters()
        self._own: set[int] = set()
        self._last: dict[int, _watchdog.Stat] | None = None
        self._last_counters = self._start

    def own(self, pid: int) -> None:
        """Count a process the group started (a rank or its watchdog)."""
        self._own.add(pid)

    def check(self) -> None:
        """After the start: each counter must have counted the group's own processes."""
        global _CURSOR_OK, _FORKS_OK
        now = counters()
        own = len(self._own)
        before = self._start
        if (
            before.cursor is not None
            and now.cursor is not None
            and before.cursor <= now.cursor < before.cursor + own
        ):
            _CURSOR_OK = False
            _log.debug("corral: /proc/loadavg's pid cursor lags behind: not used")
        if before.forks is not None and now.forks is not None and now.forks - before.forks < own:
            _FORKS_OK = False
            _log.debug("corral: /proc/stat's fork count lags behind: not used")

    def take(self) -> dict[int, _watchdog.Stat]:
        """A table of every descendant of the group's ranks (see the class docstring)."""
        if not _platform.HAS_PROC:
            return {}
        now = counters()  # before any read: what becomes visible later moves them
        last = self._last
        if last is not None and _nothing_new(self._last_counters, now):
            if self._own.issuperset(last):  # no descendant then, none created since
                return self._keep({}, now)
            return self._keep(_read_stats(last), now)
        if _only_own_allocated(self._start, now, self._own):
            return self._keep({}, now)
        return self._keep(walk(self._since, now), now)

    def full(self) -> dict[int, _watchdog.Stat]:
        """Every process started since the group: a walk (also the base of later tables)."""
        now = counters()
        return self._keep(walk(self._since, now), now)

    def _keep(self, table: dict[int, _watchdog.Stat], now: Counters) -> dict[int, _watchdog.Stat]:
        self._last, self._last_counters = table, now
        return table


def _read_stats(pids: Iterable[int]) -> dict[int, _watchdog.Stat]:
    table = {}
    for pid in pids:
        st = _watchdog.read_stat(pid)
        if st is not None:
            table[pid] = st
    return table


def scan(
    token: str,
    sessions: Collection[int],
    since: int,
    exclude: Collection[int],
    table: Mapping[int, _watchdog.Stat] | None = None,
    unsure: set[int] | None = None,
) -> list[Member]:
    """Return the live or zombie descendants of a group, found without parent links.

    Args:
        token: the group's ``CORRAL_GROUP`` token.
        sessions: the unreaped ranks' pids (each rank leads its own session).
        since: boot ticks when the group started; older processes never match by session.
        exclude: pids never to report (the ranks themselves).
        table: a :func:`snapshot` to use instead of a fresh one.
        unsure: receives our children that may be members caught mid-``execve``
            (see ``_watchdog.members``): scan again shortly.
    """
    if not _platform.HAS_PROC:
        if _platform.FOREIGN_PROC:
            _warn_foreign_proc()
            return []
        return _scan_psutil(sessions, exclude)
    if table is None:
        table = snapshot()
    found = _watchdog.members(
        table,
        token.encode(),
        set(sessions),
        since,
        exclude,
        None if unsure is None else (os.getpid(), unsure),
    )
    return [
        Member(pid=pid, ppid=st.ppid, starttime=st.starttime, zombie=st.zombie)
        for pid, st in sorted(table.items())
        if pid in found
    ]


_FOREIGN_WARNED = False


def _warn_foreign_proc() -> None:
    global _FOREIGN_WARNED
    if not _FOREIGN_WARNED:
        _FOREIGN_WARNED = True
        _log.warning(
            "corral: /proc shows another pid namespace than this process's (remount it, "
            "e.g. unshare --mount-proc): descendants that leave a rank's process group "
            "cannot be found, and there is no watchdog"
        )


def _scan_psutil(sessions: Iterable[int], exclude: Collection[int]) -> list[Member]:
    import psutil

    found: dict[int, Member] = {}
    for pid in sessions:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.pid not in exclude:
                        found[child.pid] = Member(
                            pid=child.pid,
                            ppid=child.ppid(),
                            starttime=int(child.create_time() * 100),
                            zombie=child.status() == psutil.STATUS_ZOMBIE,
                        )
    return list(found.values())


def open_member(member: Member) -> int | None:
    """Return a pidfd for ``member`` if it is still the same process, else None.

    Checking the start time after ``pidfd_open`` pins the identity: the pidfd
    then refers to exactly the process the scan saw, even if its pid is later
    recycled.
    """
    fd = _platform.pidfd_open(member.pid)
    if fd is None:
        return None
    if _platform.HAS_PROC:
        st = _watchdog.read_stat(member.pid)
        if st is None or st.starttime != member.starttime:
            os.close(fd)
            return None
    return fd


def signal_member(member: Member, pidfd: int | None, sig: int) -> None:
    """Send ``sig`` to one member, through its pidfd when there is one."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(member.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or never ours to signal)


def reap_member(member: Member, pidfd: int | None) -> bool:
    """Reap ``member`` if it has exited and is our (re-parented) child; True if reaped.

    With a pidfd the ``waitid(P_PIDFD)`` can only ever reap that very process.
    """
    try:
        if pidfd is not None and _HAS_P_PIDFD:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            return info is not None
        if _platform.HAS_PROC:
            st = _watchdog.read_stat(member.pid)
            if st is None or st.starttime != member.starttime:
                return False
        got, _ = os.waitpid(member.pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child: its own parent reaps it
    return got == member.pid


def reap_zombie_children(
    known: Mapping[int, int],
    sessions: Collection[int],
    since: int,
    table: Mapping[int, _watchdog.Stat] | None = None,
    host: Collection[int] | None = None,
    younger: int | None = None,
) -> int:
    """Reap every zombie child of this process that is a member of the group.

    Call it once no member is alive any more: the zombies in ``table`` are
    then every member left unreaped.

    A member is known by ``(pid, starttime)`` from an earlier scan (a zombie's
    environment can no longer be read, so a ``setsid`` daemon is recognised
    only that way) or matches the session rule now.

    One more kind is reaped: an orphan that led its own session (``setsid``),
    started after the group, died before any scan saw it alive, and was
    re-parented to us as the subreaper, e.g. a rank's
    ``Popen(start_new_session=True)`` child that was never waited for. It
    cannot be told apart from a child the host itself started with
    ``start_new_session=True`` while the group ran and has not reaped yet,
    other than by not being one of corral's own children (any group's), by
    having started after the group, and by not being in ``host``, the host's
    young children noted shortly after the group started (start times are only
    accurate to a tick); without ``host`` (a group shorter than
    ``HOST_NOTE_DELAY``) it must have started at tick ``younger`` or later:
    the tick after the first rank's own start tick, read from the same clock,
    so no child the host had before the group can qualify. That narrow case
    is the documented limit.

    Returns:
        How many were reaped.
    """
    if not _platform.HAS_PROC:
        return 0
    me = os.getpid()
    if table is None:
        table = snapshot()
    session_set = set(sessions)
    reaped = 0
    for pid, st in table.items():
        # The ranks themselves (the sessions' leaders) are the group's to reap.
        if not st.zombie or st.ppid != me or pid in session_set:
            continue
        member_now = known.get(pid) == st.starttime or (
            st.sid in session_set and st.starttime >= since
        )
        orphan_leader = (
            REAP_ORPHAN_LEADERS
            and st.sid == pid
            and pid not in _OWN_CHILDREN
            and (
                younger is not None and st.starttime >= younger
                if host is None
                else st.starttime >= since and pid not in host
            )
        )
        if not (member_now or orphan_leader):
            continue
        member = Member(pid=pid, ppid=me, starttime=st.starttime, zombie=True)
        fd = open_member(member)
        try:
            if (fd is not None or not _platform.HAS_PIDFD) and reap_member(member, fd):
                reaped += 1
        finally:
            if fd is not None:
                os.close(fd)
    return reaped


class Watchdog:
    """The supervisor's end of a group's watchdog process (see ``_watchdog``).

    It is started before the first rank (held at ``_GATE`` until the ranks
    are started) and told each rank's pid; nothing waits for it to be ready
    (the pipe holds the pids until it reads them, and a watchdog that starts
    after the supervisor died still finds the group).
    """

    def __init__(self, popen: subprocess.Popen[bytes], fd: int) -> None:
        self._popen = popen
        self._fd: int | None = fd
        self._pending = b""
        self._opened = False
        self._writer_loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int:
        """The watchdog's process id."""
        return self._popen.pid

    @classmethod
    def start(cls, token: str, since: int) -> Watchdog | None:
        """Start the watchdog of a group, or return None where there is none (logged).

        Linux with pidfds only: the watchdog pins processes with pidfds and
        finds them in ``/proc``.
        """
        if not (_platform.HAS_PROC and _platform.HAS_PIDFD) or not sys.executable:
            return None
        program = [*_GATE, sys.executable, "-I", "-S", "-c", _WATCHDOG_MAIN]
        program += [str(os.getpid()), token, str(since)]
        read_end, write_end = os.pipe()
        try:
            popen = _spawn_watchdog(program, read_end)
        except OSError as exc:
            os.close(write_end)
            _log.warning(
                "corral: no watchdog for this group (%s): if this process is "
                "killed, its ranks survive it",
                exc,
            )
            return None
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)
        register_own(popen.pid)
        if not _nice_prefix():  # no nice(1): lower its priority now, a little late
            with contextlib.suppress(OSError):
                mine = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PROCESS, popen.pid, min(19, mine + _WATCHDOG_NICE))
        return cls(popen, write_end)

    def add_ranks(self, loop: asyncio.AbstractEventLoop, pids: Iterable[int]) -> None:
        """Tell the watchdog about ranks (never blocks: a full pipe is flushed by the loop)."""
        if self._fd is None:
            return
        if not self._opened:  # an empty line opens the gate (the interpreter ignores it)
            self._opened = True
            self._pending += b"\n"
        self._pending += b"".join(b"%d\n" % pid for pid in pids)
        if self._writer_loop is None:
            self._flush()
            if self._pending and self._fd is not None:
                self._writer_loop = loop
                loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            while self._pending:
                n = os.write(fd, self._pending)
                self._pending = self._pending[n:]
        except BlockingIOError:
            return
        except OSError as exc:  # the watchdog died: nothing more to tell it
            _log.warning("corral: the group's watchdog is gone: %s", exc)
            self._pending = b""
        if self._writer_loop is not None:
            self._writer_loop.remove_writer(fd)
            self._writer_loop = None

    async def stop(self) -> None:
        """End the watchdog (SIGKILL: its work is done) and reap it."""
        await self.stop_soon()

    def stop_soon(self) -> asyncio.Future[None]:
        """SIGKILL the watchdog now; the future resolves once it is reaped.

        The kernel tears the watchdog down while the caller goes on with other
        clean-up, instead of waiting for it first.
        """
        return self._end(kill=True)

    def release(self) -> asyncio.Future[None]:
        """Close the pipe: the watchdog kills what is left of the group, then exits.

        For a close that failed before the group was known dead. The future
        resolves once the watchdog is reaped.
        """
        return self._end(kill=False)

    def _end(self, *, kill: bool) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        popen = self._popen
        if popen.returncode is not None:
            self._close_pipe()
            done.set_result(None)
            return done

        def on_exit(code: int) -> None:
            popen.returncode = code
            forget_own(popen.pid)
            if kill and code != -signal.SIGKILL:
                _log.warning(
                    "corral: the group's watchdog had exited early (code %d): the group "
                    "was not protected against the death of this process",
                    code,
                )
            self._close_pipe()
            if not done.done():
                done.set_result(None)

        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)  # still our unreaped child: no reuse race
        else:
            self._close_pipe()  # end of file: it sweeps the group and exits
        _platform.watch_exit(loop, popen.pid, on_exit)
        return done

    def abandon(self) -> None:
        """Close the pipe without stopping the watchdog: it kills the group and exits.

        For a group that was never closed (``Group.__del__``); the watchdog is
        reaped later by ``subprocess``'s own clean-up of abandoned children.
        """
        self._close_pipe()

    def _close_pipe(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._writer_loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._writer_loop.remove_writer(fd)
            self._writer_loop = None
        os.close(fd)
