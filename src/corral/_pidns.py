"""A group's PID namespace: containment the kernel guarantees.

Some facts about PID namespaces (Linux; checked on this project's machines,
kernel 6.x, 2026-12):

* ``unshare(CLONE_NEWPID)`` changes only the *calling thread's*
  ``pid_for_children``; the calling process stays where it is. The first
  child forked afterwards is PID 1, the *init*, of the new namespace.
  ``setns(fd, CLONE_NEWPID)`` sets ``pid_for_children`` again: to our own
  namespace (restored at once, so nothing else we fork lands there) or to a
  descendant namespace, the group's, around each rank's ``fork``. Both need
  ``CAP_SYS_ADMIN`` in our user namespace (root; a privileged container).
* A rank forked that way is *our* child living in the group's namespace: its
  exit status, its pidfd, ``killpg`` and the pid we see are the usual ones.
  Inside, it sees namespace-local pids (``os.getpid()`` is 2, 3, ...) and
  ``os.getppid()`` is 0.
* When the init dies, the kernel SIGKILLs every process of the namespace and
  refuses new ones (``fork`` fails with ``ENOMEM``): no walk, no race with a
  process forking at that instant, no escape by ``setsid`` or a cleared
  environment. The init is reaped only after every other process of the
  namespace has been reaped, so "init reaped" means "the group is gone".
* Orphans inside are re-parented to the init, never to a subreaper outside
  (the kernel does not let re-parenting cross the namespace), and the init
  reaps them.
* The init ignores signals from inside the namespace that it has no handler
  for, SIGKILL included: a rank cannot take it down. From our side SIGKILL
  works.
* The init is ``cat`` blocked reading a pipe whose only write end the
  supervisor holds: when the supervisor dies, however (SIGKILL included), the
  read returns, the init exits and the namespace dies with it. A ``fork()``
  of the supervisor without ``exec`` would inherit that write end: an at-fork
  hook closes it in the child. The init never waits for the orphans
  re-parented to it: they stay zombies until the namespace ends at close,
  which reaps them all.

Measured here: creating the namespace and its init costs ~0.3 ms in the
supervisor and ~1 ms of CPU for the shell (a Python init cost ~10 ms of CPU,
which a launch of 8 short ranks on 2 cores paid in wall time), each rank's
``setns`` pair ~2 us, the SIGKILL of the init to its reaping ~0.3 ms with 8
ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import weakref
from typing import TYPE_CHECKING, Final

from . import _platform
from ._platform import CAT

if TYPE_CHECKING:
    import asyncio
    import subprocess
    from collections.abc import Iterable, Iterator

__all__ = ("Namespace",)

_log = logging.getLogger("corral")

#: The init of a group's namespace: ``cat``, reading a pipe only the supervisor
#: holds, to /dev/null; it returns, ending the namespace, at the end of that pipe
#: (the supervisor died, or let go). Not a shell blocked in ``read``: dash
#: *catches* SIGCHLD whatever ``trap '' CHLD`` says, so the first orphan that
#: died in the namespace interrupted the ``read``, the init exited and the
#: kernel SIGKILLed every rank (seen 1 in 40 Ctrl-C closes of a rank with a
#: child). ``cat`` has no handler at all, so no signal from outside but SIGKILL
#: reaches it, and it retries a read a signal interrupts.
INIT: Final = (CAT,)
#: The supervisor's write ends of live inits' pipes, closed in a forked child.
_HELD: weakref.WeakSet[Namespace] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ns in list(_HELD):
        ns._close_pipe()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Namespace:
    """One group's PID namespace and its init process."""

    def __init__(self, init: subprocess.Popen[bytes], ns_fd: int, pipe: int) -> None:
        self._init = init
        self._ns_fd: int | None = ns_fd
        self._pipe: int | None = pipe
        self._gone: asyncio.Future[None] | None = None
        _HELD.add(self)

    @property
    def pid(self) -> int:
        """The init's pid (as this process sees it)."""
        return self._init.pid

    @classmethod
    def create(cls) -> Namespace:
        """Start a new namespace with its init, before any rank.

        Raises:
            OSError: the kernel refused (no ``CAP_SYS_ADMIN``, a seccomp
                filter) or the init could not start.
        """
        read_end, write_end = os.pipe()
        try:
            with _platform.new_pid_namespace():
                init = _platform.spawn_helper(INIT, read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        try:
            ns_fd = _platform.pid_namespace_of(init.pid)  # ours until we reap it
        except OSError:
            os.close(write_end)
            init.kill()
            init.wait()
            raise
        return cls(init, ns_fd, write_end)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Within the block, processes this thread forks are born in the namespace.

        Keep the block synchronous (no ``await``): other tasks of the loop
        must not fork into the group.
        """
        assert self._ns_fd is not None
        with _platform.pid_namespace_for_children(self._ns_fd):
            yield

    def members(self, roots: Iterable[int]) -> list[int]:
        """Every process found below the init and below ``roots`` (live ranks), by parent links.

        Best effort, for a graceful first signal: processes forked meanwhile,
        or by a thread other than their parent's main thread, are missed here
        (those in a rank's process group still get the rank's signal), and
        ended by :meth:`kill` like every other.
        """
        found: list[int] = []
        todo = [self.pid, *roots]
        seen = set(todo)
        while todo:
            for child in _platform.children_of(todo.pop()):
                if child not in seen:
                    seen.add(child)
                    found.append(child)
                    todo.append(child)
        return found

    def has_members(self) -> bool:
        """True when the init has children (descendants of exited ranks live on)."""
        return bool(_platform.children_of(self.pid))

    def kill(self) -> None:
        """SIGKILL the init: the kernel ends every process of the namespace."""
        if self._init.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._init.pid, signal.SIGKILL)  # our unreaped child: no reuse race
        self._close_fd()
        self._close_pipe()

    def wait_gone(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Resolves once the init is reaped: every process of the namespace is gone.

        Call after :meth:`kill` (and reap the ranks, which the init waits for).
        """
        if self._gone is not None:
            return self._gone
        self._gone = gone = loop.create_future()
        init = self._init
        if init.returncode is not None:
            gone.set_result(None)
            return gone

        def on_exit(code: int) -> None:
            init.returncode = code
            if code != -signal.SIGKILL:
                _log.warning(
                    "corral: the init of a group's pid namespace had exited early (code %d)",
                    code,
                )
            if not gone.done():
                gone.set_result(None)

        _platform.watch_exit(loop, init.pid, on_exit)
        return gone

    def abandon(self) -> None:
        """For a group never closed (garbage-collected): end the namespace now.

        The init is reaped by ``subprocess``'s own clean-up of abandoned children.
        """
        self.kill()

    def _close_fd(self) -> None:
        fd, self._ns_fd = self._ns_fd, None
        if fd is not None:
            os.close(fd)

    def _close_pipe(self) -> None:
        fd, self._pipe = self._pipe, None
        if fd is not None:
            os.close(fd)
