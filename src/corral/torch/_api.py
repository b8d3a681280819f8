"""The value types of ``torch.distributed.elastic.multiprocessing``, without torch.

``Std``, ``to_map``, the logs specs, ``ProcessFailure``, ``RunProcsResult``,
``SignalException`` and ``record`` behave as PyTorch 2.13's (names, fields,
exception types, wording), written for corral: importing them never imports
torch. The differences are listed in the README ("Drop-in for
torch.distributed.elastic.multiprocessing").
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = (
    "NOT_AVAILABLE",
    "DefaultLogsSpecs",
    "LogsDest",
    "LogsSpecs",
    "ProcessFailure",
    "RunProcsResult",
    "SignalException",
    "Std",
    "record",
    "to_map",
    "torch_error_data",
    "validate_full_rank",
    "wrap",
)

P = ParamSpec("P")
R = TypeVar("R")

#: PyTorch's placeholder for a missing error file or signal name.
NOT_AVAILABLE: Final = "<N/A>"
#: PyTorch's ``error_file_data`` when a rank left no error file.
NO_ERROR_DATA: Final = "<NONE>"
#: PyTorch's message for a rank that exited non-zero without an error file.
NO_TRACEBACK: Final = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"
_VALUE: Final = re.compile(r"^[0123]$")
_MAPPING: Final = re.compile(r"^(\d:[0123],)*(\d:[0123])$")


class SignalException(Exception):
    """Raised in the main thread when the supervisor gets a signal it handles.

    ``start()`` installs handlers (``TORCHELASTIC_SIGNALS_TO_HANDLE``, default
    ``SIGTERM,SIGINT,SIGHUP,SIGQUIT``) as PyTorch does; catch it around
    ``wait()`` and call ``close(e.sigval)``.
    """

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval


def terminate_handler(signum: int, frame: object) -> None:
    """The handler ``start()`` installs: turn the signal into a ``SignalException``."""
    sigval = signal.Signals(signum)
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)


class Std(enum.IntFlag):
    """Which standard streams: ``NONE``, ``OUT``, ``ERR``, ``ALL`` (PyTorch's ``Std``)."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR

    @classmethod
    def from_str(cls, vm: str) -> Std | dict[int, Std]:
        """``"3"`` -> ``Std.ALL``; ``"0:1,1:2"`` -> ``{0: Std.OUT, 1: Std.ERR}``.

        Raises:
            ValueError: anything else (as PyTorch: single-digit ranks, no spaces).
        """
        if _VALUE.match(vm):
            return cls(int(vm))
        if _MAPPING.match(vm):
            pairs = (item.split(":") for item in vm.split(","))
            return {int(rank): cls(int(value)) for rank, value in pairs}
        raise ValueError(f"{vm} does not match: <{_VALUE.pattern}> or <{_MAPPING.pattern}>")


def to_map(val_or_map: Std | Mapping[int, Std], local_world_size: int) -> dict[int, Std]:
    """One ``Std`` for every rank, or a mapping completed with ``Std.NONE``."""
    if isinstance(val_or_map, int):
        return dict.fromkeys(range(local_world_size), Std(val_or_map))
    return {rank: Std(val_or_map.get(rank, Std.NONE)) for rank in range(local_world_size)}


def validate_full_rank(d: Mapping[int, object], nprocs: int, what: str) -> None:
    """PyTorch's check that ``d`` names exactly the ranks ``0..nprocs-1``.

    Raises:
        RuntimeError: another key set (PyTorch's type and wording).
    """
    actual, expected = set(d), set(range(nprocs))
    if actual != expected:
        raise RuntimeError(
            f"{what}, local rank mapping mismatch, expected: {expected}, actual: {actual}"
        )


@dataclass
class LogsDest:
    """Where each rank's streams and error file go (PyTorch's ``LogsDest``).

    ``stdouts``/``stderrs`` hold ``""`` for a stream left on the console.
    """

    stdouts: dict[int, str] = field(default_factory=dict)
    stderrs: dict[int, str] = field(default_factory=dict)
    tee_stdouts: dict[int, str] = field(default_factory=dict)
    tee_stderrs: dict[int, str] = field(default_factory=dict)
    error_files: dict[int, str] = field(default_factory=dict)
    filtered_stdout: str = field(default_factory=str)
    filtered_stderr: str = field(default_factory=str)


class LogsSpecs(ABC):
    """Turns per-rank environments into a :class:`LogsDest` (PyTorch's ``LogsSpecs``)."""

    def __init__(
        self,
        log_dir: str | None = None,
        redirects: Std | dict[int, Std] = Std.NONE,
        tee: Std | dict[int, Std] = Std.NONE,
        local_ranks_filter: set[int] | None = None,
    ) -> None:
        self._root_log_dir = log_dir
        self._redirects = redirects
        self._tee = tee
        self._local_ranks_filter = local_ranks_filter

    @abstractmethod
    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Create the folders of this run and say where everything goes."""

    @property
    @abstractmethod
    def root_log_dir(self) -> str:
        """The folder under which this spec's logs go."""


class DefaultLogsSpecs(LogsSpecs):
    """PyTorch's layout: ``{log_dir}/{run_id}_XXXX/attempt_{n}/{rank}/{stdout,stderr}.log``.

    ``run_id`` and ``n`` come from rank 0's ``TORCHELASTIC_RUN_ID`` (default
    ``test_run_id``) and ``TORCHELASTIC_RESTART_COUNT`` (default ``0``).

    Raises:
        NotADirectoryError: ``log_dir`` is a file.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        redirects: Std | dict[int, Std] = Std.NONE,
        tee: Std | dict[int, Std] = Std.NONE,
        local_ranks_filter: set[int] | None = None,
    ) -> None:
        if log_dir != os.devnull:
            if not log_dir:
                log_dir = tempfile.mkdtemp(prefix="torchelastic_")
            elif not os.path.exists(log_dir):
                os.makedirs(log_dir, exist_ok=True)
            elif os.path.isfile(log_dir):
                raise NotADirectoryError(f"log_dir: {log_dir} is a file")
        super().__init__(log_dir, redirects, tee, local_ranks_filter)
        self._run_log_dir: str | None = None

    @property
    def root_log_dir(self) -> str:
        return str(self._root_log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Create ``{run_id}_XXXX/attempt_{n}`` (emptied) and name each rank's files.

        The rank folders themselves are created by corral when the ranks start.
        Each rank's ``TORCHELASTIC_ERROR_FILE`` is set in ``envs``.

        Raises:
            ValueError: ``log_dir`` is ``os.devnull`` (not supported by corral).
        """
        if self._root_log_dir == os.devnull:
            raise ValueError(
                "corral.torch does not support log_dir=os.devnull: corral keeps every "
                "rank's error file; pass a folder (or None for a temporary one)"
            )
        nprocs = len(envs)
        first = envs.get(0, {})
        run_id = first.get("TORCHELASTIC_RUN_ID", "test_run_id")
        restart_count = first.get("TORCHELASTIC_RESTART_COUNT", "0")
        if not self._run_log_dir:
            base = self._root_log_dir or tempfile.mkdtemp(prefix="torchelastic_")
            os.makedirs(base, exist_ok=True)
            self._run_log_dir = tempfile.mkdtemp(prefix=f"{run_id}_", dir=base)
        attempt_dir = os.path.join(self._run_log_dir, f"attempt_{restart_count}")
        shutil.rmtree(attempt_dir, ignore_errors=True)
        os.makedirs(attempt_dir)

        redirs = to_map(self._redirects, nprocs)
        tees = to_map(self._tee, nprocs)
        dest = LogsDest(
            stdouts=dict.fromkeys(range(nprocs), ""),
            stderrs=dict.fromkeys(range(nprocs), ""),
            filtered_stdout=os.path.join(attempt_dir, "filtered_stdout.log"),
            filtered_stderr=os.path.join(attempt_dir, "filtered_stderr.log"),
        )
        shown = self._local_ranks_filter
        for rank in range(nprocs):
            folder = os.path.join(attempt_dir, str(rank))
            redirect = redirs[rank] | tees[rank]  # tee implies redirect
            if redirect & Std.OUT:
                dest.stdouts[rank] = os.path.join(folder, "stdout.log")
            if redirect & Std.ERR:
                dest.stderrs[rank] = os.path.join(folder, "stderr.log")
            if shown is None or rank in shown:
                if tees[rank] & Std.OUT:
                    dest.tee_stdouts[rank] = dest.stdouts[rank]
                if tees[rank] & Std.ERR:
                    dest.tee_stderrs[rank] = dest.stderrs[rank]
            else:  # not shown: teed streams go to their files only, the others nowhere
                for streams in (dest.stdouts, dest.stderrs):
                    streams[rank] = streams[rank] or os.devnull
            dest.error_files[rank] = os.path.join(folder, "error.json")
            envs[rank]["TORCHELASTIC_ERROR_FILE"] = dest.error_files[rank]
        return dest

    def __repr__(self) -> str:
        return (
            f"DefaultLogsSpecs(root_log_dir={self._root_log_dir}, redirects={self._redirects}, "
            f"tee={self._tee}, local_ranks_filter={self._local_ranks_filter})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DefaultLogsSpecs):
            return False
        return (
            self._root_log_dir,
            self._redirects,
            self._tee,
            self._local_ranks_filter,
        ) == (other._root_log_dir, other._redirects, other._tee, other._local_ranks_filter)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value (as PyTorch's)


def torch_error_data(data: dict[str, Any]) -> dict[str, Any]:
    """An error file's content in PyTorch's shape (corral's own format is converted).

    corral's callable ranks record ``{"message", "type", "traceback",
    "timestamp"}``; PyTorch code reads ``data["message"]["extraInfo"]``.
    """
    message = data.get("message")
    if isinstance(message, str) and "traceback" in data and "type" in data:
        stamp = data.get("timestamp")
        seconds = int(stamp) if isinstance(stamp, (int, float)) else int(time.time())
        return {
            "message": {
                "message": message,
                "extraInfo": {"py_callstack": data["traceback"], "timestamp": str(seconds)},
            }
        }
    return data


@dataclass
class ProcessFailure:
    """A failed rank, as PyTorch reports it.

    Built from its error file when there is one (PyTorch's or corral's
    format; ``error_file_data`` is always in PyTorch's shape); otherwise
    ``error_file`` is ``"<N/A>"``, ``error_file_data`` ``{"message": "<NONE>"}``
    and ``message`` says which signal or how to get a traceback. ``timestamp``
    is whole seconds since the epoch (PyTorch's type).
    """

    local_rank: int
    pid: int
    exitcode: int
    error_file: str
    error_file_data: dict[str, Any] = field(init=False)
    message: Any = field(init=False)
    timestamp: int = field(init=False)

    def __post_init__(self) -> None:
        self.message = ""
        self.timestamp = int(time.time())
        if os.path.isfile(self.error_file):
            with open(self.error_file, encoding="utf-8") as fp:
                self.error_file_data = torch_error_data(json.load(fp))
            message = self.error_file_data["message"]
            if isinstance(message, str):
                self.timestamp = int(self.error_file_data.get("timestamp", 0))
            else:
                self.timestamp = int(message["extraInfo"]["timestamp"])
            self.message = message
        else:
            self.error_file = NOT_AVAILABLE
            self.error_file_data = {"message": NO_ERROR_DATA}
        if not self.message:
            if self.exitcode < 0:
                self.message = (
                    f"Signal {-self.exitcode} ({self.signal_name()}) received by PID {self.pid}"
                )
            else:
                self.error_file_data["errorTraits"] = {
                    "category": "system_terminated_error",
                    "retryability": "False",
                }
                self.message = NO_TRACEBACK

    def signal_name(self) -> str:
        """``"SIGSEGV"`` for a rank killed by a signal, else ``"<N/A>"``."""
        if self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return NOT_AVAILABLE
        return NOT_AVAILABLE

    def timestamp_isoformat(self) -> str:
        """The timestamp as ``YYYY-MM-DD_HH:MM:SS`` (local time)."""
        import datetime

        return datetime.datetime.fromtimestamp(self.timestamp).isoformat(sep="_")


@dataclass
class RunProcsResult:
    """The outcome of ``PContext.wait()``: all mapped by local rank.

    ``return_values`` is empty after a failure (binaries get ``None`` per
    rank); ``stdouts``/``stderrs`` hold ``""`` for a stream not redirected.
    """

    return_values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, ProcessFailure] = field(default_factory=dict)
    stdouts: dict[int, str] = field(default_factory=dict)
    stderrs: dict[int, str] = field(default_factory=dict)

    def is_failed(self) -> bool:
        """True when any rank failed."""
        return len(self.failures) > 0


def _write_torch_error(exc: BaseException) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(exc)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as fp:
            json.dump(data, fp)
    except OSError as err:  # recording must never hide the error itself: say it, go on
        sys.stderr.write(f"corral.torch: could not write the error file {path}: {err}\n")


def record(fn: Callable[P, R]) -> Callable[P, R]:
    """Write an uncaught exception to ``TORCHELASTIC_ERROR_FILE`` in PyTorch's format.

    The exception is re-raised; ``SystemExit`` and ``KeyboardInterrupt`` pass
    unrecorded. Outside a supervisor (no such variable) it only re-raises.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            _write_torch_error(exc)
            raise

    return wrapper


@contextlib.contextmanager
def _redirected(path: str, stream: str) -> Iterator[None]:
    """Send this process's ``stream`` (fd level) to the file ``path``; ``""``: unchanged."""
    if not path:
        yield
        return
    py_stream = getattr(sys, stream)
    fd = py_stream.fileno()
    py_stream.flush()
    saved = os.dup(fd)
    try:
        with open(path, "ab") as target:
            os.dup2(target.fileno(), fd)
            try:
                yield
            finally:
                getattr(sys, stream).flush()
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def wrap(
    local_rank: int,
    fn: Callable[..., object],
    args: Mapping[int, tuple[object, ...]],
    envs: Mapping[int, Mapping[str, str]],
    stdout_redirects: Mapping[int, str],
    stderr_redirects: Mapping[int, str],
    ret_vals: Mapping[int, Any],
    queue_finished_reading_event: Any,
    numa_options: object = None,
) -> None:
    """PyTorch's per-rank trampoline, in this process (kept for code that calls it).

    corral itself never uses it: its ranks are fresh interpreters.
    """
    os.environ.update(envs[local_rank])
    with (
        _redirected(stdout_redirects[local_rank], "stdout"),
        _redirected(stderr_redirects[local_rank], "stderr"),
    ):
        value = record(fn)(*args[local_rank])
    ret_vals[local_rank].put(value)
    queue_finished_reading_event.wait()
