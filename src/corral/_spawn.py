"""Start one rank: argv, environment, file descriptors, its own session.

``subprocess.Popen`` is used for the fork/exec itself: since Python 3.10 it
starts children with ``vfork`` when no ``preexec_fn`` is given (the fast path
measured here: uvloop's spawn is 5-6x slower), it closes every descriptor but
0, 1 and 2 in the child (``close_fds``) and it reports an exec failure
synchronously through its error pipe. What asyncio's subprocess transport adds
on top is avoided on purpose: on Python 3.11 its child watcher spends a thread
per child, and its ``wait()`` does not return while a grandchild holds the
pipe. Exits are watched with pidfds instead (``_platform.watch_exit``).
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from ._config import READY_FD_ENV
from ._std import Std

if TYPE_CHECKING:
    from ._config import GroupPlan, RankPlan

__all__ = ("ExecFailed", "Started", "start_rank")


@dataclass(frozen=True, slots=True)
class Started:
    """A rank that is running."""

    popen: subprocess.Popen[bytes]
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None
    #: The read end of its readiness pipe (``ready_fd``), non-blocking; the caller closes it.
    ready: int | None = None


@dataclass(frozen=True, slots=True)
class ExecFailed:
    """A rank whose program could not be executed (127 missing, 126 not executable)."""

    exitcode: int
    message: str


def _open_log(path: os.PathLike[str] | None) -> int:
    assert path is not None
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


def start_rank(plan: GroupPlan, rank: RankPlan) -> Started | ExecFailed:
    """Start ``rank`` in a new session with its streams wired as planned.

    A stream that is only redirected is opened here and handed to the child,
    which writes its log file itself (no copy through the supervisor). A teed
    stream is a pipe, returned for the caller's pump. An inherited stream is
    left alone.

    Raises:
        OSError: a resource limit (no fds, no processes) stopped the start.
    """
    fds: list[int] = []
    env, ready = rank.env, None
    pass_fds: tuple[int, ...] = ()
    try:
        if plan.ready_fd:
            ready, writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            fds.append(writer)  # the child's copy is enough: ours closes after the start
            os.set_blocking(writer, True)  # the rank's end behaves as an ordinary pipe
            env, pass_fds = {**env, READY_FD_ENV: str(writer)}, (writer,)
        out: int | None = None
        err: int | None = None
        if (rank.tee | rank.watch) & Std.OUT:
            out = subprocess.PIPE
        elif rank.redirect & Std.OUT:
            out = _open_log(rank.logs.stdout)
            fds.append(out)
        if (rank.tee | rank.watch) & Std.ERR:
            err = subprocess.PIPE
        elif rank.redirect & Std.ERR:
            err = _open_log(rank.logs.stderr)
            fds.append(err)
        try:
            popen = subprocess.Popen(
                rank.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=plan.cwd,
                close_fds=True,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        except OSError as exc:
            failed = _exec_failed(exc, rank.argv[0])
            if failed is None:
                raise
            return failed
        started = Started(popen=popen, stdout=popen.stdout, stderr=popen.stderr, ready=ready)
        ready = None  # the caller's now
        return started
    finally:
        for fd in fds:
            os.close(fd)
        if ready is not None:  # no rank to say it: our end goes too
            os.close(ready)


def _exec_failed(exc: OSError, program: str) -> ExecFailed | None:
    """The exit code and message of a program that cannot be executed (else ``None``)."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ExecFailed(127, f"cannot execute {program!r}: {exc.strerror}")
    if isinstance(exc, PermissionError) or exc.errno in (
        errno.ENOEXEC,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
    ):
        return ExecFailed(126, f"cannot execute {program!r}: {exc.strerror}")
    return None
