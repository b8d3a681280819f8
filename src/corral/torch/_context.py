"""``PContext`` and ``start_processes``: PyTorch's synchronous API over corral's core.

Each context drives one corral ``Group`` on corral's private event loop (the
``corral-loop`` thread of ``_bridge.core_loop``). The caller's thread only
submits coroutines there and waits for their futures, so:

* A failure is seen when the rank exits (an event, not a poll), but the
  other ranks are closed when PyTorch would close them: at the caller's poll
  instants, ``wait()``'s start plus whole periods (``period=0``: at once).
  A peer that ends on its own before that instant is not closed, so the
  result is PyTorch's; the wait returns as soon as the result is decided.
  Blocking is interruptible by the main thread's signal handlers
  (``SignalException``), as PyTorch's ``time.sleep`` is.
* The tee (``log_line_prefixes``) and the duplicate-filter files are fed from
  ``group.lines()`` on the loop and written by one writer thread per context,
  so a slow console never stalls the loop. The streams are corral-watched
  (files get every byte) rather than corral-teed, because PyTorch's prefixes
  are per rank.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import errno
import logging
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO, TypeVar

from .. import _bridge
from .._group import spawn
from .._std import Std as CoreStd
from ._api import (
    LogsSpecs,
    ProcessFailure,
    RunProcsResult,
    terminate_handler,
    validate_full_rank,
)
from ._wake import InterruptibleEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Mapping

    from .._group import Group
    from .._lines import Line
    from .._result import Result

__all__ = ("MultiprocessContext", "PContext", "SubprocessContext", "start_processes")

log = logging.getLogger("corral")
T = TypeVar("T")

#: The start methods PyTorch accepts; corral runs every one as ``spawn``.
START_METHODS: Final = ("spawn", "fork", "forkserver")
#: Lines the console writer may fall behind before the tee skips some, saying
#: so (the log files keep every line; the filter files get every match).
TEE_BACKLOG: Final = 100_000
#: Seconds between SIGTERM and SIGKILL for a context still running at exit.
EXIT_GRACE: Final = 5
_STREAMS: Final = (("stdout", "out", CoreStd.OUT), ("stderr", "err", CoreStd.ERR))


class _TailLog:
    """What PyTorch's ``TailLog`` shows of a tee: ``stopped()`` once it has written all."""

    def __init__(self, name: str, done: threading.Event) -> None:
        self.name = name
        self._done = done

    def stopped(self) -> bool:
        """True once every line has been written (or the context never started)."""
        return self._done.is_set()

    def __repr__(self) -> str:
        return f"<TailLog {self.name} stopped={self.stopped()}>"


#: An item for the writer thread: (destination, text), or ``None`` at the end.
_Item = tuple[TextIO, str] | None


class _Writer:
    """One thread per context writing tee lines in arrival order; never touches the loop."""

    def __init__(self, files: list[TextIO]) -> None:
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.done = InterruptibleEvent()
        self._files = files
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="corral-torch-tee", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        broken: set[int] = set()
        try:
            while (item := self.queue.get()) is not None:
                dest, text = item
                if id(dest) in broken:
                    continue
                try:
                    dest.write(text)
                    dest.flush()
                except (OSError, ValueError) as exc:  # a closed console, a full disk
                    broken.add(id(dest))
                    name = getattr(dest, "name", "?")
                    log.warning("corral.torch: stopped writing to %s: %s", name, exc)
        finally:
            self._close_files()

    def _close_files(self) -> None:
        try:
            for f in self._files:
                with contextlib.suppress(OSError, ValueError):  # its last flush: a full disk
                    f.close()
        finally:
            self.done.set()  # join() waits for this: set whatever happened

    def join(self) -> None:
        if self._thread is not None:
            self.done.wait()  # set as the thread ends; a signal's handler cuts it short
            self._thread.join()
        else:
            self._close_files()


class PContext:
    """A group of ranks started by :func:`start_processes` (PyTorch's ``PContext``).

    Attributes:
        name, entrypoint, args, envs, nprocs: as given.
        stdouts, stderrs: rank -> log file path (``""``: not redirected).
        error_files: rank -> error file path.
        filtered_stdout, filtered_stderr: path of the duplicate-filter file,
            or ``None`` without filters (PyTorch 2.13 holds an open file there).
    """

    def __init__(
        self,
        name: str,
        entrypoint: Callable[..., object] | str,
        args: dict[int, tuple[object, ...]],
        envs: dict[int, dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
    ) -> None:
        self.name = name
        nprocs = len(args)
        logs_dest = logs_specs.reify(envs)
        validate_full_rank(logs_dest.stdouts, nprocs, "stdouts")
        validate_full_rank(logs_dest.stderrs, nprocs, "stderrs")
        self.entrypoint = entrypoint
        self.args = args
        self.envs = envs
        self.stdouts = logs_dest.stdouts
        self.stderrs = logs_dest.stderrs
        self.error_files = logs_dest.error_files
        self.nprocs = nprocs
        self._tee_ranks = {"out": set(logs_dest.tee_stdouts), "err": set(logs_dest.tee_stderrs)}
        self._prefixes = {
            rank: (log_line_prefixes or {}).get(rank, f"[{name}{rank}]:") for rank in range(nprocs)
        }
        self._consoles: dict[str, TextIO] = {"out": sys.stdout, "err": sys.stderr}
        self._filters: dict[str, tuple[str, ...]] = {}
        files: list[TextIO] = []
        self._filtered: dict[str, TextIO] = {}
        self.filtered_stdout: str | None = None
        self.filtered_stderr: str | None = None
        for stream, path, needles in (
            ("out", logs_dest.filtered_stdout, duplicate_stdout_filters),
            ("err", logs_dest.filtered_stderr, duplicate_stderr_filters),
        ):
            if needles:
                f = open(path, "w", errors="replace", buffering=1)  # noqa: SIM115 - the writer closes it
                files.append(f)
                self._filtered[stream] = f
                self._filters[stream] = tuple(needles)
                if stream == "out":
                    self.filtered_stdout = path
                else:
                    self.filtered_stderr = path
        self._writer = _Writer(files)
        self._tail_logs = [
            _TailLog("stdout", self._writer.done),
            _TailLog("stderr", self._writer.done),
        ]
        self._tail_logs += [_TailLog(f"filtered_std{s}", self._writer.done) for s in self._filters]
        self._group: Group | None = None
        #: Set (from the loop) once a rank failed or every rank ended. Every
        #: wait of the caller's thread is on an ``InterruptibleEvent``: a
        #: signal's handler (``SignalException``) cuts it short at once.
        self._settled = InterruptibleEvent()
        #: Set (from the loop) once ``_finished`` is done.
        self._done = InterruptibleEvent()
        #: Set (on the loop) to close the other ranks after a failure: PyTorch's poll.
        self._sample: asyncio.Event | None = None
        self._finished: concurrent.futures.Future[Result] | None = None
        self._pids: dict[int, int] = {}
        self._result: RunProcsResult | None = None
        self._close_lock = threading.Lock()

    # -- PyTorch's API ------------------------------------------------------------
    def start(self) -> None:
        """Install the signal handlers (main thread only, as PyTorch) and start the ranks."""
        if threading.current_thread() is threading.main_thread():
            names = os.environ.get(
                "TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
            )
            for sig_name in names.split(","):
                try:
                    signal.signal(getattr(signal, sig_name.strip()), terminate_handler)
                except (AttributeError, ValueError, RuntimeError):
                    log.warning("Failed to register signal handler for %s", sig_name, exc_info=True)
        else:
            log.warning(
                "corral.torch: not on the main thread, so no signal handlers were installed "
                "(the ranks still die with this process: corral contains them)"
            )
        self._start()

    def wait(self, timeout: float = -1, period: float = 1) -> RunProcsResult | None:
        """Wait up to ``timeout`` seconds (negative: forever; 0: poll) for the group's end.

        Returns ``None`` while ranks still run; else the result (every rank
        reaped, the group closed, the tee written). The ranks' exits wake it
        (no polling); after a failure, the other ranks are closed at the first
        of PyTorch's poll instants (this call's start, ``timeout=0`` included,
        then every ``period``; ``period <= 0``: at once) unless they have all
        ended by then, so the failures are those PyTorch would report. When no
        poll instant is left before ``timeout``, it returns ``None`` as PyTorch does.
        """
        finished = self._finished
        if finished is None:
            raise RuntimeError("wait() before start(): call start_processes() or start()")
        begun = time.monotonic()
        expiry = None if timeout < 0 else begun + timeout
        settled_before = self._settled.is_set()
        if not settled_before and not self._settled.wait(None if expiry is None else timeout):
            return None
        if not finished.done():  # a rank failed and others run (or the close is under way)
            # PyTorch polls at the call's start (timeout=0 included), then every period.
            if not settled_before and period > 0:
                now = time.monotonic()
                poll = _next_poll(begun, now, period)
                until = poll if expiry is None else min(poll, expiry)
                # the others may all end on their own before the poll
                if self._done.wait(max(until - now, 0.0)):
                    return self._conclude(finished.result())
                if expiry is not None and poll >= expiry:  # no poll before the timeout
                    return None
            self._poll_now()
        self._done.wait()
        return self._conclude(finished.result())

    def pids(self) -> dict[int, int]:
        """rank -> pid of every rank started (kept after they exit)."""
        return dict(self._pids)

    def close(self, death_sig: signal.Signals | None = None, timeout: int = 30) -> None:
        """Send ``death_sig`` (default SIGTERM), SIGKILL after ``timeout`` seconds, reap all."""
        sig = death_sig or signal.SIGTERM
        group, finished = self._group, self._finished
        if group is None or finished is None:
            self._writer.join()
            return
        if not finished.done():
            _call(group.close(timeout, sig=sig))
        self._done.wait()
        self._conclude(finished.result())

    # -- corral ---------------------------------------------------------------
    def _poll_now(self) -> None:
        """PyTorch's poll after a failure: close the ranks still running."""
        sample = self._sample
        if sample is not None:
            _bridge.core_loop().call_soon_threadsafe(sample.set)

    def _start(self) -> None:
        if self._group is not None:
            raise ValueError(
                "The context is already started. Most likely start() got called twice."
            )
        options = self._spawn_options()
        self._writer.start()
        try:
            self._group, self._finished, self._pids = _call(
                self._open(options), abandon=lambda opened: opened[0].close(0)
            )
        except BaseException:
            self._writer.queue.put(None)
            self._writer.join()
            raise

    def _entry(self) -> Callable[..., object] | str:
        return self.entrypoint

    def _rank_args(self) -> dict[int, tuple[object, ...]]:
        return {rank: tuple(self.args[rank]) for rank in range(self.nprocs)}

    def _spawn_options(self) -> dict[str, object]:
        """corral's keywords for this context (the log files must follow corral's layout)."""
        base = Path(self.error_files[0]).parent.parent if self.nprocs else None
        redirects: dict[int, CoreStd] = {}
        watch: dict[int, CoreStd] = {}
        for rank in range(self.nprocs):
            assert base is not None
            expected = {
                "error": base / str(rank) / "error.json",
                "stdout": base / str(rank) / "stdout.log",
                "stderr": base / str(rank) / "stderr.log",
            }
            given = {
                "error": self.error_files[rank],
                "stdout": self.stdouts[rank],
                "stderr": self.stderrs[rank],
            }
            redirect = CoreStd.NONE
            for key, path in given.items():
                if key != "error" and not path:
                    continue
                if key != "error" and path == os.devnull:
                    # Discarded by PyTorch; corral keeps it in the rank's file instead.
                    redirect |= CoreStd.OUT if key == "stdout" else CoreStd.ERR
                    continue
                if Path(path) != expected[key]:
                    raise ValueError(
                        f"corral.torch needs every rank's files in {{folder}}/{{rank}}/"
                        f"(stdout.log, stderr.log, error.json) as DefaultLogsSpecs makes "
                        f"them; rank {rank}'s {key} file is {path}"
                    )
                if key == "stdout":
                    redirect |= CoreStd.OUT
                elif key == "stderr":
                    redirect |= CoreStd.ERR
            folder = base / str(rank)
            with contextlib.suppress(OSError):  # a LogsSpecs that made it (PyTorch's): empty
                folder.rmdir()
            redirects[rank] = redirect
            shown = CoreStd.NONE
            for _, stream, flag in _STREAMS:
                if rank in self._tee_ranks[stream]:
                    shown |= flag
            watch[rank] = shown & redirect
        return {
            "nprocs": self.nprocs,
            "args": self._rank_args(),
            "envs": self.envs,
            "log_dir": base,
            "redirects": redirects,
            "watch": watch,
            "tee": CoreStd.NONE,
            "grace": 30.0,
        }

    async def _open(
        self, options: Mapping[str, object]
    ) -> tuple[Group, concurrent.futures.Future[Result], dict[int, int]]:
        """On the corral loop: subscribe the tee, start the ranks, schedule the finish."""
        group = spawn(self._entry(), **options)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        streams = [s for s in ("out", "err") if self._tee_ranks[s]]
        # Subscribed here, before any rank starts: no line is missed.
        consumers = [
            loop.create_task(self._tee(group.lines(sorted(self._tee_ranks[s]), s), s))
            for s in streams
        ]
        try:
            await group.start()
        except BaseException:
            for consumer in consumers:
                consumer.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            raise
        self._sample = asyncio.Event()
        task = loop.create_task(
            self._finish(group, consumers, self._sample), name="corral-torch-finish"
        )
        finished: concurrent.futures.Future[Result] = concurrent.futures.Future()

        def relay(t: asyncio.Task[Result]) -> None:
            try:
                _RUNNING.discard(self)
                if t.cancelled():
                    finished.cancel()
                elif (exc := t.exception()) is not None:
                    finished.set_exception(exc)
                else:
                    finished.set_result(t.result())
            finally:
                self._done.set()

        task.add_done_callback(relay)
        _RUNNING.add(self)
        return group, finished, dict(group.pids)

    async def _tee(self, lines: AsyncIterator[Line], stream: str) -> None:
        """Copy one stream's teed lines, prefixed, to the console and the filter file."""
        queue_ = self._writer.queue
        put = queue_.put
        console = self._consoles[stream]
        needles = self._filters.get(stream, ())
        filtered = self._filtered.get(stream)
        skipped: dict[int, int] = {}  # rank -> console lines skipped, not yet said
        async for line in lines:
            text = line.data.decode(errors="replace")
            if not text.endswith("\n"):
                text += "\n"
            prefixed = f"{self._prefixes[line.rank]}{text}"
            if filtered is not None and any(n in text for n in needles):
                put((filtered, prefixed))  # the filter file's only copy: never skipped
            missed = line.missed + skipped.pop(line.rank, 0)
            if queue_.qsize() >= TEE_BACKLOG:  # a console that cannot keep up
                skipped[line.rank] = missed + 1
                continue
            if missed:
                note = f"[corral: the tee skipped {missed} lines of rank {line.rank}]\n"
                put((console, note))
            put((console, prefixed))

    async def _finish(
        self, group: Group, consumers: list[asyncio.Task[None]], sample: asyncio.Event
    ) -> Result:
        """Hold the group until PyTorch would close it, close it, drain the tee, end the writer."""
        try:
            await self._hold(group, sample)
        finally:
            self._settled.set()  # whatever happened: no wait() blocks on it any more
            try:
                result = await group.close()
            finally:  # whatever close() did, the tee drains and the writer ends
                await asyncio.gather(*consumers, return_exceptions=True)
                self._writer.queue.put(None)
        return result

    async def _hold(self, group: Group, sample: asyncio.Event) -> None:
        """Until every rank ended, or a rank failed and PyTorch's poll (``sample``) came."""
        attempt = group._attempt  # the facade never restarts: one attempt, its own
        await attempt.settled()
        self._settled.set()
        await _first(attempt.ended(), sample.wait())

    def _conclude(self, result: Result) -> RunProcsResult:
        """The PyTorch view of corral's Result (computed once), after the tee is written."""
        with self._close_lock:
            if self._result is None:
                self._writer.join()
                self._result = self._torch_result(result)
            return self._result

    def _torch_result(self, result: Result) -> RunProcsResult:
        raise NotImplementedError

    def _failure(self, result: Result, rank: int) -> ProcessFailure:
        failure = ProcessFailure(
            local_rank=rank,
            pid=result.pids.get(rank, self._pids.get(rank, -1)),
            exitcode=result.exit_codes[rank],
            error_file=self.error_files[rank],
        )
        own = result.failures.get(rank)
        if own is not None and failure.error_file_data.get("message") == "<NONE>":
            failure.timestamp = int(own.timestamp)  # when it exited, not when asked
        return failure


class MultiprocessContext(PContext):
    """Ranks that run a Python function (PyTorch's ``MultiprocessContext``).

    Every ``start_method`` (``spawn``, ``fork``, ``forkserver``) runs each rank
    in a fresh interpreter, as ``spawn`` does: the function and its arguments
    must be picklable by reference; nothing else of the parent is inherited.
    """

    def __init__(
        self,
        name: str,
        entrypoint: Callable[..., object],
        args: dict[int, tuple[object, ...]],
        envs: dict[int, dict[str, str]],
        start_method: str,
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        numa_options: object = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
    ) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"cannot find context for {start_method!r}")
        super().__init__(
            name,
            entrypoint,
            args,
            envs,
            logs_specs,
            log_line_prefixes,
            duplicate_stdout_filters,
            duplicate_stderr_filters,
        )
        self.start_method = start_method

    def _torch_result(self, result: Result) -> RunProcsResult:
        # PyTorch reports one failure: the first rank seen failing (here the
        # root cause), else a rank its own close() ended (exit code != 0).
        failed: int | None = None
        root = result.root_cause
        if root is not None and root.rank in result.exit_codes:
            failed = root.rank
        else:
            failed = next((r for r, c in sorted(result.exit_codes.items()) if c != 0), None)
        if failed is not None:
            return RunProcsResult(
                failures={failed: self._failure(result, failed)},
                stdouts=self.stdouts,
                stderrs=self.stderrs,
            )
        return RunProcsResult(
            return_values=dict(result.return_values), stdouts=self.stdouts, stderrs=self.stderrs
        )


class SubprocessContext(PContext):
    """Ranks that run an executable (PyTorch's ``SubprocessContext``).

    As PyTorch does, every rank that ended with a non-zero code is a
    failure, including ranks ended by the close that followed another rank's
    failure (corral's own ``Result`` lists those as ``terminated``).
    """

    def __init__(
        self,
        name: str,
        entrypoint: str,
        args: dict[int, tuple[object, ...]],
        envs: dict[int, dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        numa_options: object = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
    ) -> None:
        super().__init__(
            name,
            entrypoint,
            args,
            envs,
            logs_specs,
            log_line_prefixes,
            duplicate_stdout_filters,
            duplicate_stderr_filters,
        )

    def _rank_args(self) -> dict[int, tuple[object, ...]]:
        return {rank: tuple(str(a) for a in self.args[rank]) for rank in range(self.nprocs)}

    def _start(self) -> None:
        _check_executable(str(self.entrypoint), self.envs.get(0, {}))
        super()._start()

    def _torch_result(self, result: Result) -> RunProcsResult:
        failures = {
            rank: self._failure(result, rank)
            for rank, code in sorted(result.exit_codes.items())
            if code != 0
        }
        return RunProcsResult(
            return_values={} if failures else dict.fromkeys(range(self.nprocs)),
            failures=failures,
            stdouts=self.stdouts,
            stderrs=self.stderrs,
        )


async def _first(*waits: Coroutine[object, object, object]) -> None:
    """Wait until the first of ``waits`` ends; cancel the others."""
    futures = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()


def _next_poll(begun: float, now: float, period: float) -> float:
    """The first of PyTorch's poll instants ``begun + k * period`` at or after ``now``."""
    polls = (now - begun) / period
    return begun + math.ceil(polls) * period if math.isfinite(polls) else now


#: Contexts whose ranks may still run (added once started, removed once closed).
_RUNNING: set[PContext] = set()


@atexit.register
def _close_at_exit() -> None:
    """Close what the program left running (an uncaught exception, a signal before its ``try``).

    corral's containment would kill those ranks anyway once this process is
    gone; closing them here ends them in order (SIGTERM first, the tee
    written) and reaps them, so no zombie waits for the system's init.
    """
    for context in list(_RUNNING):
        try:
            try:
                log.warning("corral.torch: %r was still running at exit: closing it", context.name)
            finally:  # a Ctrl-C while the warning is written: the close still runs
                context.close(timeout=EXIT_GRACE)
        except BaseException:  # Ctrl-C cuts the close short (SIGKILL, reaped): on with the rest
            log.exception("corral.torch: could not close %r at exit", context.name)


# A forked child has the contexts but not the loop thread: they are its parent's.
os.register_at_fork(after_in_child=_RUNNING.clear)


def _check_executable(program: str, env: Mapping[str, str]) -> None:
    """Raise as ``subprocess.Popen`` would for a program that cannot be executed.

    corral itself reports a missing executable as a failed rank (exit 127);
    PyTorch raises from ``start_processes``.
    """
    if os.sep in program:
        found: str | None = program if os.path.exists(program) else None
    else:
        found = shutil.which(program, path=env.get("PATH", os.environ.get("PATH")))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if not os.access(found, os.X_OK) or os.path.isdir(found):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)


def _call(
    coro: Coroutine[object, object, T],
    abandon: Callable[[T], Coroutine[object, object, object]] | None = None,
) -> T:
    """Run ``coro`` on corral's loop thread and block this thread until it ends.

    A signal handler raising meanwhile (torch's ``SignalException``, Ctrl-C's
    ``KeyboardInterrupt``) cancels the call, waits until its clean-up is done,
    then propagates; if the call had already succeeded, ``abandon`` is run on
    its result first (a started group is closed, never left unsupervised).
    """
    loop = _bridge.core_loop()
    done = InterruptibleEvent()
    tasks: list[asyncio.Task[T]] = []

    def start() -> None:
        task = loop.create_task(coro, context=contextvars.Context())
        task.add_done_callback(lambda _: done.set())
        tasks.append(task)

    def cancel() -> None:  # on the loop; start() ran first if it was scheduled at all
        if tasks:
            loop.call_soon(tasks[0].cancel)  # after its first step, as under asyncio
        else:
            done.set()

    try:
        loop.call_soon_threadsafe(start)
        done.wait()
    except BaseException:
        loop.call_soon_threadsafe(cancel)
        _wait_through_signals(done)
        if not tasks:
            coro.close()
            raise
        task = tasks[0]
        if abandon is not None and not task.cancelled() and task.exception() is None:
            _call(abandon(task.result()))
        raise
    return tasks[0].result()


def _wait_through_signals(done: threading.Event) -> None:
    """``done.wait()``, carrying on through further signals (the clean-up is bounded)."""
    while True:
        try:
            done.wait()
            return
        except BaseException:  # another SIGTERM or Ctrl-C: wait on
            continue


def start_processes(
    name: str,
    entrypoint: Callable[..., object] | str,
    args: dict[int, tuple[object, ...]],
    envs: dict[int, dict[str, str]],
    logs_specs: LogsSpecs,
    log_line_prefixes: dict[int, str] | None = None,
    start_method: str = "spawn",
    numa_options: object = None,
    duplicate_stdout_filters: list[str] | None = None,
    duplicate_stderr_filters: list[str] | None = None,
) -> PContext:
    """Start ``len(args)`` copies of ``entrypoint`` (a function or an executable).

    PyTorch's signature and behaviour; see the README for the differences.

    Raises:
        RuntimeError: ``args`` and ``envs`` do not both name ranks 0..n-1.
        FileNotFoundError: the executable does not exist.
    """
    nprocs = len(args)
    validate_full_rank(args, nprocs, "args")
    validate_full_rank(envs, nprocs, "envs")
    context: PContext
    if isinstance(entrypoint, str):
        context = SubprocessContext(
            name=name,
            entrypoint=entrypoint,
            args=args,
            envs=envs,
            logs_specs=logs_specs,
            log_line_prefixes=log_line_prefixes,
            numa_options=numa_options,
            duplicate_stdout_filters=duplicate_stdout_filters,
            duplicate_stderr_filters=duplicate_stderr_filters,
        )
    else:
        context = MultiprocessContext(
            name=name,
            entrypoint=entrypoint,
            args=args,
            envs=envs,
            start_method=start_method,
            logs_specs=logs_specs,
            log_line_prefixes=log_line_prefixes,
            numa_options=numa_options,
            duplicate_stdout_filters=duplicate_stdout_filters,
            duplicate_stderr_filters=duplicate_stderr_filters,
        )
    try:
        context.start()
    except BaseException:
        context.close()
        raise
    return context
