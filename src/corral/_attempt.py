"""``Attempt``: the lifecycle of one start of N ranks (``Group`` restarts attempts).

State machine: ``NEW -> RUNNING -> CLOSING -> CLOSED``. Every rank exit is an
event from the loop (a pidfd turning readable), so the first failure is seen
within a loop iteration of the exit. Closing is a single task, created once;
every ``close()``/``wait()``/``leave()`` awaits that same task through
``asyncio.shield`` and keeps awaiting it if cancelled, so clean-up always
finishes and every caller gets the same ``Result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import signal
import time
import warnings
from typing import IO, TYPE_CHECKING, Final

from . import _contain, _platform, _ready, _stacks
from ._config import HEARTBEAT_FILE, GroupPlan, RankPlan, _grace
from ._errors import ConfigError, CorralError
from ._events import EventLog
from ._lines import LineFeed, LineHub
from ._pump import Pump, open_pump
from ._result import Failure, RankLogs, RankOutcome, Result, assemble, failure_of
from ._spawn import ExecFailed, start_rank
from ._std import Std
from ._tee import Console

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable
    from pathlib import Path

__all__ = ("Attempt",)

_log = logging.getLogger("corral")

#: After every process of the group is dead, how long pipes may take to reach
#: EOF before they are drained and closed by force (a writer escaped the group).
DRAIN_TIMEOUT: Final = 0.5
#: A console that takes nothing for this long while a group closes is taken for
#: one nobody reads (a paused terminal): the rest of its backlog is dropped
#: (the log files have it) rather than hang the close. Long enough for a slow
#: reader starved of CPU on a loaded machine not to lose lines.
CONSOLE_STALL: Final = 2.0


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
        "hung",
        "pid",
        "plan",
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
        #: Why it was failed as hung (``hang_timeout``), if it was.
        self.hung: str | None = None
        self.pumps: list[Pump] = []
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

    def outcome(self) -> RankOutcome:
        """What was seen of this rank, for the Result."""
        failed = self.exec_failed
        return RankOutcome(
            rank=self.plan.rank,
            logs=self.plan.logs,
            pid=self.pid,
            returncode=self.returncode,
            exit_time=self.exit_time,
            after_close=self.after_close,
            exec_failed=None if failed is None else (failed.exitcode, failed.message),
            result_file=self.plan.result_file,
            log_errors=tuple(p.error for p in self.pumps if p.error),
            hung=self.hung,
        )


class Attempt:
    """One attempt of a group: N ranks started once, watched, closed (``Group`` drives it).

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
        self._ended: asyncio.Event | None = None
        self._exits_changed: asyncio.Event | None = None
        self._closer: asyncio.Task[Result] | None = None
        self._deadline = 0.0
        #: The first signal of the close (``close(sig=...)``); SIGKILL follows.
        self._first_signal: int = signal.SIGTERM
        self._deadline_changed: asyncio.Event | None = None
        self._result: Result | None = None
        self._owns_console = False
        #: What poll() returned before close: close returns that same object
        #: when closing changed nothing (every rank had exited on its own).
        self._poll_result: Result | None = None
        self._started_at = 0.0
        self._contain: _contain.Containment | None = None
        #: rank -> its stacks.txt, dumped just before closing signalled it.
        self._stacks: dict[int, Path] = {}
        #: Dump the live ranks' stacks (``dump_stacks``) before closing signals them.
        self.stacks_on_close: bool = False
        #: Where this attempt's events go (the group's log), and whether its
        #: close closes the group (no restart can follow): then it says ``closed``.
        self.events = EventLog()
        self.last = True
        self._hang_tasks: set[asyncio.Task[None]] = set()
        #: Which ranks said they are ready (created at the start).
        self._readiness: _ready.Readiness | None = None
        #: Why the start failed midway (for the "closed" event), if it did.
        self._start_error: str | None = None
        #: rank -> its pending hang deadline (cancelled when the attempt closes).
        self._hang_timers: dict[int, asyncio.TimerHandle] = {}
        #: Where the piped streams' lines go (the group's subscribers).
        self.lines = LineHub()
        self.nprocs: int = plan.nprocs
        self.log_dir: Path = plan.log_dir
        self.logs: dict[int, RankLogs] = {rp.rank: rp.logs for rp in plan.ranks}

    # -- public surface ---------------------------------------------------------
    @property
    def pids(self) -> dict[int, int]:
        """rank -> pid of every rank that started (a rank whose program is missing has none)."""
        return {r.plan.rank: r.pid for r in self._ranks if r.pid is not None}

    async def __aenter__(self) -> Attempt:
        await self._start()
        return self

    async def leave(self) -> None:
        """The group's block is left, for any reason: close, shielded.

        A cancellation arriving meanwhile does not shorten the grace period.
        """
        if self._state is _State.NEW:
            return
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

    def alive(self, rank: int) -> bool:
        """Whether ``rank`` runs (started and not yet exited)."""
        return self._ranks[rank].alive

    async def settled(self) -> None:
        """Wait until a rank failed or every rank exited (what ``wait`` waits for)."""
        self._require_started("settled")
        assert self._settled is not None
        await self._settled.wait()

    async def ended(self) -> None:
        """Wait until every rank has exited (on its own or closed); nothing is closed here."""
        self._require_started("ended")
        assert self._ended is not None
        await self._ended.wait()

    def failures_so_far(self) -> list[Failure]:
        """The failures of the ranks that exited on their own so far (no closing needed)."""
        return [
            failure_of(r.outcome(), r.returncode)
            for r in self._ranks
            if r.returncode not in (None, 0) and not r.after_close
        ] + [
            failure_of(r.outcome(), r.exec_failed.exitcode, r.exec_failed.message)
            for r in self._ranks
            if r.exec_failed is not None
        ]

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
        """End this attempt's ranks and descendants; the semantics of ``Group.close``."""
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

    async def dump_stacks(
        self, ranks: Collection[int] | None = None, *, limit: float = _stacks.TIMEOUT
    ) -> dict[int, str]:
        """Dump the Python stacks of the live ranks (what each one is doing right now).

        Each dump is also written to ``{log_dir}/{rank}/stacks.txt``. py-spy is
        used when installed (any Python rank); otherwise callable ranks dump
        through ``faulthandler`` on SIGURG to their stderr (see README).

        Args:
            ranks: the ranks to dump (default: every live rank).
            limit: seconds for all the ranks together (they are dumped in parallel).

        Returns:
            rank -> dump text, for the ranks that gave one (never raises for
            a rank that cannot be dumped: it is left out).

        Cancellation:
            The py-spy processes it started are killed and reaped, then
            ``CancelledError`` propagates; the ranks are not affected.
        """
        self._require_started("dump_stacks")
        wanted = set(range(self.nprocs) if ranks is None else ranks)
        targets = [
            _stacks.Target(
                rank=r.plan.rank,
                pid=r.pid,
                callable=r.plan.result_file is not None,
                stderr_log=r.plan.logs.stderr,
                out=r.plan.logs.error_file.with_name(_stacks.STACKS_FILE),
            )
            for r in self._ranks
            if r.plan.rank in wanted and r.alive and r.pid is not None
        ]
        texts = await _stacks.capture(targets, limit)
        for t in targets:
            if t.rank in texts:
                self._stacks[t.rank] = t.out
        return texts

    def __repr__(self) -> str:
        state = self._state.name
        return f"<corral.Group attempt nprocs={self.nprocs} state={state} log_dir={self.log_dir}>"

    def __del__(self, _warn: object = warnings.warn) -> None:
        if self._state in (_State.RUNNING, _State.CLOSING) and self._closer is None:
            for r in self._ranks:
                if r.held:
                    _killpg(r, signal.SIGKILL, held=True)
                    if not r.alive:
                        _platform.reap(r.pid)  # type: ignore[arg-type]
                        r.reaped = True
            if self._contain is not None:
                self._contain.abandon()
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
        self._ended = asyncio.Event()
        self._exits_changed = asyncio.Event()
        self._deadline_changed = asyncio.Event()
        self._readiness = _ready.Readiness(self._plan, self.events, loop)
        plan = self._plan
        try:
            with _platform.fd_budget(_fd_budget(plan)):
                await self._start_ranks(loop)
        except OSError as exc:
            raise CorralError(f"could not start the group: {exc.strerror or exc}") from exc

    async def _start_ranks(self, loop: asyncio.AbstractEventLoop) -> None:
        plan = self._plan
        settled = self._settled
        assert settled is not None
        readiness = self._readiness
        assert readiness is not None
        self._started_at = time.time()
        self._state = _State.RUNNING
        console = self._console
        pending: list[asyncio.Future[Pump]] = []
        pipes: list[IO[bytes]] = []
        try:
            if console is None and any(rp.tee for rp in plan.ranks):
                # Plain prefixes, exactly as formatted: colour is the CLI's choice.
                console = self._console = Console.create(color=False)
                self._owns_console = True
            # Before any rank: no rank may live a moment uncontained.
            contain = self._contain = _contain.open(
                loop,
                plan.token,
                pid_namespace=plan.pid_namespace,
                reap_orphan_leaders=plan.reap_orphan_leaders,
            )
            for r in self._ranks:
                rp = r.plan
                with contain.spawning():
                    outcome = start_rank(plan, rp)
                if isinstance(outcome, ExecFailed):
                    r.exec_failed = outcome
                    _touch_logs(rp)  # RankLogs names these files: they exist, empty
                    r.exit_time = time.time()
                    settled.set()
                    self.events.emit(
                        "exit",
                        rank=rp.rank,
                        exitcode=outcome.exitcode,
                        failed=True,
                        detail={"message": outcome.message},
                    )
                    continue
                popen = outcome.popen
                r.pid = popen.pid
                readiness.started(rp.rank, popen.pid, outcome.ready)
                self.events.emit("start", rank=rp.rank, pid=popen.pid)
                contain.started(popen.pid)
                self._live += 1
                _platform.watch_exit(loop, popen.pid, _exit_callback(self, r, popen), reap=False)
                for name, flag, pipe, path in (
                    ("out", Std.OUT, outcome.stdout, rp.logs.stdout),
                    ("err", Std.ERR, outcome.stderr, rp.logs.stderr),
                ):
                    if pipe is None:
                        continue
                    pipes.append(pipe)
                    assert path is not None
                    stream, prefix = None, b""
                    if rp.tee & flag:  # shown; else only watched (for line subscribers)
                        assert console is not None
                        stream = console.stdout if flag is Std.OUT else console.stderr
                        prefix = console.render_prefix(plan.prefix, rp.rank, name)
                    marker = plan.ready_line if flag is Std.OUT else None
                    feed = LineFeed(
                        self.lines,
                        rp.rank,
                        name,
                        marker,
                        functools.partial(readiness.said, rp.rank),
                    )
                    pending.append(
                        asyncio.ensure_future(
                            open_pump(rp.rank, name, pipe, path, stream, prefix, feed)
                        )
                    )
            contain.all_started([r.pid for r in self._ranks if r.pid is not None])
            if pending:
                await asyncio.wait(pending)
                self._adopt_pumps(pending)
                for fut in pending:
                    fut.result()  # the first failure, if any
        except BaseException as exc:
            # Roll back: nothing started may outlive a failed start, and no
            # descriptor either (a pipe no pump took yet is closed here).
            if isinstance(exc, Exception):  # the "closed" event says why
                why = _explain(exc) if isinstance(exc, OSError) else str(exc)
                self._start_error = f"could not start the group: {why}"
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.wait(pending)
                self._adopt_pumps(pending)
            for r in self._ranks:
                if r.pid is None and r.exec_failed is None:
                    r.exec_failed = ExecFailed(1, "not started: the group failed to start")
            try:
                await self._close_shielded(0.0, hurry_on_cancel=False)
            finally:
                for pipe in pipes:
                    pipe.close()
            if isinstance(exc, OSError):
                raise CorralError(f"could not start the group: {_explain(exc)}") from exc
            raise
        if self._live == 0:
            settled.set()
            assert self._ended is not None
            self._ended.set()
        elif plan.hang_timeout is not None:
            for r in self._ranks:
                if r.alive:
                    self._arm_hang(r, plan.hang_timeout)

    def _adopt_pumps(self, started: Iterable[asyncio.Future[Pump]]) -> None:
        """Give every pump that started to its rank (closing drains and closes it)."""
        for fut in started:
            if not fut.cancelled() and fut.exception() is None:
                pump = fut.result()
                self._ranks[pump.rank].pumps.append(pump)

    def _on_exit(self, r: _Rank, returncode: int) -> None:
        """Called on the loop when rank ``r`` has exited and been reaped."""
        r.returncode = returncode
        if r.hung is None:  # a rank failed by corral's verdict failed when it was judged
            r.exit_time = time.time()
        r.after_close = self._state >= _State.CLOSING
        self._live -= 1
        assert self._settled is not None
        assert self._exits_changed is not None
        failed = returncode != 0 and not r.after_close
        if failed or self._live == 0:
            self._settled.set()
        if self._live == 0:
            assert self._ended is not None
            self._ended.set()
        self._exits_changed.set()
        self.events.emit("exit", rank=r.plan.rank, pid=r.pid, exitcode=returncode, failed=failed)

    # -- readiness (ready_line, ready_fd: see _ready) ---------------------------------
    async def ready(self, ranks: Collection[int] | None, fail_after: float | None) -> None:
        """Wait until every rank in ``ranks`` said it is ready (see ``Group.ready``)."""
        self._require_started("ready")
        if _ready.missing(self._plan) is None:
            raise ConfigError(
                "ready() needs spawn(..., ready_line='TEXT') (a line ranks print) "
                "or spawn(..., ready_fd=True) (ranks write to $CORRAL_READY_FD)"
            )
        wanted = sorted(range(self.nprocs) if ranks is None else set(ranks))
        bad = [r for r in wanted if not isinstance(r, int) or not 0 <= r < self.nprocs]
        if bad:
            raise ConfigError(f"ready: no such rank(s) {bad}; ranks are 0..{self.nprocs - 1}")
        assert self._readiness is not None
        assert self._exits_changed is not None
        await self._readiness.wait(
            wanted,
            None if fail_after is None else _grace(fail_after),
            alive=self.alive,
            exits=self._exits_changed,
            fail=lambda pending, message: self._fail(pending, message, "unready"),
        )

    def _fail(self, ranks: Iterable[int], message: str, kind: str) -> None:
        """Fail live ``ranks`` by corral's verdict (hung, not ready): the group then closes."""
        for rank in ranks:
            r = self._ranks[rank]
            if r.alive and r.hung is None:
                r.hung = message
                r.exit_time = time.time()
                self.events.emit(kind, rank=rank, pid=r.pid, detail={"message": message})
        assert self._settled is not None
        self._settled.set()

    # -- hangs (hang_timeout) ----------------------------------------------------
    def _check_hang(self, r: _Rank) -> None:
        """A rank's deadline: re-armed from its last progress, or the rank is hung.

        Progress is a write to its log files (its own, or the pumps') or a
        touch of its heartbeat file: their modification times, read only at
        each deadline (a timer per rank, no polling).
        """
        timeout = self._plan.hang_timeout
        loop = self._loop
        if timeout is None or loop is None or not r.alive or self._state >= _State.CLOSING:
            return
        last = self._started_at
        for path in (r.plan.logs.stdout, r.plan.logs.stderr, r.plan.dir / HEARTBEAT_FILE):
            if path is not None:
                with contextlib.suppress(OSError):
                    last = max(last, os.stat(path).st_mtime)
        idle = time.time() - last
        if idle < timeout:
            self._arm_hang(r, timeout - idle)
            return
        task = loop.create_task(self._on_hang(r, idle), name=f"corral-hang-{r.plan.rank}")
        self._hang_tasks.add(task)
        task.add_done_callback(self._hang_tasks.discard)

    def _arm_hang(self, r: _Rank, delay: float) -> None:
        assert self._loop is not None
        self._hang_timers[r.plan.rank] = self._loop.call_later(delay, self._check_hang, r)

    async def _hangs_settled(self) -> None:
        """No deadline left pending; a hung rank's dump (bounded) finishes before any signal."""
        for timer in self._hang_timers.values():
            timer.cancel()
        self._hang_timers.clear()
        if self._hang_tasks:
            await asyncio.wait(set(self._hang_tasks))

    async def _on_hang(self, r: _Rank, idle: float) -> None:
        """Dump the hung rank's stacks (before anything signals it), then fail it."""
        r.hung = f"hung: no output or heartbeat for {idle:.1f} s (hang_timeout)"
        self.events.emit("hang", rank=r.plan.rank, pid=r.pid, detail={"idle": idle})
        _log.warning("corral: rank %d %s", r.plan.rank, r.hung)
        try:
            await self.dump_stacks([r.plan.rank])
        except Exception:
            _log.exception("corral: could not dump the hung rank's stacks")
        r.exit_time = time.time()
        assert self._settled is not None
        self._settled.set()

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
            self.events.emit("closing")
        elif deadline < self._deadline:
            self._shorten(deadline)
        closer = self._closer
        try:
            return await asyncio.shield(closer)
        except asyncio.CancelledError as exc:
            if closer.done():
                raise
            if hurry_on_cancel:
                self._shorten(loop.time())
            cancellation = exc  # re-raised as it came: anyio knows its own by the message
        import anyio  # only now: it costs ~15 ms of import time

        # Cancelled while the close runs: wait it out, then re-raise. Inside an
        # anyio shield, because an anyio cancel scope re-delivers its
        # cancellation at every loop iteration (a busy loop otherwise); and in
        # a loop, because a raw ``Task.cancel()`` pierces anyio's shield.
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    await asyncio.shield(closer)
                break
            except asyncio.CancelledError:
                if closer.done():
                    raise
                if hurry_on_cancel:
                    self._shorten(loop.time())
        raise cancellation

    def _shorten(self, deadline: float) -> None:
        if deadline < self._deadline:
            self._deadline = deadline
            assert self._deadline_changed is not None
            self._deadline_changed.set()

    async def _close_task(self) -> Result:
        loop = self._loop
        assert loop is not None
        contain = self._contain
        ended = False
        try:
            await self._hangs_settled()
            # From now on the pumps read to the end: a backed-up console must not
            # block a rank writing its last words during the grace period.
            for r in self._ranks:
                for pump in r.pumps:
                    pump.closing()
            if self.stacks_on_close and any(r.alive for r in self._ranks):
                # What each live rank was doing, before it is signalled (bounded, never
                # fails close). The grace period starts after it, unless a close
                # shortened it meanwhile.
                deadline, began = self._deadline, loop.time()
                try:
                    await self.dump_stacks()
                except Exception:
                    _log.exception("corral: could not dump the ranks' stacks")
                if self._deadline == deadline:
                    self._deadline += loop.time() - began
            if contain is not None:  # None: the start failed before containing anything
                contain.closing()
                await contain.end(self, self._first_signal)
            ended = True
            # With every writer dead, EOF is immediate.
            await self._drain()
        finally:
            if not ended and contain is not None:
                await contain.abort(self)
            if contain is not None:
                contain.tracked.close()
            if self._owns_console and self._console is not None:
                self._console.close()
            self._reap_ranks()
            if self._readiness is not None:
                self._readiness.close()
            if contain is not None:
                contain.release()
                await contain.finish()
            self._state = _State.CLOSED
        result = self._build_result()
        if self._poll_result is not None and _same_outcome(self._poll_result, result):
            result = self._poll_result
        self._result = result
        if self.last:
            if self._start_error is None:
                self.events.close(result)
            else:
                self.events.close(result, error=self._start_error)
        return result

    # -- what containment needs from the group (_contain.Ranks) ---------------------
    def held_pids(self) -> list[int]:
        """The unreaped ranks' pids: also their sessions' ids, valid while held."""
        return [r.pid for r in self._ranks if r.pid is not None and r.held]

    def any_alive(self) -> bool:
        """Whether a rank has not exited yet."""
        return any(r.alive for r in self._ranks)

    def signal_ranks(self, sig: int) -> None:
        """Send ``sig`` to every unreaped rank's process group."""
        for r in self._ranks:
            _killpg(r, sig, held=True)

    async def wait_dead(self, tracked: _contain.Tracked, *, use_deadline: bool) -> None:
        """Wait until no rank and nothing ``tracked`` is alive (or the grace deadline passes)."""
        loop = self._loop
        assert loop is not None
        assert self._exits_changed is not None
        assert self._deadline_changed is not None
        while any(r.alive for r in self._ranks) or tracked.live:
            timeout = None
            if use_deadline:
                timeout = self._deadline - loop.time()
                if timeout <= 0:
                    return
            self._exits_changed.clear()
            self._deadline_changed.clear()
            waiters = [
                asyncio.ensure_future(self._exits_changed.wait()),
                asyncio.ensure_future(tracked.changed()),
            ]
            if use_deadline:
                waiters.append(asyncio.ensure_future(self._deadline_changed.wait()))
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    def _reap_ranks(self) -> None:
        for r in self._ranks:
            if r.held and not r.alive:
                assert r.pid is not None
                _platform.reap(r.pid)
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
        return assemble(
            [r.outcome() for r in self._ranks],
            started_at=self._started_at,
            log_dir=self.log_dir,
            pids=self.pids,
            stacks=dict(self._stacks),
        )


def _exit_callback(group: Attempt, r: _Rank, popen: object) -> _ExitCallback:
    return _ExitCallback(group, r, popen)


class _ExitCallback:
    __slots__ = ("group", "popen", "rank")

    def __init__(self, group: Attempt, rank: _Rank, popen: object) -> None:
        self.group = group
        self.rank = rank
        self.popen = popen

    def __call__(self, returncode: int) -> None:
        # Tell Popen it was reaped, or its __del__ warns that it "is still running".
        self.popen.returncode = returncode  # type: ignore[attr-defined]
        self.group._on_exit(self.rank, returncode)


def _fd_budget(plan: GroupPlan) -> int:
    """File descriptors the supervisor holds for a running group (see ``_platform.fd_budget``)."""
    piped = (rp.tee | rp.watch for rp in plan.ranks)  # teed or watched: a pipe and a pump
    per_rank = (1 + plan.ready_fd + 2 * ((p & Std.OUT != 0) + (p & Std.ERR != 0)) for p in piped)
    return sum(per_rank) + 8  # + the watchdog's pipe, a rank's transient spawn pipes


def _explain(exc: OSError) -> str:
    """An ``OSError`` of a failed start, with what to do about a descriptor shortage."""
    if exc.errno != errno.EMFILE:
        return str(exc)
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError):
        return str(exc)
    return (
        f"{exc} (RLIMIT_NOFILE is {soft}: each teed rank needs up to 5 descriptors in "
        "this process; raise the limit with ulimit -n, or tee fewer ranks)"
    )


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
