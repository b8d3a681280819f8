"""Frozen records of what happened: ``RankLogs``, ``Failure`` and ``Result``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import GroupFailedError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ("Failure", "RankLogs", "Result")


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

    def describe(self) -> str:
        """Return a few readable lines: what failed, how, where its logs are."""
        import datetime  # lazy: only describe() needs it

        when = datetime.datetime.fromtimestamp(self.timestamp).isoformat(
            sep=" ", timespec="milliseconds"
        )
        how = (
            f"signal {self.signal} (exitcode {self.exitcode})"
            if self.signal
            else (f"exitcode {self.exitcode}")
        )
        pid = "never started" if self.pid is None else f"pid {self.pid}"
        lines = [f"rank {self.rank} ({pid}) failed at {when}: {how}", f"  {self.message}"]
        if self.traceback:
            lines.append("  traceback:")
            lines.extend("    " + line for line in self.traceback.rstrip().splitlines())
        if self.logs is not None:
            for name, path in (
                ("stdout", self.logs.stdout),
                ("stderr", self.logs.stderr),
            ):
                if path is not None:
                    lines.append(f"  {name}: {path}")
        if self.error_file is not None:
            lines.append(f"  error file: {self.error_file}")
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
    """

    exit_codes: dict[int, int]
    return_values: dict[int, object] = field(default_factory=dict)
    failures: dict[int, Failure] = field(default_factory=dict)
    terminated: frozenset[int] = frozenset()
    logs: dict[int, RankLogs] = field(default_factory=dict)
    log_dir: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no rank failed and none was terminated."""
        return not self.failures and not self.terminated

    @property
    def root_cause(self) -> Failure | None:
        """The earliest failure by timestamp (ties go to the lower rank), or ``None``."""
        if not self.failures:
            return None
        return min(self.failures.values(), key=lambda f: (f.timestamp, f.rank))

    def raise_for_failure(self) -> None:
        """Raise ``GroupFailedError`` explaining the root cause, if any rank failed.

        Raises:
            GroupFailedError: at least one rank failed; its ``result`` is this Result.
        """
        if self.failures:
            raise GroupFailedError(self)

    def describe(self) -> str:
        """Return a readable account: the root cause first, then the others."""
        root = self.root_cause
        if root is None:
            if self.terminated:
                return f"no rank failed; ranks {_ranges(self.terminated)} were terminated by close"
            return "every rank succeeded"
        n = len(self.exit_codes)
        lines = [
            f"{len(self.failures)} of {n} rank(s) failed; root cause: rank {root.rank}",
            "",
            root.describe(),
        ]
        others = [f for f in sorted(self.failures.values(), key=lambda f: f.rank) if f is not root]
        if others:
            lines += ["", "other failures:"]
            lines += [f"  rank {f.rank} (pid {f.pid}): {f.message}" for f in others]
        if self.terminated:
            lines += ["", f"terminated by corral: ranks {_ranges(self.terminated)}"]
        if self.log_dir is not None:
            lines += [f"logs: {self.log_dir}"]
        return "\n".join(lines)


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
