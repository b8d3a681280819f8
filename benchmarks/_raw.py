"""The raw baseline: what the machine allows, with no supervisor library at all.

``os.posix_spawn`` (``setsid=True``) starts each rank, ``os.pidfd_open`` turns
its exit into a readable fd, one ``select.epoll`` waits on every pidfd and every
pipe. Teed pipes are read with ``os.read`` into the log file and prefixed with
one ``bytes.replace`` per chunk. This is the physical floor corral is measured
against, not a usable library (no containment sweep, no error files).
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

CHUNK = 65536


class RawGroup:
    """N ranks under posix_spawn + pidfd + epoll."""

    def __init__(
        self,
        argvs: Sequence[Sequence[str]],
        envs: Sequence[Mapping[str, str]],
        log_dir: Path,
        *,
        tee: bool,
        console_fd: int = 1,
        prefix: str = "[{rank}]: ",
    ) -> None:
        self.argvs = argvs
        self.envs = envs
        self.log_dir = log_dir
        self.tee = tee
        self.console_fd = console_fd
        self.prefix = prefix
        self.ep = select.epoll()
        self.pids: dict[int, int] = {}  # pidfd -> rank
        self.pid_of: dict[int, int] = {}  # rank -> pid
        self.codes: dict[int, int] = {}
        self.pipes: dict[int, tuple[int, bytes, bytes, list[bytes]]] = {}
        self.pidfds: dict[int, int] = {}  # rank -> pidfd

    def start(self) -> None:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for rank, argv in enumerate(self.argvs):
                self._start_one(rank, argv, devnull)
        finally:
            os.close(devnull)

    def _start_one(self, rank: int, argv: Sequence[str], devnull: int) -> None:
        rdir = self.log_dir / str(rank)
        rdir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        out_log = os.open(rdir / "stdout.log", flags, 0o644)
        err_log = os.open(rdir / "stderr.log", flags, 0o644)
        close_after: list[int] = []
        if self.tee:
            r_out, w_out = os.pipe2(os.O_CLOEXEC)
            r_err, w_err = os.pipe2(os.O_CLOEXEC)
            child_out, child_err = w_out, w_err
            close_after += [w_out, w_err]
        else:
            child_out, child_err = out_log, err_log
            close_after += [out_log, err_log]
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull, 0),
            (os.POSIX_SPAWN_DUP2, child_out, 1),
            (os.POSIX_SPAWN_DUP2, child_err, 2),
        ]
        try:
            pid = os.posix_spawn(
                argv[0], list(argv), self.envs[rank], file_actions=actions, setsid=True
            )
        finally:
            for fd in close_after:
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.pids[pidfd] = rank
        self.pid_of[rank] = pid
        self.pidfds[rank] = pidfd
        self.ep.register(pidfd, select.EPOLLIN)
        if self.tee:
            for r_fd, log, stream in ((r_out, out_log, "out"), (r_err, err_log, "err")):
                prefix = self.prefix.format(rank=rank, stream=stream).encode()
                os.set_blocking(r_fd, False)
                self.pipes[r_fd] = (log, prefix, b"\n" + prefix, [b""])
                self.ep.register(r_fd, select.EPOLLIN)

    # -- events -------------------------------------------------------------
    def _on_pipe(self, fd: int) -> None:
        log, prefix, nl_prefix, partial = self.pipes[fd]
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.ep.unregister(fd)
            os.close(fd)
            if partial[0]:
                os.write(self.console_fd, prefix + partial[0] + b"\n")
            os.close(log)
            del self.pipes[fd]
            return
        view = memoryview(data)
        while view:
            view = view[os.write(log, view) :]
        end = data.rfind(b"\n") + 1
        if end == 0:
            partial[0] += data
            return
        head = data[:end]
        if partial[0]:
            head = partial[0] + head
        partial[0] = data[end:]
        out = memoryview(prefix + head[:-1].replace(b"\n", nl_prefix) + b"\n")
        while out:
            out = out[os.write(self.console_fd, out) :]

    def _on_exit(self, pidfd: int) -> int:
        rank = self.pids.pop(pidfd)
        self.ep.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(self.pid_of[rank], 0)
        code = os.waitstatus_to_exitcode(status)
        self.codes[rank] = code
        return code

    def _pump(self, timeout: float) -> bool:
        """Handle one batch of events; True if a rank failed."""
        failed = False
        for fd, _ev in self.ep.poll(timeout):
            if fd in self.pids:
                if self._on_exit(fd) != 0:
                    failed = True
            elif fd in self.pipes:
                self._on_pipe(fd)
        return failed

    def wait(self, grace: float = 30.0) -> dict[int, int]:
        """Wait for every rank; on the first failure SIGTERM, grace, SIGKILL the rest."""
        while self.pids:
            if self._pump(-1):
                self.close(grace)
                break
        while self.pipes:
            self._pump(-1)
        return self.codes

    def close(self, grace: float) -> dict[int, int]:
        for rank, pid in self.pid_of.items():
            if rank not in self.codes:
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while self.pids:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pump(left)
        for rank, pid in self.pid_of.items():
            if rank not in self.codes:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while self.pids or self.pipes:
            self._pump(-1)
        self.ep.close()
        return self.codes
