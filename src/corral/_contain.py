"""Containment: how a group's processes are kept together and ended. One interface, two mechanisms.

``Group`` (policy: when to close, which signal first, how long the grace is)
talks to a :class:`Containment` only through these steps:

1. :meth:`~Containment.spawning` wraps each rank's ``fork``;
   :meth:`~Containment.started` is told the ranks' pids.
2. :meth:`~Containment.end` signals the group (the first signal, then
   SIGKILL once the grace is over) and returns when nothing of it is alive.
3. :meth:`~Containment.finish` returns when the last trace is gone (after the
   ranks are reaped); :meth:`~Containment.abort` is the safety net of a close
   that failed midway, :meth:`~Containment.abandon` the one of a group never
   closed.

The mechanisms:

* :class:`NamespaceContainment` (``_pidns``): the group lives in a PID
  namespace of its own. The kernel ends every process in it when its init
  dies, and the init dies with the supervisor. Exact; needs ``CAP_SYS_ADMIN``.
* :class:`WalkContainment` (``_reap``, ``_watchdog``): descendants are found
  by walking ``/proc`` (session ids, a token in the environment, parent
  links), a watchdog process kills the group if the supervisor dies, and
  the supervisor is the subreaper of the group's orphans. The fallback
  everywhere else; its limit is in the README.

A restart, a rendezvous step or an event stream never needs to know which
mechanism runs: that is the point of this interface.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import signal
from typing import TYPE_CHECKING, Final, Protocol

from . import _platform, _reap, _watchdog
from ._pidns import Namespace

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

__all__ = ("Containment", "NamespaceContainment", "Ranks", "Tracked", "WalkContainment", "open")

_log = logging.getLogger("corral")

#: Longest wait for the watchdog to sweep a group whose close failed.
_SWEEP_TIMEOUT: Final = 5.0
#: How many kill-and-rescan rounds before giving up on a process that keeps forking.
_KILL_ROUNDS: Final = 20
#: Longest wait for a namespace's init to be reaped once its processes are (it is immediate).
_INIT_TIMEOUT: Final = 5.0


class Ranks(Protocol):
    """What a containment needs from the group it contains."""

    def held_pids(self) -> list[int]:
        """The unreaped ranks' pids: also their sessions' and process groups' ids."""

    def any_alive(self) -> bool:
        """Whether a rank has not exited yet."""

    def signal_ranks(self, sig: int) -> None:
        """Send ``sig`` to every unreaped rank's process group."""

    async def wait_dead(self, tracked: Tracked, *, use_deadline: bool) -> None:
        """Until no rank and nothing in ``tracked`` is alive (or the grace deadline passes)."""


class Tracked:
    """Descendants being ended: pidfds and their exits, event-driven.

    Every process seen is remembered with its start time (``seen``): once
    dead its environment is unreadable, and that record is how a re-parented
    zombie is still recognised as the group's. One that turns out to be our
    child (re-parented to us, the subreaper) is reaped through its pidfd as
    soon as it exits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.live: dict[int, tuple[_reap.Member, int | None]] = {}
        self.seen: dict[int, int] = {}
        self._changed = asyncio.Event()

    def add(self, members: Iterable[_reap.Member]) -> list[_reap.Member]:
        """Track ``members``; returns those that are new and alive."""
        added = []
        for m in members:
            self.seen[m.pid] = m.starttime
            if m.zombie or m.pid in self.live:
                continue
            fd = _reap.open_member(m)
            if fd is None and _platform.HAS_PIDFD:
                continue  # already gone
            self.live[m.pid] = (m, fd)
            if fd is not None:
                self._loop.add_reader(fd, self._on_exit, m.pid)
            added.append(m)
        return added

    def _on_exit(self, pid: int) -> None:
        entry = self.live.pop(pid, None)
        if entry is not None and entry[1] is not None:
            member, fd = entry[0], entry[1]
            self._loop.remove_reader(fd)
            _reap.reap_member(member, fd)
            os.close(fd)
        self._changed.set()

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every tracked process still alive."""
        for member, fd in list(self.live.values()):
            _reap.signal_member(member, fd, sig)

    def forget_untracked(self) -> None:
        """Without pidfds, exits cannot be awaited: consider SIGKILLed members ended."""
        for pid, (_m, fd) in list(self.live.items()):
            if fd is None:
                del self.live[pid]

    async def changed(self) -> None:
        """Return at the next exit of a tracked process."""
        await self._changed.wait()
        self._changed.clear()

    def close(self) -> None:
        """Stop tracking (close every pidfd)."""
        for pid in list(self.live):
            self._on_exit(pid)


class Containment(abc.ABC):
    """One group's containment (see the module docstring for the protocol)."""

    #: Short name, for logs and the README: ``"pid-namespace"`` or ``"walk"``.
    kind: str

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tracked = Tracked(loop)
        self._loop = loop

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Wrap one rank's (synchronous) ``fork``."""
        yield

    def started(self, pid: int) -> None:  # noqa: B027  (optional hook)
        """Rank ``pid`` was just started."""

    def all_started(self, pids: list[int]) -> None:  # noqa: B027  (optional hook)
        """Every rank was started (``pids``: those that run)."""

    def closing(self) -> None:  # noqa: B027  (optional hook)
        """The group began to close: stop background work."""

    @abc.abstractmethod
    async def end(self, ranks: Ranks, first_signal: int) -> None:
        """Signal, wait the grace, SIGKILL; return once nothing of the group is alive.

        Every rank has exited when it returns (they may be unreaped zombies).
        A group whose ranks all exited and left nothing behind gets no signal.
        """

    @abc.abstractmethod
    async def finish(self) -> None:
        """After the ranks are reaped: wait until the last trace of the group is gone."""

    @abc.abstractmethod
    async def abort(self, ranks: Ranks) -> None:
        """A close failed before the group was known dead: end it by other means (bounded)."""

    def release(self) -> None:  # noqa: B027  (optional hook)
        """Give back process-wide resources (after the close)."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """The group was never closed (``Group.__del__``): kill what is left, never block."""


class NamespaceContainment(Containment):
    """The group's own PID namespace (see ``_pidns``)."""

    kind = "pid-namespace"

    def __init__(self, loop: asyncio.AbstractEventLoop, ns: Namespace) -> None:
        super().__init__(loop)
        self._ns = ns

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        with self._ns.entered():
            yield

    async def end(self, ranks: Ranks, first_signal: int) -> None:
        ns = self._ns
        if ranks.any_alive() or ns.has_members():
            # The graceful part: the first signal reaches every rank's process
            # group and every descendant that exists now (found first, pinned
            # by pidfds); one born later, e.g. a helper a rank starts on
            # SIGTERM to save its work, is left to finish its job within the
            # grace period, then ended by the final SIGKILL with the rest.
            self.tracked.add(_members(ns.members(ranks.held_pids())))
            ranks.signal_ranks(first_signal)
            self.tracked.signal_all(first_signal)
            await ranks.wait_dead(self.tracked, use_deadline=True)
        # Exact: the kernel SIGKILLs every process of the namespace.
        ns.kill()
        self.tracked.signal_all(signal.SIGKILL)
        await ranks.wait_dead(self.tracked, use_deadline=False)

    async def finish(self) -> None:
        try:
            async with asyncio.timeout(_INIT_TIMEOUT):
                await asyncio.shield(self._ns.wait_gone(self._loop))
        except TimeoutError:
            _log.error("corral: the init of a group's pid namespace was not reaped")

    async def abort(self, ranks: Ranks) -> None:
        self._ns.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SWEEP_TIMEOUT):
                await ranks.wait_dead(self.tracked, use_deadline=False)

    def abandon(self) -> None:
        self._ns.abandon()


def _members(pids: Iterable[int]) -> list[_reap.Member]:
    found = []
    for pid in pids:
        st = _watchdog.read_stat(pid)
        if st is not None:
            found.append(
                _reap.Member(pid=pid, ppid=st.ppid, starttime=st.starttime, zombie=st.zombie)
            )
    return found


class WalkContainment(Containment):
    """Find the group by walking ``/proc``; a watchdog for the supervisor's death."""

    kind = "walk"

    def __init__(
        self, loop: asyncio.AbstractEventLoop, token: str, *, reap_orphan_leaders: bool
    ) -> None:
        super().__init__(loop)
        self._token = token
        self._reap_orphan_leaders = reap_orphan_leaders
        self._since = _reap.boot_ticks_now()
        self._sessions: list[int] = []
        self._host_children: frozenset[int] | None = None
        self._host_note: asyncio.TimerHandle | None = None
        self._watchdog_gone: asyncio.Future[None] | None = None
        self._subreaper = True
        _platform.acquire_subreaper()
        # Before any rank: a supervisor killed right after starting one must
        # already have a watchdog (it finds ranks by their token until it is
        # told their pids). Nothing waits for it to be ready.
        self._watchdog = _reap.Watchdog.start(token, self._since)

    def started(self, pid: int) -> None:
        _reap.register_own(pid)
        self._sessions.append(pid)
        if self._watchdog is not None:
            self._watchdog.add_ranks(self._loop, [pid])

    def all_started(self, pids: list[int]) -> None:
        if self._watchdog is not None:
            self._watchdog.open_gate()
        # Off the start's critical path, and never for a group shorter than a
        # few clock ticks: which young children the host has, so close can
        # tell a re-parented orphan from them (see _reap_orphans).
        self._host_note = self._loop.call_later(_reap.HOST_NOTE_DELAY, self._note_host_children)

    def _note_host_children(self) -> None:
        if self._host_children is None and _platform.HAS_PROC:
            self._host_children = _reap.host_children(self._since, self._token, _reap.snapshot())

    def closing(self) -> None:
        if self._host_note is not None:
            self._host_note.cancel()

    async def end(self, ranks: Ranks, first_signal: int) -> None:
        # 1. Snapshot descendants first: once a rank dies its children are
        #    re-parented and parent links no longer lead to them.
        table: Mapping[int, _watchdog.Stat] | None = _reap.snapshot()
        unsure: set[int] = set()
        found = self._scan(ranks, table, unsure)
        self.tracked.add(found)
        # 2. Unless every rank exited on its own and nothing of the group is
        #    left (the usual end of a good run: one walk, no signal), end it.
        if found or unsure or ranks.any_alive():
            table = await self._terminate(ranks, first_signal)
        # 3. The group is dead: the watchdog has nothing left to guard. It is
        #    SIGKILLed now and awaited last, so the kernel's teardown of it
        #    (~0.6 ms for a Python process) overlaps with the rest.
        if self._watchdog is not None:
            self._watchdog_gone = self._watchdog.stop_soon()
        # 4. Reap the member zombies re-parented to us (in the last scan: no
        #    member is alive to add more); the ranks are reaped by the group.
        self._reap_orphans(ranks, table)

    async def _terminate(
        self, ranks: Ranks, first_signal: int
    ) -> Mapping[int, _watchdog.Stat] | None:
        """First signal, grace, SIGKILL and rescan until nothing of the group is alive.

        Returns:
            The last ``/proc`` walk (no member alive in it), for reaping zombies.
        """
        tracked = self.tracked
        ranks.signal_ranks(first_signal)
        tracked.signal_all(first_signal)
        await ranks.wait_dead(tracked, use_deadline=True)  # ends early when all are gone
        # SIGKILL what remains; rescan until a scan finds no live member after
        # every rank is dead (one scan when all went on the first signal).
        table = None
        unsure: set[int] = set()
        for _ in range(_KILL_ROUNDS):
            ranks.signal_ranks(signal.SIGKILL)
            tracked.signal_all(signal.SIGKILL)
            tracked.forget_untracked()
            await ranks.wait_dead(tracked, use_deadline=False)
            table = _reap.snapshot()
            unsure = set()
            if not tracked.add(self._scan(ranks, table, unsure)) and not ranks.any_alive():
                if not unsure:
                    break
                # A child of ours may be mid-execve, its environment not set
                # up yet: look again once the exec is through (rare, bounded).
                await asyncio.sleep(_watchdog.UNSURE_RETRY)
        else:
            if unsure:  # children with an empty environment of their own, most likely
                _log.debug("corral: children %s never showed an environment", sorted(unsure))
            else:
                _log.error("corral: processes of a group kept appearing after SIGKILL")
        return table

    def _scan(
        self,
        ranks: Ranks,
        table: Mapping[int, _watchdog.Stat] | None = None,
        unsure: set[int] | None = None,
    ) -> list[_reap.Member]:
        sessions = ranks.held_pids()
        # The watchdog is never a member; starting, it shows no environment yet.
        exclude = [*sessions, self._watchdog.pid] if self._watchdog is not None else sessions
        return _reap.scan(self._token, sessions, self._since, exclude, table, unsure)

    def _reap_orphans(self, ranks: Ranks, table: Mapping[int, _watchdog.Stat] | None) -> None:
        """Reap the zombies of members re-parented to us (we are their subreaper)."""
        sessions = ranks.held_pids()
        if table is None:
            table = _reap.snapshot()
        younger = None
        if self._host_children is None and sessions and _platform.HAS_PROC:
            # The ranks are held (unreaped): the table has their start tick,
            # on the same clock as every other process's.
            ticks = [st.starttime for pid in sessions if (st := table.get(pid))]
            younger = min(ticks) + 1 if ticks else None
        _reap.reap_zombie_children(
            self.tracked.seen,
            sessions,
            self._since,
            table,
            host=self._host_children,
            younger=younger,
            orphan_leaders=self._reap_orphan_leaders,
        )

    async def finish(self) -> None:
        for pid in self._sessions:
            _reap.forget_own(pid)
        if self._watchdog_gone is not None:
            await self._watchdog_gone

    async def abort(self, ranks: Ranks) -> None:
        if self._watchdog is None or self._watchdog_gone is not None:
            return
        # The watchdog sweeps what is left of the group, then exits. Wait for
        # it (bounded) so the ranks' exits are in when they are reaped.
        self._watchdog_gone = self._watchdog.release()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SWEEP_TIMEOUT):
                await asyncio.shield(self._watchdog_gone)
                await ranks.wait_dead(self.tracked, use_deadline=False)
        with contextlib.suppress(OSError):  # once more: the failure may have passed
            self._reap_orphans(ranks, None)

    def release(self) -> None:
        if self._subreaper:
            self._subreaper = False
            _platform.release_subreaper()

    def abandon(self) -> None:
        if self._watchdog is not None:
            # End of file: the watchdog sweeps the rest of the group.
            self._watchdog.abandon()
        self.release()


def open(
    loop: asyncio.AbstractEventLoop,
    token: str,
    *,
    pid_namespace: bool | None,
    reap_orphan_leaders: bool,
) -> Containment:
    """The containment for a new group: its own PID namespace where possible, else the walk.

    Args:
        pid_namespace: ``True`` requires a namespace (``OSError`` if the kernel
            refuses), ``False`` never uses one, ``None`` follows the
            ``CORRAL_PID_NAMESPACE`` environment variable (``0``: never, ``1``:
            required) and otherwise uses one when it can.
        reap_orphan_leaders: see ``_reap.reap_zombie_children`` (walk only).

    Raises:
        OSError: a namespace was required and could not be made.
    """
    if pid_namespace is None:
        pid_namespace = _from_environment()
    if pid_namespace is not False:
        if _platform.pid_namespaces():
            try:
                return NamespaceContainment(loop, Namespace.create())
            except OSError as exc:
                if pid_namespace:
                    raise
                _log.warning("corral: no pid namespace for this group (%s): walking /proc", exc)
        elif pid_namespace:
            raise OSError(
                errno.EPERM,
                f"a PID namespace was required ({ENV}=1) but this process cannot make one "
                "(it needs Linux, CAP_SYS_ADMIN and /bin/sh)",
            )
    return WalkContainment(loop, token, reap_orphan_leaders=reap_orphan_leaders)


#: The environment variable that chooses the containment when the plan does not.
ENV: Final = "CORRAL_PID_NAMESPACE"


def _from_environment() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "no", "false", "off"):
        return False
    if value in ("1", "yes", "true", "on"):
        return True
    return None
