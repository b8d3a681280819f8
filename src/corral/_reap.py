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
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import _platform, _watchdog

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Collection, Iterable, Mapping

__all__ = (
    "Member",
    "Watchdog",
    "boot_ticks_now",
    "open_member",
    "reap_member",
    "reap_zombie_children",
    "scan",
    "signal_member",
    "snapshot",
)

_log = logging.getLogger("corral")


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

#: The watchdog is started before the first rank, so that no rank ever lives
#: without one; but its interpreter's start-up (~7 ms of CPU) would then
#: compete with the ranks' own. A shell holds it at this gate, blocked on a
#: pipe of its own, until end of file (the supervisor closed it once the ranks
#: were started, or died): then it ``exec``s the interpreter.
_GATE: Final = (
    ["/bin/sh", "-c", 'read -r _; exec "$0" "$@"'] if os.access("/bin/sh", os.X_OK) else []
)


def _spawn_watchdog(program: list[str], stdin: int, pids: int) -> subprocess.Popen[bytes]:
    """Start ``program``, then lower its priority.

    Lowered after ``Popen`` returns, and still before its interpreter runs:
    the gate holds it until the ranks are started.
    """
    popen = _platform.spawn_helper(program, stdin, pass_fds=(pids,))
    with contextlib.suppress(OSError):
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, popen.pid, min(19, mine + _WATCHDOG_NICE))
    return popen


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
        if pidfd is not None and _platform.HAS_P_PIDFD:
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
    *,
    orphan_leaders: bool = False,
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
            orphan_leaders
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

    It is started before the first rank, held at ``_GATE`` (a shell blocked
    reading a pipe of its own) until the ranks are started, and told each
    rank's pid as soon as the rank exists, through a second pipe: a
    supervisor killed between two ranks leaves a watchdog that knows every
    rank started so far. Nothing waits for it to be ready.
    """

    def __init__(self, popen: subprocess.Popen[bytes], fd: int, gate: int | None) -> None:
        self._popen = popen
        self._fd: int | None = fd
        self._gate: int | None = gate
        self._pending = b""
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
        pids_read, pids_write = os.pipe()
        gate_read, gate_write = os.pipe()
        program = [*_GATE, sys.executable, "-I", "-S", "-c", _WATCHDOG_MAIN]
        program += [str(os.getpid()), token, str(since), str(pids_read)]
        try:
            popen = _spawn_watchdog(program, gate_read, pids_read)
        except OSError as exc:
            os.close(pids_write)
            os.close(gate_write)
            _log.warning(
                "corral: no watchdog for this group (%s): if this process is "
                "killed, its ranks survive it",
                exc,
            )
            return None
        finally:
            os.close(pids_read)
            os.close(gate_read)
        os.set_blocking(pids_write, False)
        register_own(popen.pid)
        return cls(popen, pids_write, gate_write)

    def add_ranks(self, loop: asyncio.AbstractEventLoop, pids: Iterable[int]) -> None:
        """Tell the watchdog about ranks (never blocks: a full pipe is flushed by the loop)."""
        if self._fd is None:
            return
        self._pending += b"".join(b"%d\n" % pid for pid in pids)
        if self._writer_loop is None:
            self._flush()
            if self._pending and self._fd is not None:
                self._writer_loop = loop
                loop.add_writer(self._fd, self._flush)

    def open_gate(self) -> None:
        """Let the watchdog's interpreter start (end of file at the gate)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            os.close(gate)

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
        self.open_gate()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._writer_loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._writer_loop.remove_writer(fd)
            self._writer_loop = None
        os.close(fd)
