"""``Group``: a supervised group of ranks, restarted on failure; and ``spawn``/``run``.

One start of the ranks is an :class:`~corral._attempt.Attempt` (start, watch,
close). ``Group`` is the policy above it: with ``max_restarts`` = 0 it hands
every call to its one attempt; with restarts it runs a driver task that waits
for each attempt, and on a failure with restarts left waits the backoff and
starts the next attempt (the previous one is closed by then: the whole group
is torn down between attempts). In a multi-node world the driver runs each
attempt as a round of the world (``_world.world_round``) and joins the next
round through ``_rendezvous.Node``. ``close()``, a cancellation or a signal is
a ``_world.Stop`` request: it ends the driver, never restarted. The embedding
surface (``events``, ``lines``, ``stats``, ``ready``) reads the group's
``EventLog``/``LineHub``, shared by every attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, Unpack, overload

from . import _bridge
from ._attempt import Attempt
from ._config import (
    Entrypoint,
    GroupPlan,
    SpawnOptions,
    build_plan,
    next_attempt,
    with_world,
)
from ._errors import ConfigError, CorralError
from ._events import Event, EventLog
from ._lines import Following, Line, LineHub, Lines, each_line, on_caller
from ._rendezvous import Node
from ._report import REPORT_FILE, write_report
from ._stats import RankStats, sample
from ._std import Std
from ._world import Stop, world_round

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection
    from pathlib import Path
    from types import TracebackType

    from ._rendezvous import World
    from ._result import RankLogs, Result
    from ._tee import Console

__all__ = ("Group", "run", "spawn")

_log = logging.getLogger("corral")


class Group:
    """A running group of ranks. Create it with :func:`spawn`, enter it with ``async with``.

    Attributes:
        nprocs: the number of ranks.
        log_dir: the folder holding ``{rank}/stdout.log``, ``stderr.log``,
            ``error.json`` (restart K: ``attempt-K/{rank}/...``).
    """

    def __init__(self, plan: GroupPlan, console: Console | None = None) -> None:
        self._plan = plan
        self._console = console
        self._events = EventLog()
        self._events.on_closed = self._on_closed
        self._lines = LineHub()
        self._stacks_on_close = False
        #: This node's membership of a multi-node world (``None``: one machine).
        self._node = Node(plan.rendezvous, plan.nprocs) if plan.rendezvous else None
        self._attempt = self._new_attempt(plan)
        #: The failed attempts' Results, first to last.
        self._previous: list[Result] = []
        self._driver: asyncio.Task[Result] | None = None
        self._stop_request = Stop()
        self._starting = False
        self._entered = False
        self._joining = False
        self._last_stats: dict[int, RankStats] = {}
        self._ending: asyncio.Future[None] | None = None
        self.nprocs: int = plan.nprocs
        self.log_dir: Path = plan.log_dir

    # -- what the current attempt knows -------------------------------------------
    @property
    def pids(self) -> dict[int, int]:
        """rank -> pid of every rank of the current attempt that started."""
        return self._attempt.pids

    @property
    def logs(self) -> dict[int, RankLogs]:
        """rank -> its :class:`RankLogs` (of the current attempt)."""
        return self._attempt.logs

    @property
    def attempt(self) -> int:
        """The current attempt: 0, then 1 after the first restart, and so on."""
        return len(self._previous)

    @property
    def stacks_on_close(self) -> bool:
        """Dump the live ranks' stacks (``dump_stacks``) before closing signals them."""
        return self._stacks_on_close

    @stacks_on_close.setter
    def stacks_on_close(self, value: bool) -> None:
        self._stacks_on_close = value
        self._attempt.stacks_on_close = value

    # -- lifecycle ------------------------------------------------------------------
    @property
    def world(self) -> World | None:
        """In a multi-node group: this node's rank, the node count, its global ranks."""
        return None if self._node is None else self._node.world

    async def __aenter__(self) -> Group:
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.__aenter__())
        if self._entered:
            raise CorralError("a Group can be entered only once")
        self._entered = True
        node = self._node
        try:
            if node is None and not self._plan.max_restarts:
                await self._attempt.__aenter__()
                return self
            if node is not None:
                self._joining = True
                try:
                    world = await node.join()
                    self._joined(world)
                    self._attempt = self._new_attempt(with_world(self._plan, world))
                    await self._attempt.__aenter__()
                except BaseException:
                    await node.shutdown()
                    await self._rendezvous_closed()
                    raise
                finally:
                    self._joining = False
                drive = self._drive_world(node)
            else:
                await self._attempt.__aenter__()
                drive = self._drive()
        except BaseException as exc:
            # The group is over before it began (no-op when the attempt's close said so).
            self._events.close(self._attempt.poll(), error=str(exc) or type(exc).__name__)
            raise
        self._driver = asyncio.get_running_loop().create_task(drive, name="corral-driver")
        self._driver.add_done_callback(self._driver_done)
        return self

    async def start(self) -> Group:
        """Start the ranks, for code that cannot use ``async with`` (then call ``close()``).

        Same guarantees as entering the block; pair it with ``await group.close()``
        (in a ``finally``): leaving a started group unclosed kills its ranks
        when it is garbage-collected, with a ``ResourceWarning``.
        """
        return await self.__aenter__()

    def events(self) -> AsyncIterator[Event]:
        """Every event of the group, from the first, as it happens; ends after ``closed``.

        Any number of consumers may follow at once; none slows the group
        (events are kept, a few per rank and attempt); one that starts late
        gets the earlier events first.
        """
        return _bridge.bridged(self._events.follow())

    @overload
    def lines(
        self,
        ranks: Collection[int] | None = ...,
        streams: Std | str = ...,
        *,
        maxbytes: int = ...,
        maxsize: int | None = ...,
        batched: Literal[False] = ...,
    ) -> AsyncIterator[Line]: ...
    @overload
    def lines(
        self,
        ranks: Collection[int] | None = ...,
        streams: Std | str = ...,
        *,
        maxbytes: int = ...,
        maxsize: int | None = ...,
        batched: Literal[True],
    ) -> AsyncIterator[Lines]: ...
    def lines(
        self,
        ranks: Collection[int] | None = None,
        streams: Std | str = Std.ALL,
        *,
        maxbytes: int = 16 * 2**20,
        maxsize: int | None = None,
        batched: bool = False,
    ) -> AsyncIterator[Line] | AsyncIterator[Lines]:
        """The lines ranks write from this call on, as they come; ends when the group is closed.

        Only streams that pass through corral can be followed: teed ones, and
        those named by the ``watch`` keyword (logged, not shown). The
        subscription starts at this call, not at the first iteration, and at
        a line boundary: its first line is whole. It ends when the iterator is
        closed or garbage-collected.

        Each subscriber has its own queue, bounded: a consumer that falls
        behind by ``maxbytes`` bytes (or by ``maxsize`` lines, when given)
        loses the newest lines rather than slow anything down, and the next
        line (or batch) it gets says how many lines it missed (``missed``;
        the log files have them all). An empty queue always takes one line,
        however long; the per-line iterator also holds the batch it splits.

        Args:
            ranks: the ranks to follow (default: all).
            streams: ``Std.OUT``, ``Std.ERR`` or both (default), or their spec.
            maxbytes: the most bytes of unread lines kept for this consumer.
            maxsize: the most unread lines kept for this consumer (default:
                no limit but ``maxbytes``). Costs the pump a count of the
                lines of every chunk (``bytes.count``, ~3 GB/s).
            batched: yield :class:`Lines` (the whole lines of each chunk read,
                in one bytes object) instead of one :class:`Line` per line:
                the way to follow a rank that writes millions of lines a second.

        Raises:
            ConfigError: a bad rank, stream spec, ``maxbytes`` or ``maxsize``.
        """
        wanted = Std.parse(streams) if isinstance(streams, str) else streams
        if not isinstance(wanted, Std):
            raise ConfigError(f"lines: streams must be one Std for every rank, not {streams!r}")
        names = frozenset(n for n, f in (("out", Std.OUT), ("err", Std.ERR)) if wanted & f)
        if ranks is not None:
            bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < self.nprocs]
            if bad:
                raise ConfigError(f"lines: no such rank(s) {bad}; ranks are 0..{self.nprocs - 1}")
        for name, limit in (("maxbytes", maxbytes), ("maxsize", maxsize)):
            if limit is None and name == "maxsize":
                continue
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"lines: {name} must be a whole number >= 1, not {limit!r}")
        subscription = self._lines.subscribe(ranks, names, maxbytes, maxsize)
        batches = on_caller(subscription)
        if batched:
            return Following(batches, subscription)
        return Following(each_line(batches), subscription)

    async def ready(
        self, ranks: Collection[int] | None = None, *, fail_after: float | None = None
    ) -> None:
        """Wait until each rank (default: all) said it is ready.

        A rank is ready once it printed ``ready_line`` on its stdout, or (with
        ``ready_fd=True``) wrote a byte to the descriptor ``$CORRAL_READY_FD``.

        Args:
            ranks: the ranks to wait for (default: all).
            fail_after: seconds after which the ranks not yet ready are failed
                (unlike a cancel scope around the call, which only stops waiting).

        Raises:
            ConfigError: the group has neither ``ready_line`` nor ``ready_fd``, or a bad rank.
            CorralError: a rank ended before it said it was ready.
            TimeoutError: ``fail_after`` passed first: the ranks not ready are
                failed ("not ready within ...", the root cause) and the group
                closes (``wait()`` gives its Result).
        """
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.ready(ranks, fail_after=fail_after))
        await self._attempt.ready(ranks, fail_after)

    def stats(self) -> dict[int, RankStats]:
        """Each live rank's whole process tree now: CPU, memory, threads, processes.

        Cheap enough to call every second (measured in ``benchmarks/``);
        ``cpu_percent`` is the use since the previous call.
        """
        live = {r: pid for r, pid in self.pids.items() if self._attempt.alive(r)}
        self._last_stats = sample(live, self._last_stats)
        return dict(self._last_stats)

    @property
    def history(self) -> tuple[Event, ...]:
        """The events so far."""
        return self._events.history

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.__aexit__(exc_type, exc, tb), shield=True)
        if self._driver is None:
            await self._attempt.leave()
            return
        self._stop(None, signal.SIGTERM)
        if not self._starting:  # a start in progress is closed by the driver itself
            await self._attempt.leave()
        await _finish(self._driver)
        await self._rendezvous_closed()

    async def wait(self) -> Result:
        """Wait until every rank exited 0, or until one failed; then close the group.

        With ``max_restarts``, a failure with restarts left starts the group
        again after the backoff, and ``wait`` goes on waiting: it returns the
        last attempt's Result (``attempt``, ``previous`` tell the rest).

        Cancellation:
            Cancelled while ranks run, ``wait`` returns at once and the group
            keeps running. Cancelled while closing (after a failure), the
            close still finishes before ``CancelledError`` propagates.
        """
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.wait())
        if self._driver is None:
            return await self._attempt.wait()
        return await asyncio.shield(self._driver)

    def poll(self) -> Result | None:
        """Return ``None`` while the group runs (or will restart), else the final Result."""
        driver = self._driver
        if driver is None:
            return self._attempt.poll()
        if driver.done() and not driver.cancelled() and driver.exception() is None:
            return driver.result()
        return None

    async def close(self, grace: float | None = None, *, sig: int = signal.SIGTERM) -> Result:
        """End every rank and descendant and return the final :class:`Result`.

        ``sig`` (SIGTERM by default) goes to every live rank's process group
        and to descendants that left it; after ``grace`` seconds SIGKILL ends
        what remains; every rank is reaped, the pumps are drained, the files
        closed. Idempotent and safe to call concurrently: every caller gets the
        same Result. A call with a shorter ``grace`` than a close already
        running shortens it. A closed group is never restarted.

        Args:
            grace: seconds between the first signal and SIGKILL (default: the group's).
            sig: the first signal, e.g. ``signal.SIGINT`` so that Python ranks
                get ``KeyboardInterrupt`` as under torchrun. Only the close
                that starts the closing chooses it.

        Cancellation:
            A cancelled ``close`` skips the rest of the grace period, SIGKILLs,
            finishes the clean-up, then raises ``CancelledError``.
        """
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.close(grace, sig=sig))
        driver = self._driver
        if driver is None:
            return await self._attempt.close(grace, sig=sig)
        self._stop(grace, sig)
        if not self._starting:
            result = await self._attempt.close(grace, sig=sig)
            if driver.done() and driver.exception() is not None:
                await self._rendezvous_closed()
                return result  # the next attempt could not start: this one is the last
        result = await _finish(driver)
        await self._rendezvous_closed()
        return result

    def send_signal(self, sig: int, ranks: Collection[int] | None = None) -> None:
        """Send ``sig`` to the process group of each live rank in ``ranks`` (default: all).

        Raises:
            ConfigError: ``ranks`` names a rank outside 0..nprocs-1.
        """
        self._attempt.send_signal(sig, ranks)

    async def dump_stacks(
        self, ranks: Collection[int] | None = None, *, limit: float | None = None
    ) -> dict[int, str]:
        """Dump the Python stacks of the live ranks (what each one is doing right now).

        Each dump is also written to the rank's ``stacks.txt`` beside its
        logs. py-spy is used when installed (any Python rank); otherwise
        callable ranks dump through ``faulthandler`` on SIGURG to their
        stderr (see README).

        Args:
            ranks: the ranks to dump (default: every live rank).
            limit: seconds for all the ranks together (they are dumped in parallel).

        Returns:
            rank -> dump text, for the ranks that gave one.
        """
        if _bridge.backend() == "trio":  # the asyncio core, on its own loop
            return await _bridge.run_on_core(self.dump_stacks(ranks, limit=limit))
        if limit is None:
            return await self._attempt.dump_stacks(ranks)
        return await self._attempt.dump_stacks(ranks, limit=limit)

    def __repr__(self) -> str:
        return f"<corral.Group nprocs={self.nprocs} attempt={self.attempt} log_dir={self.log_dir}>"

    def _new_attempt(self, plan: GroupPlan) -> Attempt:
        attempt = Attempt(plan, self._console)
        attempt.stacks_on_close = self._stacks_on_close
        attempt.events = self._events
        attempt.lines = self._lines
        # Without a driver the attempt's close is the group's: it says "closed".
        attempt.last = not self._plan.max_restarts and self._node is None
        return attempt

    def _on_closed(self, result: Result | None) -> None:
        """The group is closed: line subscriptions end, the report is written."""
        self._lines.close()
        self._write_report(result)

    def _write_report(self, result: Result | None) -> None:
        """``{log_dir}/report.json``: the run, for CI systems and dashboards."""
        world = self.world
        write_report(
            self._plan.report or self.log_dir / REPORT_FILE,
            plan=self._plan,
            result=result,
            history=self._events.history,
            world=None if world is None else dataclasses.asdict(world),
        )

    def _joined(self, world: World) -> None:
        self._events.emit(
            "rendezvous",
            detail={"node": world.node, "nnodes": world.nnodes, "world_size": world.world_size},
        )

    def _driver_done(self, task: asyncio.Task[Result]) -> None:
        """The group is over: say so (with the error, when the driver failed)."""
        if task.cancelled():
            self._events.close(None)
        elif task.exception() is not None:
            self._events.close(None, error=str(task.exception()))
        else:
            self._events.close(task.result())

    # -- restarts -------------------------------------------------------------------
    def _stop(self, grace: float | None, sig: int) -> None:
        """No restart from now on; a start in progress is closed with ``grace``, ``sig``."""
        self._stop_request.request(grace, sig)
        if self._joining and self._node is not None:
            # A join blocks in torch until every node came: closing the
            # rendezvous ends it (for every node: this one will not come).
            self._ending = asyncio.ensure_future(self._node.shutdown())

    async def _rendezvous_closed(self) -> None:
        """The rendezvous shutdown that ``_stop`` began, finished (its errors are logged)."""
        ending = self._ending
        if ending is not None:
            await asyncio.wait([ending])
            if not ending.cancelled() and ending.exception() is not None:
                _log.warning("corral: closing the rendezvous failed: %s", ending.exception())

    async def _drive(self) -> Result:
        """Wait for each attempt; restart after a failure while restarts are left."""
        plan = self._plan
        while True:
            result = await self._attempt.wait()
            result = replace(result, attempt=self.attempt, previous=tuple(self._previous))
            if (
                self._stop_request.requested()
                or not result.failures
                or self.attempt >= plan.max_restarts
            ):
                return result
            if not await self._backoff(result):
                return result  # closed during the backoff
            self._previous.append(result)
            await self._start_next()

    async def _backoff(self, result: Result) -> bool:
        """Log the restart, wait the backoff; False when the group was closed meanwhile."""
        plan = self._plan
        delay = min(plan.restart_backoff * 2**self.attempt, plan.restart_backoff_max)
        root = result.root_cause
        assert root is not None
        _log.warning(
            "corral: attempt %d failed (%s: %s); restart %d of %d in %.1f s",
            self.attempt,
            root.where,
            root.message,
            self.attempt + 1,
            plan.max_restarts,
            delay,
        )
        return await self._stop_request.sleep(delay)

    async def _drive_world(self, node: Node) -> Result:
        """Each attempt of a multi-node world: run it, learn how the world ended, restart."""
        plan = self._plan
        try:
            while True:
                result, failed = await world_round(node, self._attempt, self._stop_request)
                result = replace(result, attempt=self.attempt, previous=tuple(self._previous))
                if (
                    not failed
                    or self._stop_request.requested()
                    or self.attempt >= plan.max_restarts
                ):
                    return result
                if not await self._backoff(result):
                    return result
                self._previous.append(result)
                self._joining = True
                try:
                    world = await node.join()
                    self._joined(world)
                except CorralError:
                    if self._stop_request.requested():  # closed while joining
                        return result
                    raise
                finally:
                    self._joining = False
                await self._start_next(with_world(next_attempt(plan, self.attempt), world))
        finally:
            await node.shutdown()

    async def _start_next(self, plan: GroupPlan | None = None) -> None:
        self._starting = True
        try:
            if plan is None:
                plan = next_attempt(self._plan, self.attempt)
            following = self._new_attempt(plan)
            self._events.attempt = self._lines.attempt = self.attempt
            self._events.emit("restart")
            self._attempt = following
            await following.__aenter__()
        finally:
            self._starting = False
        if self._stop_request.requested():  # closed while it started
            grace, sig = self._stop_request.close_args
            await following.close(grace, sig=sig)


async def _finish(driver: asyncio.Task[Result]) -> Result:
    """Await the driver to its end, even when cancelled meanwhile; then re-raise."""
    try:
        return await asyncio.shield(driver)
    except asyncio.CancelledError:
        if driver.done():
            raise
        import anyio  # only now (see Attempt._close_shielded: no busy loop under anyio)

        with anyio.CancelScope(shield=True):
            await asyncio.wait([driver])
        raise


def spawn(entrypoint: Entrypoint, **options: Unpack[SpawnOptions]) -> Group:
    """Plan a group of ranks; ``async with`` the returned :class:`Group` starts them.

    Args:
        entrypoint: a command (``str``/path, or an argv sequence; never run
            through a shell) or a module-level Python callable (run in a fresh
            interpreter per rank).
        **options: the keywords of :class:`SpawnOptions`: ``nprocs``, ``args``,
            ``env``, ``envs``, ``log_dir``, ``redirects``, ``tee``,
            ``tee_ranks``, ``prefix``, ``grace``, ``cwd``, ``pid_namespace``,
            ``max_restarts``, ``restart_backoff``, ``restart_backoff_max``,
            ``rendezvous``, ``watch``, ``hang_timeout``, ``ready_line``, ``ready_fd``.

    Returns:
        An unstarted :class:`Group`.

    Raises:
        ConfigError: any argument is invalid; nothing was started or created.
    """
    return _spawn(entrypoint, None, options)


async def run(entrypoint: Entrypoint, **options: Unpack[SpawnOptions]) -> Result:
    """Spawn a group, wait for it and close it; see :func:`spawn` for the arguments.

    Returns:
        The final :class:`Result` (call ``raise_for_failure()`` to turn a
        failure into an exception).

    Cancellation:
        The group is closed (SIGTERM, grace, SIGKILL, reap) before
        ``CancelledError`` propagates.
    """
    return await _run(entrypoint, None, options)


def _spawn(
    entrypoint: Entrypoint,
    console: Console | None,
    options: SpawnOptions,
    *,
    owns_process: bool = False,
) -> Group:
    """``spawn`` with the console to tee to (the CLI's, a test's); not public.

    ``owns_process``: the caller owns this process (the CLI): orphans
    re-parented to it are all corral's (see ``GroupPlan.reap_orphan_leaders``).
    """
    _bridge.check_library()
    plan = build_plan(entrypoint, options)
    if owns_process:
        plan = replace(plan, reap_orphan_leaders=True)
    return Group(plan, console)


async def _run(entrypoint: Entrypoint, console: Console | None, options: SpawnOptions) -> Result:
    """``run`` with the console to tee to; not public."""
    async with _spawn(entrypoint, console, options) as group:
        return await group.wait()


Group.__module__ = "corral"
spawn.__module__ = "corral"
run.__module__ = "corral"
