"""Frozen records of what happened (``RankLogs``, ``Failure``, ``Result``) and how a
Result is assembled from what the supervisor saw of each rank (``RankOutcome``)."""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from ._callable import load_result
from ._errors import CorralError
from ._record import read_error_file

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

__all__ = ("Failure", "GroupFailedError", "RankLogs", "Result")

#: How much of a failure ``describe()`` shows.
TRACEBACK_LINES: Final = 40
STDERR_TAIL_LINES: Final = 10
TAIL_BYTES: Final = 8192
LINE_MAX: Final = 300
#: How many lines of each rank's stack dump ``describe()`` shows.
STACK_LINES: Final = 20
#: How a thread's stack starts in a py-spy or a faulthandler dump.
_THREAD_HEADS: Final = ("Thread ", "Current thread ")
#: What a rank says when it failed *waiting for a peer* (gloo, NCCL, c10d): such a
#: rank is a victim of another rank's stop, not the root cause (issue 11, item 4).
PEER_WAIT: Final = re.compile(
    r"timed out waiting|connection closed by peer|connection reset by peer"
    r"|DistBackendError|DistNetworkError|DistStoreError|before timing out"
    r"|collective operation timeout|socket timeout|broken pipe",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class RankLogs:
    """Where one rank's output is recorded.

    Attributes:
        stdout: ``{log_dir}/{rank}/stdout.log``, or ``None`` when stdout is inherited.
        stderr: ``{log_dir}/{rank}/stderr.log``, or ``None`` when stderr is inherited.
        error_file: ``{log_dir}/{rank}/error.json``, where ``record`` writes an
            uncaught exception (it exists only if the rank wrote it).
    """

    stdout: Path | None
    stderr: Path | None
    error_file: Path


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one rank failed on its own (not because corral closed it).

    Attributes:
        rank: the rank.
        pid: its process id, or ``None`` when it never started.
        exitcode: Popen convention: negative when killed by that signal;
            127/126 when the executable is missing/not executable.
        signal: the signal name (``"SIGSEGV"``) when killed by a signal, else ``None``.
        timestamp: when it failed, seconds since the epoch (the error file's own
            timestamp when it has one).
        error_file: the rank's error file when the rank wrote one, else ``None``.
        error: the error file's parsed content, or ``None``.
        message: one human line: the exception when there is an error file,
            otherwise e.g. ``"exited with code 3"`` or ``"killed by SIGSEGV"``.
        traceback: the recorded traceback text, when the error file has one.
        logs: the rank's log files.
        node, host, global_rank: in a multi-node group, the node (its rank in
            the rendezvous), its host name and the rank's global ``RANK``
            (``rank`` is its local rank on that node); ``None`` on one machine.
    """

    rank: int
    pid: int | None
    exitcode: int
    signal: str | None
    timestamp: float
    error_file: Path | None
    error: Mapping[str, Any] | None
    message: str
    traceback: str | None = None
    logs: RankLogs | None = None
    node: int | None = None
    host: str | None = None
    global_rank: int | None = None

    @property
    def where(self) -> str:
        """``rank 3`` on one machine; ``rank 3 (node 1 on host-b, local rank 1)`` across nodes."""
        if self.node is None:
            return f"rank {self.rank}"
        if self.global_rank is None:  # the node itself (its corral was lost)
            return f"node {self.node}" + (f" on {self.host}" if self.host else "")
        return f"rank {self.global_rank} (node {self.node} on {self.host}, local rank {self.rank})"

    @property
    def waited_on_peer(self) -> bool:
        """True when the rank says it failed waiting for another rank.

        That is: its message, or the last lines of its traceback, say a
        collective or a connection to a peer timed out or broke (gloo's
        "Timed out waiting ... for send operation", "Connection closed by
        peer", "Connection reset by peer", torch's ``DistBackendError``,
        NCCL's "collective operation timeout", a c10d store timeout...).
        """
        tail = self.traceback.rstrip().splitlines()[-3:] if self.traceback else []
        return any(PEER_WAIT.search(text) for text in (self.message, *tail))

    def describe(self) -> str:
        """Return a few readable lines: what failed, how, when, the traceback, the logs.

        Without a traceback (no error file), the last lines of the rank's
        stderr log are shown instead (of its stdout log when stderr is empty).
        """
        if self.node is not None and self.global_rank is None:  # a lost node, not a rank
            return f"{self.where} ended at {_clock(self.timestamp)}: {self.message}"
        pid = "never started" if self.pid is None else f"pid {self.pid}"
        lines = [
            f"{self.where} ({pid}) {_how(self)} at {_clock(self.timestamp)}",
        ]
        if not _says_only_how(self):
            lines.append(f"  {self.message}")
        if self.traceback:
            lines.extend(_indent(_cut(self.traceback.rstrip().splitlines(), TRACEBACK_LINES)))
        elif self.logs is not None:
            # Its stderr says why, usually; a rank that wrote none may have said it on stdout.
            for path in (self.logs.stderr, self.logs.stdout):
                tail = _tail(path, STDERR_TAIL_LINES) if path is not None else []
                if path is not None and tail:
                    lines.append(f"  last lines of {path.name}:")
                    lines.extend(_indent(tail))
                    break
        if self.error_file is not None:
            lines.append(f"  error file: {self.error_file}")
        if self.logs is not None:
            for name, path in (("stdout", self.logs.stdout), ("stderr", self.logs.stderr)):
                if path is not None:
                    lines.append(f"  {name}: {path}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Result:
    """The final outcome of a group: exit codes, return values, failures.

    Attributes:
        exit_codes: rank -> exit code (Popen convention: negative = signal).
        return_values: rank -> return value of a callable rank (``None`` for
            void functions and for commands).
        failures: the ranks that failed on their own, with their cause.
        terminated: the ranks that corral's own close ended (never failures).
        logs: rank -> its log files.
        log_dir: the group's log directory.
        log_errors: rank -> what went wrong writing its log files (a full
            disk, a file size limit): the rank ran on, its other stream and the
            other ranks' logs kept flowing, but that file is incomplete.
        pids: rank -> pid of every rank that started.
        stacks: rank -> its ``stacks.txt``: what the rank was doing when corral
            dumped its stacks (``Group.dump_stacks``, or just before closing
            signalled it when ``Group.stacks_on_close`` is set).
        attempt: which attempt this describes: 0 for the first start, K for
            the K-th restart (``max_restarts``).
        previous: the Results of the earlier attempts, first to last (each failed).
        world_failure: in a multi-node group, the world's root cause, wherever
            it happened (this node's ranks may all be ``terminated``): it is
            the ``root_cause``. ``None`` when no rank of any node failed.
    """

    exit_codes: dict[int, int]
    return_values: dict[int, object] = field(default_factory=dict)
    failures: dict[int, Failure] = field(default_factory=dict)
    terminated: frozenset[int] = frozenset()
    logs: dict[int, RankLogs] = field(default_factory=dict)
    log_dir: Path | None = None
    log_errors: dict[int, tuple[str, ...]] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    stacks: dict[int, Path] = field(default_factory=dict)
    attempt: int = 0
    previous: tuple[Result, ...] = ()
    world_failure: Failure | None = None

    @property
    def ok(self) -> bool:
        """True when no rank failed and none was terminated (on any node)."""
        return not self.failures and not self.terminated and self.world_failure is None

    @property
    def root_cause(self) -> Failure | None:
        """The earliest failure by timestamp (ties go to the lower rank), or ``None``.

        A rank that failed waiting for a peer (``Failure.waited_on_peer``: a
        collective timed out, the connection to a peer closed) is a victim
        of the rank that stopped: it is the root cause only when every
        failure is such a victim. Among the others, the earliest wins.
        """
        if self.world_failure is not None:
            return self.world_failure
        if not self.failures:
            return None
        causes = [f for f in self.failures.values() if not f.waited_on_peer]
        return min(causes or self.failures.values(), key=lambda f: (f.timestamp, f.rank))

    def raise_for_failure(self) -> None:
        """Raise ``GroupFailedError`` explaining the root cause, if any rank failed.

        Raises:
            GroupFailedError: at least one rank failed; its ``result`` is this Result.
        """
        if self.failures or self.world_failure is not None:
            raise GroupFailedError(self)

    def describe(self) -> str:
        """Return a readable account: a summary line, the root cause in full, then the rest.

        Example (the text of ``GroupFailedError``)::

            rank 1 failed first (2 of 4 ranks failed): ValueError: bad batch 7

            root cause: rank 1 (pid 4242) exited with code 1 at 2026-01-02 10:00:00.123
              ValueError: bad batch 7
              Traceback (most recent call last):
                File "train.py", line 12, in train
                  ...
              ValueError: bad batch 7
              error file: /tmp/corral-x/1/error.json
              stderr: /tmp/corral-x/1/stderr.log

            other failures:
              rank 3 (pid 4244) was killed by SIGSEGV (exitcode -11), 0.004 s later
            terminated by corral: ranks 0,2
              rank 0 (pid 4241) was killed by SIGTERM (exitcode -15)
              rank 2 (pid 4243) was killed by SIGTERM (exitcode -15)

            what the ranks still running were doing when corral stopped them:
              rank 0 (/tmp/corral-x/0/stacks.txt):
                Thread 4241 (idle): "MainThread"
                    allreduce (train.py:40)
              ...

            logs: /tmp/corral-x

        This is the one renderer of a failure: the ``corral`` command line's
        summary is this text. The per-rank lines of the terminated ranks need
        ``pids``; the stack dumps need ``stacks`` (see ``Group.dump_stacks``).
        """
        root = self.root_cause
        if root is None:
            if self.terminated:
                head = f"no rank failed; ranks {_ranges(self.terminated)} were terminated by close"
                rest = [*self._terminated_lines()[1:], *self._stack_lines()]
                if rest and self.log_dir is not None:
                    rest.append(f"logs: {self.log_dir}")
                return "\n".join([head, *rest]).rstrip("\n")
            return "\n".join(["every rank succeeded", *_log_error_lines(self.log_errors)])
        if root not in self.failures.values():
            return self._describe_remote(root)
        n = len(self.exit_codes)
        count = len(self.failures)
        first = "failed" if count == 1 else f"failed first ({count} of {n} ranks failed)"
        earliest = min(self.failures.values(), key=lambda f: (f.timestamp, f.rank))
        if earliest is not root:
            first = f"stopped, others then failed waiting for it ({count} of {n} ranks failed)"
        lines = [
            f"{root.where} {first}: {root.message}",
            "",
            "root cause: " + root.describe(),
        ]
        lines += self._attempt_lines()
        others = sorted(
            (f for f in self.failures.values() if f is not root),
            key=lambda f: (f.timestamp, f.rank),
        )
        if others:
            lines += ["", "other failures:"]
            for f in others:
                pid = "never started" if f.pid is None else f"pid {f.pid}"
                later = f.timestamp - root.timestamp
                when = f"{later:.3f} s later" if later >= 0 else f"{-later:.3f} s earlier"
                line = f"  {f.where} ({pid}) {_how(f)}, {when}"
                if not _says_only_how(f):
                    line += f": {f.message}"
                if f.waited_on_peer and not root.waited_on_peer:
                    line += " (waiting for a peer: a victim, not the cause)"
                lines.append(line)
        lines += self._terminated_lines()
        lines += self._stack_lines()
        if self.log_dir is not None:
            lines.append(f"logs: {self.log_dir}")
        lines += _log_error_lines(self.log_errors)
        return "\n".join(lines)

    def _describe_remote(self, root: Failure) -> str:
        """The world's root cause is on another node: it, then what happened here."""
        where = "failed on another node" if root.global_rank is not None else "ended"
        lines = [
            f"{root.where} {where}: {root.message}",
            "",
            "root cause: " + root.describe(),
        ]
        lines += self._attempt_lines()
        if self.failures:
            lines += ["", "failures on this node (after the root cause):"]
            for f in sorted(self.failures.values(), key=lambda f: (f.timestamp, f.rank)):
                line = f"  {f.where} {_how(f)}"
                lines.append(line if _says_only_how(f) else f"{line}: {f.message}")
        lines += self._terminated_lines()
        lines += self._stack_lines()
        if self.log_dir is not None:
            lines.append(f"logs of this node: {self.log_dir}")
        return "\n".join(lines)

    def _attempt_lines(self) -> list[str]:
        """After restarts: which attempt this is, and how each earlier one ended."""
        if not self.previous:
            return []
        lines = ["", f"attempt {self.attempt} (after {len(self.previous)} restart(s)); earlier:"]
        for k, earlier in enumerate(self.previous):
            cause = earlier.root_cause
            how = "ended" if cause is None else f"{cause.where} {cause.message}"
            lines.append(f"  attempt {k}: {how}")
        return lines

    def _terminated_lines(self) -> list[str]:
        """``terminated by corral: ranks ...``, then each with its pid and end, when known."""
        if not self.terminated:
            return []
        lines = [f"terminated by corral: ranks {_ranges(self.terminated)}"]
        if self.pids:
            for rank in sorted(self.terminated):
                code = self.exit_codes.get(rank, 0)
                pid = self.pids.get(rank)
                how = (
                    f"was killed by {signal_name(-code)} (exitcode {code})"
                    if code < 0
                    else (f"exited with code {code} while the group was closing")
                )
                lines.append(f"  rank {rank} ({'pid ' + str(pid) if pid else 'no pid'}) {how}")
        return lines

    def _stack_lines(self) -> list[str]:
        """The stack dumps of the ranks corral stopped, each cut to ``STACK_LINES``."""
        lines: list[str] = []
        for rank in sorted(self.stacks):
            path = self.stacks[rank]
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            dump = [line.rstrip()[:LINE_MAX] for line in text.splitlines() if line.strip()]
            # From the first thread on (py-spy starts with the process and Python version).
            heads = [i for i, line in enumerate(dump) if line.startswith(_THREAD_HEADS)]
            dump = dump[heads[0] :] if heads else dump
            if not dump:
                continue
            if not lines:
                lines += ["", "what the ranks still running were doing when corral stopped them:"]
            lines.append(f"  rank {rank} ({path}):")
            shown = dump[:STACK_LINES]
            lines.extend(_indent(shown))
            if len(dump) > len(shown):
                lines.append(f"    ... ({len(dump) - len(shown)} more lines in the file)")
        if lines:
            lines.append("")
        return lines


def _log_error_lines(log_errors: Mapping[int, tuple[str, ...]]) -> list[str]:
    lines = []
    for rank in sorted(log_errors):
        lines += [f"incomplete log of rank {rank}: {e}" for e in log_errors[rank]]
    return lines


def _how(failure: Failure) -> str:
    """How the rank ended, e.g. ``"exited with code 1"`` or ``"was killed by SIGSEGV (...)"``."""
    if failure.signal:
        return f"was killed by {failure.signal} (exitcode {failure.exitcode})"
    if failure.pid is None:
        return f"could not start (exitcode {failure.exitcode})"
    return f"exited with code {failure.exitcode}"


def _says_only_how(failure: Failure) -> bool:
    """True when the message is just the exit code or signal (already shown by ``_how``)."""
    return failure.message in (
        f"exited with code {failure.exitcode}",
        f"killed by {failure.signal}",
    )


def _clock(timestamp: float) -> str:
    import datetime  # lazy: only failure texts need it (import time of corral)

    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="milliseconds")


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def _cut(lines: list[str], keep: int) -> list[str]:
    """Keep the first line and the last ``keep - 1`` lines (the raise is at the end)."""
    if len(lines) <= keep:
        return lines
    return [
        lines[0],
        f"... ({len(lines) - keep + 1} lines cut, see the error file) ...",
        *lines[-(keep - 1) :],
    ]


def _tail(path: Path, count: int) -> list[str]:
    """The last ``count`` non-empty lines of a log file (read from its end only)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = [line.rstrip() for line in data.decode("utf-8", "replace").splitlines()]
    lines = [line[:LINE_MAX] for line in lines if line.strip()]
    if size > TAIL_BYTES and lines:
        lines = lines[1:]  # probably a partial line
    return lines[-count:]


def signal_name(signum: int) -> str:
    """The name of signal ``signum`` (``"SIGSEGV"``), or ``"SIG<n>"`` for one without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def _ranges(ranks: frozenset[int] | set[int]) -> str:
    """Render ``{0, 1, 2, 5}`` as ``"0-2,5"``."""
    items = sorted(ranks)
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


for _cls in (RankLogs, Failure, Result):
    _cls.__module__ = "corral"


# -- assembly --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RankOutcome:
    """What the supervisor saw of one rank, once it is reaped (the input of ``assemble``).

    Attributes:
        rank, logs: the rank and its log files.
        pid: its pid, ``None`` when it never started.
        returncode: Popen convention; ``None`` only when it never started.
        exit_time: when its exit was seen (seconds since the epoch).
        after_close: it exited after corral began closing the group.
        exec_failed: ``(exitcode, message)`` when the program could not be executed.
        result_file: where a callable rank pickled its return value.
        log_errors: errors met while writing its log files.
    """

    rank: int
    logs: RankLogs
    pid: int | None
    returncode: int | None
    exit_time: float | None
    after_close: bool
    exec_failed: tuple[int, str] | None
    result_file: Path | None
    log_errors: tuple[str, ...]
    hung: str | None = None


def assemble(
    outcomes: Sequence[RankOutcome],
    *,
    started_at: float,
    log_dir: Path | None,
    pids: dict[int, int],
    stacks: dict[int, Path],
) -> Result:
    """The group's Result: who failed on their own, who was terminated, what each returned."""
    exit_codes: dict[int, int] = {}
    failures: dict[int, Failure] = {}
    returns: dict[int, object] = {}
    terminated: set[int] = set()
    for o in outcomes:
        if o.exec_failed is not None:
            code, message = o.exec_failed
            exit_codes[o.rank] = code
            failures[o.rank] = Failure(
                rank=o.rank,
                pid=None,
                exitcode=code,
                signal=None,
                timestamp=o.exit_time or started_at,
                error_file=None,
                error=None,
                message=message,
                logs=o.logs,
            )
            continue
        code_ = o.returncode
        assert code_ is not None
        exit_codes[o.rank] = code_
        if o.hung is not None:  # failed by corral as hung: the cause, not a victim
            failures[o.rank] = replace(failure_of(o, code_, o.hung), timestamp=o.exit_time or 0.0)
        elif o.after_close:
            terminated.add(o.rank)
        elif code_ != 0:
            failures[o.rank] = failure_of(o, code_)
        else:
            value, failure = _return_value(o)
            returns[o.rank] = value
            if failure is not None:
                failures[o.rank] = failure
    return Result(
        exit_codes=exit_codes,
        return_values=returns,
        failures=failures,
        terminated=frozenset(terminated),
        logs={o.rank: o.logs for o in outcomes},
        log_dir=log_dir,
        log_errors={o.rank: o.log_errors for o in outcomes if o.log_errors},
        pids=pids,
        stacks=stacks,
    )


def failure_of(o: RankOutcome, code: int, message: str | None = None) -> Failure:
    """Rank ``o``'s Failure: its error file, when there is one, explains it."""
    sig = signal_name(-code) if code < 0 else None
    info = read_error_file(o.logs.error_file)
    timestamp = o.exit_time or time.time()
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
        rank=o.rank,
        pid=o.pid,
        exitcode=code,
        signal=sig,
        timestamp=timestamp,
        error_file=o.logs.error_file if info is not None else None,
        error=info.content if info is not None else None,
        message=message,
        traceback=info.traceback if info is not None else None,
        logs=o.logs,
    )


def _return_value(o: RankOutcome) -> tuple[object, Failure | None]:
    """Load a callable rank's return value (None for void and for commands)."""
    if o.result_file is None:
        return None, None
    try:
        return load_result(o.result_file), None
    except Exception as exc:
        name = type(exc).__qualname__
        return None, failure_of(
            o,
            0,
            f"its return value was pickled but cannot be loaded by the supervisor "
            f"({name}: {exc}); return types the supervisor can import",
        )


class GroupFailedError(CorralError):
    """Raised by :meth:`Result.raise_for_failure` when at least one rank failed.

    Attributes:
        result: the :class:`Result` whose failures this error explains.
    """

    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(result.describe())

    def __reduce__(self) -> tuple[type[GroupFailedError], tuple[Result]]:
        return (type(self), (self.result,))
