"""``Group``: the lifecycle of N ranks, and ``spawn``/``run``.

State machine: ``NEW -> RUNNING -> CLOSING -> CLOSED``. Every rank exit is an
event from the loop (a pidfd turning readable), so the first failure is seen
within a loop iteration of the exit. Closing is a single task, created once;
every ``close()``/``wait()``/``__aexit__`` awaits that same task through
``asyncio.shield`` and keeps awaiting it if cancelled, so clean-up always
finishes and every caller gets the same ``Result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
import warnings
from typing import TYPE_CHECKING, Final

from . import _platform, _reap, _watchdog
from ._callable import load_result
from ._config import Entrypoint, GroupPlan, RankPlan, StdSpec, _grace, build_plan
from ._errors import ConfigError, CorralError
from ._pump import Pump, open_pump
from ._record import read_error_file
from ._result import Failure, RankLogs, Result, signal_name
from ._spawn import ExecFailed, start_rank
from ._std import Std
from ._tee import Console

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

__all__ = ("Group", "run", "spawn")

_log = logging.getLogger("corral")

#: After every process of the group is dead, how long pipes may take to reach
#: EOF before they are drained and closed by force (a writer escaped the group).
DRAIN_TIMEOUT: Final = 0.5
#: A console that takes nothing for this long while a group closes is taken for
#: one nobody reads (a paused terminal): the rest of its backlog is dropped
#: (the log files have it) rather than hang the close. Long enough for a slow
#: reader starved of CPU on a loaded machine not to lose lines.
CONSOLE_STALL: Final = 2.0
#: Longest wait for the watchdog to sweep a group whose close failed.
_SWEEP_TIMEOUT: Final = 5.0
#: How many kill-and-rescan rounds before giving up on a process that keeps forking.
_KILL_ROUNDS: Final = 20
#: Pause before rescanning when a child of ours may be in the middle of an execve.
_UNSURE_RETRY: Final = 0.002


class _State(enum.IntEnum):
    NEW = 0
    RUNNING = 1
    CLOSING = 2
    CLOSED = 3


class _Rank:
    """Mutable runtime state of one rank (private to the Group)."""

    __slots__ = (
        "after_close",
        "exec_failed",
        "exit_time",
        "pid",
        "plan",
        "popen_returncode_sink",
        "pumps",
        "reaped",
        "returncode",
    )

    def __init__(self, plan: RankPlan) -> None:
        self.plan = plan
        self.pid: int | None = None
        self.returncode: int | None = None
        self.exit_time: float | None = None
        self.after_close = False
        self.exec_failed: ExecFailed | None = None
        self.pumps: list[Pump] = []
        self.popen_returncode_sink: object = None
        #: The rank is kept a zombie after its exit until the group closes,
        #: so its pid (= its session and process-group id) stays reserved.
        self.reaped = False

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.returncode is None

    @property
    def held(self) -> bool:
        """Its pid is ours (alive or an unreaped zombie): its process group can be signalled."""
        return self.pid is not None and not self.reaped


class _Killer:
    """Descendants being ended: pidfds and their exits, event-driven.

    Every member seen is remembered with its start time (``seen``): once dead
    its environment is unreadable, and that record is how a re-parented
    zombie is still recognised as ours. A member that turns out to be our
    child (re-parented to us, the subreaper) is reaped through its pidfd as
    soon as it exits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.live: dict[int, tuple[_reap.Member, int | None]] = {}
        self.seen: dict[int, int] = {}
        self._changed = asyncio.Event()

    def add(self, members: Iterable[_reap.Member]) -> list[_reap.Member]:
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
        for member, fd in list(self.live.values()):
            _reap.signal_member(member, fd, sig)

    def forget_untracked(self) -> None:
        """Without pidfds, exits cannot be awaited: consider SIGKILLed members ended."""
        for pid, (_m, fd) in list(self.live.items()):
            if fd is None:
                del self.live[pid]

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    def close(self) -> None:
        for pid in list(self.live):
            self._on_exit(pid)


class Group:
    """A running group of ranks. Create it with :func:`spawn`, enter it with ``async with``.

    Attributes:
        nprocs: the number of ranks.
        log_dir: the folder holding ``{rank}/stdout.log``, ``stderr.log``, ``error.json``.
        logs: rank -> its :class:`RankLogs`.
    """

    def __init__(self, plan: GroupPlan, console: Console | None = None) -> None:
        self._plan = plan
        self._console = console
        self._ranks = [_Rank(rp) for rp in plan.ranks]
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live = 0
        self._settled: asyncio.Event | None = None
        self._exits_changed: asyncio.Event | None = None
        self._closer: asyncio.Task[Result] | None = None
        self._deadline = 0.0
        #: The first signal of the close (``close(sig=...)``); SIGKILL follows.
        self._first_signal: int = signal.SIGTERM
        self._deadline_changed: asyncio.Event | None = None
        self._result: Result | None = None
        self._host_children: frozenset[int] | None = None
        self._host_note: asyncio.TimerHandle | None = None
        self._owns_console = False
        #: What poll() returned before close: close returns that same object
        #: when closing changed nothing (every rank had exited on its own).
        self._poll_result: Result | None = None
        self._since = 0
        self._started_at = 0.0
        self._watchdog: _reap.Watchdog | None = None
        self._census: _reap.Census | None = None
        self._subreaper = False
        self.nprocs: int = plan.nprocs
        self.log_dir: Path = plan.log_dir
        self.logs: dict[int, RankLogs] = {rp.rank: rp.logs for rp in plan.ranks}

    # -- public surface ---------------------------------------------------------
    @property
    def pids(self) -> dict[int, int]:
        """rank -> pid of every rank that started (a rank whose program is missing has none)."""
        return {r.plan.rank: r.pid for r in self._ranks if r.pid is not None}

    async def __aenter__(self) -> Group:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is _State.NEW:
            return
        # Leaving the block for any reason closes the group, shielded: a
        # cancellation arriving now does not shorten the grace period.
        await self._close_shielded(None, hurry_on_cancel=False)

    async def wait(self) -> Result:
        """Wait until every rank exited 0, or until one failed; then close the group.

        Returns:
            The final :class:`Result` once every rank is reaped, every
            descendant ended and every teed line written.

        Cancellation:
            Cancelled while ranks run, ``wait`` returns at once and the group
            keeps running. Cancelled while closing (after a failure), the
            close still finishes before ``CancelledError`` propagates.
        """
        self._require_started("wait")
        assert self._settled is not None
        if self._closer is None:
            await self._settled.wait()
        return await self._close_shielded(None, hurry_on_cancel=False)

    def poll(self) -> Result | None:
        """Return ``None`` while any rank runs, else the final :class:`Result`; never blocks."""
        if self._result is not None:
            return self._result
        if self._state is _State.NEW or self._live > 0:
            return None
        if self._poll_result is None:
            self._poll_result = self._build_result()
        return self._poll_result

    async def close(self, grace: float | None = None, *, sig: int = signal.SIGTERM) -> Result:
        """End every rank and descendant and return the final :class:`Result`.

        ``sig`` (SIGTERM by default) goes to every live rank's process group
        and to descendants that left it; after ``grace`` seconds SIGKILL ends
        what remains; every rank is reaped, the pumps are drained, the files
        closed. Idempotent and safe to call concurrently: every caller gets the
        same Result. A call with a shorter ``grace`` than a close already
        running shortens it.

        Args:
            grace: seconds between the first signal and SIGKILL (default: the group's).
            sig: the first signal, e.g. ``signal.SIGINT`` so that Python ranks
                get ``KeyboardInterrupt`` as under torchrun. Only the close
                that starts the closing chooses it.

        Cancellation:
            A cancelled ``close`` skips the rest of the grace period, SIGKILLs,
            finishes the clean-up, then raises ``CancelledError``.
        """
        if self._state is _State.NEW:
            raise CorralError("close() on a group that never started: use 'async with spawn(...)'")
        if self._closer is None:
            self._first_signal = _first_signal(sig)
        return await self._close_shielded(grace, hurry_on_cancel=True)

    def send_signal(self, sig: int, ranks: Collection[int] | None = None) -> None:
        """Send ``sig`` to the process group of each live rank in ``ranks`` (default: all).

        Raises:
            ConfigError: ``ranks`` names a rank outside 0..nprocs-1.
        """
        self._require_started("send_signal")
        selected = range(self.nprocs) if ranks is None else ranks
        bad = [r for r in selected if not isinstance(r, int) or not 0 <= r < self.nprocs]
        if bad:
            raise ConfigError(f"send_signal: no such rank(s) {bad}; ranks are 0..{self.nprocs - 1}")
        for r in selected:
            _killpg(self._ranks[r], sig)

    def __repr__(self) -> str:
        return (
            f"<corral.Group nprocs={self.nprocs} state={self._state.name} log_dir={self.log_dir}>"
        )

    def __del__(self, _warn: object = warnings.warn) -> None:
        if self._state in (_State.RUNNING, _State.CLOSING) and self._closer is None:
            for r in self._ranks:
                if r.held:
                    _killpg(r, signal.SIGKILL, held=True)
                    if not r.alive:
                        _platform.reap(r.pid)  # type: ignore[arg-type]
                        r.reaped = True
            if self._watchdog is not None:
                # End of file: the watchdog sweeps the rest of the group.
                self._watchdog.abandon()
            if self._subreaper:
                self._subreaper = False
                _platform.release_subreaper()
            if self._owns_console and self._console is not None:
                self._console.close()
            warnings.warn(
                f"unclosed {self!r}: its ranks were killed", ResourceWarning, stacklevel=1
            )

    # -- starting ---------------------------------------------------------------
    def _require_started(self, what: str) -> None:
        if self._state is _State.NEW:
            raise CorralError(
                f"{what}() on a group that has not started: use 'async with spawn(...)'"
            )

    async def _start(self) -> None:
        if self._state is not _State.NEW:
            raise CorralError("a Group can be entered only once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._settled = asyncio.Event()
        self._exits_changed = asyncio.Event()
        self._deadline_changed = asyncio.Event()
        plan = self._plan
        try:
            _platform.ensure_fd_budget(_fd_budget(plan))
        except OSError as exc:
            raise CorralError(f"could not start the group: {exc.strerror}") from exc
        self._since = _reap.boot_ticks_now()
        self._census = census = _reap.Census(self._since)
        self._subreaper = True
        _platform.acquire_subreaper()
        self._started_at = time.time()
        self._state = _State.RUNNING
        console = self._console
        pending: list[asyncio.Future[Pump]] = []
        try:
            if console is None and any(rp.tee for rp in plan.ranks):
                # Plain prefixes, exactly as formatted: colour is the CLI's choice.
                console = self._console = Console.create(color=False)
                self._owns_console = True
            # Before any rank: a supervisor killed right after starting one
            # must already have a watchdog (it finds ranks by their token
            # until it is told their pids). Nothing waits for it to be ready.
            watchdog = self._watchdog = _reap.Watchdog.start(plan.token, self._since)
            if watchdog is not None:
                census.own(watchdog.pid)
            for r in self._ranks:
                rp = r.plan
                outcome = start_rank(plan, rp)
                if isinstance(outcome, ExecFailed):
                    r.exec_failed = outcome
                    _touch_logs(rp)  # RankLogs names these files: they exist, empty
                    r.exit_time = time.time()
                    self._settled.set()
                    continue
                popen = outcome.popen
                r.pid = popen.pid
                _reap.register_own(popen.pid)
                census.own(popen.pid)
                r.popen_returncode_sink = popen
                self._live += 1
                _platform.watch_exit(loop, popen.pid, _exit_callback(self, r, popen), reap=False)
                for name, pipe, path, stream in (
                    ("out", outcome.stdout, rp.logs.stdout, console.stdout if console else None),
                    ("err", outcome.stderr, rp.logs.stderr, console.stderr if console else None),
                ):
                    if pipe is None:
                        continue
                    assert path is not None
                    assert console is not None
                    assert stream is not None
                    prefix = console.render_prefix(plan.prefix, rp.rank, name)
                    pending.append(
                        asyncio.ensure_future(open_pump(rp.rank, name, pipe, path, stream, prefix))
                    )
            if watchdog is not None:
                watchdog.add_ranks(loop, [r.pid for r in self._ranks if r.pid is not None])
            census.check()
            # Off the start's critical path, and never for a group shorter than
            # a few clock ticks: which young children the host has, so close can
            # tell a re-parented orphan from them (see _reap_orphans).
            self._host_note = loop.call_later(_reap.HOST_NOTE_DELAY, self._note_host_children)
            if pending:
                pumps = await asyncio.gather(*pending)
                for pump in pumps:
                    self._ranks[pump.rank].pumps.append(pump)
        except BaseException as exc:
            # Roll back: nothing started may outlive a failed start.
            for fut in pending:
                if not fut.done():
                    fut.cancel()
            for r in self._ranks:
                if r.pid is None and r.exec_failed is None:
                    r.exec_failed = ExecFailed(1, "not started: the group failed to start")
            await self._close_shielded(0.0, hurry_on_cancel=False)
            if isinstance(exc, OSError):
                raise CorralError(f"could not start the group: {exc}") from exc
            raise
        if self._live == 0:
            self._settled.set()

    def _note_host_children(self) -> None:
        if self._host_children is None and _platform.HAS_PROC and self._state < _State.CLOSING:
            assert self._census is not None
            self._host_children = _reap.host_children(
                self._since, self._plan.token, self._census.full()
            )

    def _on_exit(self, r: _Rank, returncode: int) -> None:
        """Called on the loop when rank ``r`` has exited and been reaped."""
        r.returncode = returncode
        r.exit_time = time.time()
        r.after_close = self._state >= _State.CLOSING
        self._live -= 1
        assert self._settled is not None
        assert self._exits_changed is not None
        if (returncode != 0 and not r.after_close) or self._live == 0:
            self._settled.set()
        self._exits_changed.set()

    # -- closing ----------------------------------------------------------------
    async def _close_shielded(self, grace: float | None, *, hurry_on_cancel: bool) -> Result:
        loop = self._loop
        assert loop is not None
        g = self._plan.grace if grace is None else _grace(grace)
        deadline = loop.time() + g
        if self._closer is None:
            self._deadline = deadline
            self._state = max(self._state, _State.CLOSING)
            self._closer = loop.create_task(self._close_task(), name="corral-close")
        elif deadline < self._deadline:
            self._shorten(deadline)
        closer = self._closer
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(closer)
                break
            except asyncio.CancelledError:
                if closer.done():
                    raise
                cancelled = True
                if hurry_on_cancel:
                    self._shorten(loop.time())
        if cancelled:
            raise asyncio.CancelledError
        return result

    def _shorten(self, deadline: float) -> None:
        if deadline < self._deadline:
            self._deadline = deadline
            assert self._deadline_changed is not None
            self._deadline_changed.set()

    async def _close_task(self) -> Result:
        loop = self._loop
        assert loop is not None
        killer = _Killer(loop)
        watchdog_gone: asyncio.Future[None] | None = None
        if self._host_note is not None:
            self._host_note.cancel()
        # From now on the pumps read to the end: a backed-up console must not
        # block a rank writing its last words during the grace period.
        for r in self._ranks:
            for pump in r.pumps:
                pump.closing()
        try:
            # 1. Snapshot descendants first: once a rank dies its children are
            #    re-parented and parent links no longer lead to them.
            table: Mapping[int, _watchdog.Stat] | None = self._table()
            unsure: set[int] = set()
            found = self._scan(table, unsure)
            killer.add(found)
            # 2. Unless every rank exited on its own and nothing of the group is
            #    left (the usual end of a good run: one walk, no signal), end it.
            if found or unsure or any(r.alive for r in self._ranks):
                table = await self._terminate(killer)
            # 3. The group is dead: the watchdog has nothing left to guard.
            #    It is SIGKILLed now and awaited last, so the kernel's teardown
            #    of it (~0.6 ms for a Python process) overlaps with the rest.
            if self._watchdog is not None:
                watchdog_gone = self._watchdog.stop_soon()
            # 4. Reap the member zombies re-parented to us (in the last scan: no
            #    member is alive to add more); the ranks are reaped last.
            self._reap_orphans(killer, table)
            # 5. Drain the pumps: with every writer dead, EOF is immediate.
            await self._drain()
        finally:
            if watchdog_gone is None and self._watchdog is not None:
                # The close itself failed before the group was known dead: the
                # watchdog sweeps what is left of it, then exits. Wait for it
                # (bounded) so the ranks' exits are in when they are reaped.
                watchdog_gone = self._watchdog.release()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_SWEEP_TIMEOUT):
                        await asyncio.shield(watchdog_gone)
                        await self._wait_dead(killer, use_deadline=False)
                with contextlib.suppress(OSError):  # once more: the failure may have passed
                    self._reap_orphans(killer, None)
            killer.close()
            if self._owns_console and self._console is not None:
                self._console.close()
            self._reap_ranks()
            if self._subreaper:
                self._subreaper = False
                _platform.release_subreaper()
            self._state = _State.CLOSED
        result = self._build_result()
        if self._poll_result is not None and _same_outcome(self._poll_result, result):
            result = self._poll_result
        if watchdog_gone is not None:
            await watchdog_gone
        self._result = result
        return result

    async def _terminate(self, killer: _Killer) -> Mapping[int, _watchdog.Stat] | None:
        """SIGTERM, grace, SIGKILL and rescan until nothing of the group is alive.

        Returns:
            The last ``/proc`` walk (no member alive in it), for reaping zombies.
        """
        # SIGTERM every rank's process group (an exited rank's group may
        #    still hold its children) and every descendant found.
        for r in self._ranks:
            _killpg(r, self._first_signal, held=True)
        killer.signal_all(self._first_signal)
        # The grace period: ends early when everything is gone.
        await self._wait_dead(killer, use_deadline=True)
        # SIGKILL what remains; rescan until a scan finds no live member
        #    after every rank is dead (one scan when all went on SIGTERM).
        table = None
        unsure: set[int] = set()
        for _ in range(_KILL_ROUNDS):
            for r in self._ranks:
                _killpg(r, signal.SIGKILL, held=True)
            killer.signal_all(signal.SIGKILL)
            killer.forget_untracked()
            await self._wait_dead(killer, use_deadline=False)
            table = self._table()
            unsure = set()
            if not killer.add(self._scan(table, unsure)) and not any(r.alive for r in self._ranks):
                if not unsure:
                    break
                # A child of ours may be mid-execve, its environment not set
                # up yet: look again once the exec is through (rare, bounded).
                await asyncio.sleep(_UNSURE_RETRY)
        else:
            if unsure:  # children with an empty environment of their own, most likely
                _log.debug("corral: children %s never showed an environment", sorted(unsure))
            else:
                _log.error("corral: processes of %s kept appearing after SIGKILL", self)
        return table

    def _table(self) -> dict[int, _watchdog.Stat]:
        """A ``/proc`` table holding every process that can belong to the group."""
        if self._census is None:  # the start failed before any rank
            return _reap.snapshot()
        return self._census.take()

    def _held_pids(self) -> list[int]:
        """The unreaped ranks' pids: also their sessions' ids, valid while held."""
        return [r.pid for r in self._ranks if r.pid is not None and r.held]

    def _scan(
        self,
        table: Mapping[int, _watchdog.Stat] | None = None,
        unsure: set[int] | None = None,
    ) -> list[_reap.Member]:
        sessions = self._held_pids()
        # The watchdog is never a member; starting, it shows no environment yet.
        exclude = [*sessions, self._watchdog.pid] if self._watchdog is not None else sessions
        return _reap.scan(self._plan.token, sessions, self._since, exclude, table, unsure)

    async def _wait_dead(self, killer: _Killer, *, use_deadline: bool) -> None:
        """Wait until no rank and no tracked descendant is alive (or the deadline passes)."""
        loop = self._loop
        assert loop is not None
        assert self._exits_changed is not None
        assert self._deadline_changed is not None
        while any(r.alive for r in self._ranks) or killer.live:
            timeout = None
            if use_deadline:
                timeout = self._deadline - loop.time()
                if timeout <= 0:
                    return
            self._exits_changed.clear()
            self._deadline_changed.clear()
            waiters = [
                asyncio.ensure_future(self._exits_changed.wait()),
                asyncio.ensure_future(killer.changed()),
            ]
            if use_deadline:
                waiters.append(asyncio.ensure_future(self._deadline_changed.wait()))
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    def _reap_orphans(self, killer: _Killer, table: Mapping[int, _watchdog.Stat] | None) -> None:
        """Reap the zombies of members re-parented to us (we are their subreaper)."""
        sessions = self._held_pids()
        if table is None:
            table = self._table()
        younger = None
        if self._host_children is None and sessions and _platform.HAS_PROC:
            # The ranks are held (unreaped): the table has their start tick,
            # on the same clock as every other process's.
            ticks = [st.starttime for pid in sessions if (st := table.get(pid))]
            younger = min(ticks) + 1 if ticks else None
        _reap.reap_zombie_children(
            killer.seen, sessions, self._since, table, host=self._host_children, younger=younger
        )

    def _reap_ranks(self) -> None:
        for r in self._ranks:
            if r.held and not r.alive:
                assert r.pid is not None
                _platform.reap(r.pid)
                _reap.forget_own(r.pid)
                r.reaped = True

    async def _drain(self) -> None:
        pumps = [p for r in self._ranks for p in r.pumps]
        console = self._console
        if not pumps:
            return
        waiting = [p.done for p in pumps if not p.done.done()]
        if waiting:
            _, still = await asyncio.wait(waiting, timeout=DRAIN_TIMEOUT)
            if still:
                _log.warning(
                    "corral: a process outside the group still holds a rank's pipe; "
                    "closing the pipe"
                )
        for p in pumps:
            p.drain_and_close()
        await asyncio.gather(*(p.done for p in pumps))
        if console is not None:
            await console.wait_flushed(CONSOLE_STALL)

    # -- the result -------------------------------------------------------------
    def _build_result(self) -> Result:
        exit_codes: dict[int, int] = {}
        failures: dict[int, Failure] = {}
        returns: dict[int, object] = {}
        terminated: set[int] = set()
        for r in self._ranks:
            rank = r.plan.rank
            if r.exec_failed is not None:
                exit_codes[rank] = r.exec_failed.exitcode
                failures[rank] = Failure(
                    rank=rank,
                    pid=None,
                    exitcode=r.exec_failed.exitcode,
                    signal=None,
                    timestamp=r.exit_time or self._started_at,
                    error_file=None,
                    error=None,
                    message=r.exec_failed.message,
                    logs=r.plan.logs,
                )
                continue
            code = r.returncode
            assert code is not None
            exit_codes[rank] = code
            if r.after_close:
                terminated.add(rank)
            elif code != 0:
                failures[rank] = self._failure(r, code)
            else:
                value, failure = self._return_value(r)
                returns[rank] = value
                if failure is not None:
                    failures[rank] = failure
        return Result(
            exit_codes=exit_codes,
            return_values=returns,
            failures=failures,
            terminated=frozenset(terminated),
            logs=dict(self.logs),
            log_dir=self.log_dir,
            log_errors=self._log_errors(),
        )

    def _log_errors(self) -> dict[int, tuple[str, ...]]:
        errors = {r.plan.rank: tuple(p.error for p in r.pumps if p.error) for r in self._ranks}
        return {rank: e for rank, e in errors.items() if e}

    def _failure(self, r: _Rank, code: int, message: str | None = None) -> Failure:
        """Build rank ``r``'s Failure: the error file, when there is one, explains it."""
        sig = signal_name(-code) if code < 0 else None
        info = read_error_file(r.plan.logs.error_file)
        timestamp = r.exit_time or time.time()
        if message is None:
            if info is not None:
                message = info.message
            elif sig:
                message = f"killed by {sig}"
            else:
                message = f"exited with code {code}"
        if info is not None and info.timestamp is not None:
            # When the exception happened, not when its exit was seen: the root
            # cause among ranks that failed close together is the first to raise.
            # PyTorch's format has whole seconds only: within that second, the
            # exit time (just after the raise) is the better estimate.
            whole = info.timestamp.is_integer()
            if not (whole and info.timestamp <= timestamp < info.timestamp + 1):
                timestamp = info.timestamp
        return Failure(
            rank=r.plan.rank,
            pid=r.pid,
            exitcode=code,
            signal=sig,
            timestamp=timestamp,
            error_file=r.plan.logs.error_file if info is not None else None,
            error=info.content if info is not None else None,
            message=message,
            traceback=info.traceback if info is not None else None,
            logs=r.plan.logs,
        )

    def _return_value(self, r: _Rank) -> tuple[object, Failure | None]:
        """Load a callable rank's return value (None for void and for commands)."""
        path = r.plan.result_file
        if path is None:
            return None, None
        try:
            return load_result(path), None
        except Exception as exc:
            name = type(exc).__qualname__
            return None, self._failure(
                r,
                0,
                f"its return value was pickled but cannot be loaded by the supervisor "
                f"({name}: {exc}); return types the supervisor can import",
            )


def _exit_callback(group: Group, r: _Rank, popen: object) -> _ExitCallback:
    return _ExitCallback(group, r, popen)


class _ExitCallback:
    __slots__ = ("group", "popen", "rank")

    def __init__(self, group: Group, rank: _Rank, popen: object) -> None:
        self.group = group
        self.rank = rank
        self.popen = popen

    def __call__(self, returncode: int) -> None:
        # Tell Popen it was reaped, or its __del__ warns that it "is still running".
        self.popen.returncode = returncode  # type: ignore[attr-defined]
        self.group._on_exit(self.rank, returncode)


def _fd_budget(plan: GroupPlan) -> int:
    """File descriptors the supervisor holds for a running group (see ``ensure_fd_budget``)."""
    per_rank = (1 + 2 * ((rp.tee & Std.OUT != 0) + (rp.tee & Std.ERR != 0)) for rp in plan.ranks)
    return sum(per_rank) + 8  # + the watchdog's pipe, a rank's transient spawn pipes


def _touch_logs(rp: RankPlan) -> None:
    for path in (rp.logs.stdout, rp.logs.stderr):
        if path is not None:
            with open(path, "ab"):
                pass


def _same_outcome(a: Result, b: Result) -> bool:
    """Equal by what closing can change (never comparing return values with ``==``)."""
    return (
        a.exit_codes == b.exit_codes
        and a.terminated == b.terminated
        and a.failures.keys() == b.failures.keys()
        and a.return_values.keys() == b.return_values.keys()
        and a.log_errors == b.log_errors
    )


def _first_signal(sig: object) -> int:
    """Check ``close(sig=...)``: a signal number known on this system."""
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise ConfigError(f"sig must be a signal number such as signal.SIGINT, got {sig!r}")
    try:
        return signal.Signals(sig)
    except ValueError:
        raise ConfigError(f"sig={sig!r} is not a signal on this system") from None


def _killpg(r: _Rank, sig: int, *, held: bool = False) -> None:
    """Signal a rank's process group: a live rank's, or with ``held`` an unreaped one's.

    The rank's pid is ours until we reap it, at the very end of closing: its
    process group id cannot have been recycled.
    """
    if r.alive or (held and r.held):
        assert r.pid is not None
        try:
            os.killpg(r.pid, sig)
        except ProcessLookupError:
            pass  # exited; the exit event is on its way
        except PermissionError:
            # A setuid program in the group; signal the rank itself at least.
            try:
                os.kill(r.pid, sig)
            except ProcessLookupError:
                pass


def spawn(
    entrypoint: Entrypoint,
    *,
    nprocs: int | None = None,
    args: Sequence[object] | Mapping[int, Sequence[object]] | None = None,
    env: Mapping[str, str] | None = None,
    envs: Mapping[int, Mapping[str, str]] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    redirects: StdSpec = Std.NONE,
    tee: StdSpec = Std.NONE,
    tee_ranks: Collection[int] | None = None,
    prefix: str = "[{rank}]: ",
    grace: float = 30.0,
    cwd: str | os.PathLike[str] | None = None,
    console: Console | None = None,
) -> Group:
    """Plan a group of ranks; ``async with`` the returned :class:`Group` starts them.

    Args:
        entrypoint: a command (``str``/path, or an argv sequence; never run
            through a shell) or a module-level Python callable (run in a fresh
            interpreter per rank).
        nprocs: number of ranks; may be omitted when ``args`` or ``envs`` is a
            per-rank mapping.
        args: extra argv (command) or positional arguments (callable): one
            sequence for every rank, or a mapping rank -> sequence.
        env: variables for every rank (over the parent's and the rank variables).
        envs: rank -> variables (over ``env``).
        log_dir: where ``{rank}/stdout.log`` etc. go; default a fresh temporary folder.
        redirects: streams that go to log files (``Std``, a spec string, or rank -> Std).
        tee: streams that go to the log files and to the console.
        tee_ranks: the ranks whose tee reaches the console (default: all).
        prefix: format of each teed line's prefix; fields ``{rank}``, ``{stream}``.
        grace: seconds between SIGTERM and SIGKILL when closing.
        cwd: working directory of the ranks.
        console: where teed lines go (default: this process's stdout/stderr).

    Returns:
        An unstarted :class:`Group`.

    Raises:
        ConfigError: any argument is invalid; nothing was started.
    """
    plan = build_plan(
        entrypoint,
        nprocs=nprocs,
        args=args,
        env=env,
        envs=envs,
        log_dir=log_dir,
        redirects=redirects,
        tee=tee,
        tee_ranks=tee_ranks,
        prefix=prefix,
        grace=grace,
        cwd=cwd,
    )
    return Group(plan, console)


async def run(
    entrypoint: Entrypoint,
    *,
    nprocs: int | None = None,
    args: Sequence[object] | Mapping[int, Sequence[object]] | None = None,
    env: Mapping[str, str] | None = None,
    envs: Mapping[int, Mapping[str, str]] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    redirects: StdSpec = Std.NONE,
    tee: StdSpec = Std.NONE,
    tee_ranks: Collection[int] | None = None,
    prefix: str = "[{rank}]: ",
    grace: float = 30.0,
    cwd: str | os.PathLike[str] | None = None,
    console: Console | None = None,
) -> Result:
    """Spawn a group, wait for it and close it; see :func:`spawn` for the arguments.

    Returns:
        The final :class:`Result` (call ``raise_for_failure()`` to turn a
        failure into an exception).

    Cancellation:
        The group is closed (SIGTERM, grace, SIGKILL, reap) before
        ``CancelledError`` propagates.
    """
    group = spawn(
        entrypoint,
        nprocs=nprocs,
        args=args,
        env=env,
        envs=envs,
        log_dir=log_dir,
        redirects=redirects,
        tee=tee,
        tee_ranks=tee_ranks,
        prefix=prefix,
        grace=grace,
        cwd=cwd,
        console=console,
    )
    async with group:
        return await group.wait()


Group.__module__ = "corral"
spawn.__module__ = "corral"
run.__module__ = "corral"
