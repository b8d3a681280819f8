"""Operating-system capabilities, each with a documented fallback.

Tests force the fallbacks by patching the module-level flags (``HAS_PIDFD``,
``HAS_PROC``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

__all__ = (
    "HAS_PIDFD",
    "HAS_PROC",
    "become_subreaper",
    "pidfd_open",
    "watch_exit",
)

_log = logging.getLogger("corral")

IS_LINUX: Final = sys.platform.startswith("linux")


def _probe_pidfd() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:  # ENOSYS on kernels older than 5.3, or seccomp
        return False
    os.close(fd)
    return True


#: ``pidfd_open(2)`` works: process exits wake the event loop through a pidfd
#: registered with ``add_reader``: no thread, no SIGCHLD handler.
HAS_PIDFD: bool = _probe_pidfd()
#: ``/proc`` can be scanned for a group's descendants (Linux).
HAS_PROC: bool = IS_LINUX and os.path.isdir("/proc/self")

_subreaper_lock = threading.Lock()
_subreaper: bool | None = None


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux, once).

    A rank's descendants whose parent exits are re-parented to the nearest
    ``PR_SET_CHILD_SUBREAPER`` ancestor instead of init. Where init does not
    reap (many containers' PID 1 never calls ``wait``), that is the only way
    their zombies can be collected. corral reaps only processes it identifies
    as members of its own groups; see ``_reap``.

    Returns:
        True when this process is a subreaper.
    """
    global _subreaper
    with _subreaper_lock:
        if _subreaper is None:
            _subreaper = _prctl_subreaper()
        return _subreaper


def _prctl_subreaper() -> bool:
    if not IS_LINUX:
        return False
    import ctypes

    pr_set_child_subreaper: Final = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # no prctl symbol: not Linux/glibc
        return False


def pidfd_open(pid: int) -> int | None:
    """Return a pidfd for ``pid``, or ``None`` when it is gone or pidfds are unavailable."""
    if not HAS_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def watch_exit(loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[[int], None]) -> None:
    """Call ``callback(returncode)`` on ``loop`` once child ``pid`` exits and is reaped.

    With pidfds the wait costs no thread: the pidfd turns readable when the
    child exits and the loop reaps it with ``waitpid(WNOHANG)``. Without them
    (macOS, old kernels) a daemon thread blocks in ``waitpid`` for that child,
    like asyncio's ``ThreadedChildWatcher``.
    """
    fd = pidfd_open(pid)
    if fd is None:
        _watch_with_thread(loop, pid, callback)
        return

    def on_readable() -> None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else (a waitpid(-1) reaper in the host) took the status.
            _log.warning("corral: the exit status of pid %d was reaped by someone else", pid)
            got, status = pid, 255 << 8
        if got == 0:  # spurious wake-up; the pidfd stays registered
            return
        loop.remove_reader(fd)
        os.close(fd)
        callback(os.waitstatus_to_exitcode(status))

    loop.add_reader(fd, on_readable)


def _watch_with_thread(
    loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[[int], None]
) -> None:
    def run() -> None:
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 255
        try:
            loop.call_soon_threadsafe(callback, code)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name=f"corral-waitpid-{pid}", daemon=True).start()
