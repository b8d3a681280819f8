"""Operating-system capabilities, each with a documented fallback.

Tests force the fallbacks by patching the module-level flags (``HAS_PIDFD``,
``HAS_PROC``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio
    import subprocess
    from collections.abc import Callable, Iterator, Sequence

__all__ = (
    "FOREIGN_PROC",
    "HAS_PIDFD",
    "HAS_PROC",
    "HAS_P_PIDFD",
    "acquire_subreaper",
    "children_of",
    "fd_budget",
    "new_pid_namespace",
    "pid_namespace_for_children",
    "pid_namespace_of",
    "pid_namespaces",
    "pidfd_open",
    "release_subreaper",
    "settle_allocator",
    "spawn_helper",
    "watch_exit",
)

_log = logging.getLogger("corral")

IS_LINUX: Final = sys.platform.startswith("linux")
#: A pipe's capacity can be raised (``fcntl.F_SETPIPE_SZ``, Linux).
CAN_RESIZE_PIPES: Final = IS_LINUX and hasattr(fcntl, "F_SETPIPE_SZ")


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
#: ``cat``, the init of a group's PID namespace (see ``_pidns.INIT``); "" without one.
CAT: Final = next((p for p in ("/bin/cat", "/usr/bin/cat") if os.access(p, os.X_OK)), "")
#: ``waitid(P_PIDFD)``: reap exactly the process a pidfd pins (Python 3.9+, Linux 5.4+).
HAS_P_PIDFD: Final = HAS_PIDFD and hasattr(os, "P_PIDFD") and hasattr(os, "waitid")


def _probe_proc() -> tuple[bool, bool]:
    """(``/proc`` is this process's pid namespace's, ``/proc`` is another's)."""
    if not IS_LINUX:
        return False, False
    try:
        ours = os.readlink("/proc/self") == str(os.getpid())
    except OSError:  # no /proc, or one without the self link
        return False, False
    return ours, not ours


#: ``/proc`` can be scanned for a group's descendants (Linux): it shows this
#: process's own pid namespace, so its pids are the pids this process uses.
#: ``FOREIGN_PROC``: a ``/proc`` of another pid namespace (e.g. ``unshare -p``
#: without remounting it): its pids mean other processes, so neither it nor
#: psutil (which reads it) may be used to find or signal anything.
HAS_PROC, FOREIGN_PROC = _probe_proc()

_subreaper_lock = threading.Lock()
_subreaper_users = 0
#: This process was a subreaper before corral touched it: never undo that.
_subreaper_inherited: bool | None = None
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_GET_CHILD_SUBREAPER: Final = 37


def acquire_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants while a group lives (Linux).

    A rank's descendants whose parent exits are re-parented to the nearest
    ``PR_SET_CHILD_SUBREAPER`` ancestor instead of PID 1. Where PID 1 does not
    reap (many containers' init never calls ``wait``) that is the only way
    their zombies can be collected, and it keeps them where corral can find
    and end them. The attribute is process-wide, so it is counted: the first
    live group sets it, the last one to close clears it again (unless this
    process was a subreaper before corral came), so a host's own orphans are
    affected only while a group lives. corral reaps only processes it
    identifies as members of its own groups; see ``_reap``.

    Returns:
        True when this process is now a subreaper.
    """
    global _subreaper_users, _subreaper_inherited
    if not IS_LINUX:
        return False
    with _subreaper_lock:
        if _subreaper_inherited is None:
            _subreaper_inherited = _prctl_get_subreaper()
        _subreaper_users += 1
        if _subreaper_inherited or _subreaper_users > 1:
            return True
        return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def release_subreaper() -> None:
    """Undo one :func:`acquire_subreaper` (the last one clears the attribute)."""
    global _subreaper_users
    if not IS_LINUX:
        return
    with _subreaper_lock:
        _subreaper_users = max(0, _subreaper_users - 1)
        if _subreaper_users == 0 and not _subreaper_inherited:
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> bool:
    try:
        return bool(_libc().prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # no prctl symbol: not Linux/glibc
        return False


def _prctl_get_subreaper() -> bool:
    import ctypes

    flag = ctypes.c_int(0)
    try:
        ok = _libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    return bool(ok and flag.value)


#: Descriptors promised to groups that are starting right now (opened or not yet).
_fds_reserved = 0
_fds_lock = threading.Lock()


#: Freed once, the block that sets glibc's malloc thresholds (see settle_allocator).
_SETTLE_BYTES: Final = 1 << 20
_allocator_settled = False


def settle_allocator() -> None:
    """Raise glibc malloc's trim and mmap thresholds once, as a program's first large free does.

    glibc gives the top of its heap back to the kernel (``brk``) whenever
    more than ``M_TRIM_THRESHOLD`` is free there: 128 KiB until a large
    mmapped block is freed, which raises it to twice that block's size. The
    pumps allocate and free 64 KiB chunks at a high rate, so with the
    default threshold the heap shrinks and regrows every few chunks.
    Measured, 200 MiB through the tee: 3,271 ``brk`` calls instead of 64,
    1.7 instead of 1.1 CPU-s/GiB and 580 instead of 900 MiB/s, in a process
    where nothing large had been freed before (modules loaded from ``.pyc``
    files, as an installed corral's are; compiling them from source happened
    to free such a block). Freeing one 1 MiB block (``calloc`` maps it
    untouched) raises the mmap threshold to 1 MiB and the trim threshold to
    2 MiB for the process, exactly as glibc would at its first large free;
    a threshold set explicitly (``mallopt``, ``MALLOC_TRIM_THRESHOLD_``)
    turns that adjustment off, so it is respected. Elsewhere a no-op.
    """
    global _allocator_settled
    if not _allocator_settled:
        _allocator_settled = True
        bytes(_SETTLE_BYTES)  # allocated (mmapped) and freed at once


@contextlib.contextmanager
def fd_budget(needed: int) -> Iterator[None]:
    """Hold ``needed`` more file descriptors for a group while it starts.

    A teed rank costs up to 5 descriptors in the supervisor (two pipe ends,
    two log files, a pidfd), so a 1024 soft ``RLIMIT_NOFILE`` (a common
    default) runs out near 200 ranks. The check counts what is open now plus
    what groups starting at the same time have been promised (counted twice
    once they open it: a start may fail early rather than midway). When it
    would not fit, the soft limit is raised to the hard one (a process-wide
    change, logged); asyncio's epoll loop is not bound by ``FD_SETSIZE``, but
    ``select.select`` elsewhere in the host would be.

    Raises:
        OSError: even the hard limit is too small (``errno.EMFILE``, with a
            message naming the budget). Nothing was opened.
    """
    global _fds_reserved
    with _fds_lock:
        _ensure_fds(needed, _fds_reserved)
        _fds_reserved += needed
    try:
        yield
    finally:
        with _fds_lock:
            _fds_reserved -= needed


def _ensure_fds(needed: int, reserved: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    in_use = _open_fds()
    want = in_use + reserved + needed + 16
    if want <= soft:
        return
    if hard == resource.RLIM_INFINITY or want <= hard:
        new = hard if hard != resource.RLIM_INFINITY else max(want, soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
        else:
            _log.info(
                "corral: raised the soft RLIMIT_NOFILE from %d to %d for %d more descriptors",
                soft,
                new,
                needed,
            )
            return
    others = f" (and {reserved} promised to groups starting now)" if reserved else ""
    raise OSError(
        errno.EMFILE,
        f"the group needs about {needed} file descriptors (up to 5 per teed rank, 1 per "
        f"rank) and {in_use} are open{others}, but RLIMIT_NOFILE allows {soft} (hard limit "
        f"{hard}); raise it (ulimit -n) or tee fewer ranks",
    )


def _open_fds() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def pidfd_open(pid: int) -> int | None:
    """Return a pidfd for ``pid``, or ``None`` when it is gone or pidfds are unavailable."""
    if not HAS_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def watch_exit(
    loop: asyncio.AbstractEventLoop,
    pid: int,
    callback: Callable[[int], None],
    *,
    reap: bool = True,
) -> None:
    """Call ``callback(returncode)`` on ``loop`` once child ``pid`` exits.

    With pidfds the wait costs no thread: the pidfd turns readable when the
    child exits. Without them (macOS, old kernels) a daemon thread blocks in
    ``waitid`` for that child, like asyncio's ``ThreadedChildWatcher``.

    Args:
        loop: the loop that runs ``callback``.
        pid: a child of this process.
        callback: receives the Popen-style return code (negative: signal).
        reap: reap the child. With ``False`` its status is read with
            ``WNOWAIT`` and it stays a zombie until :func:`reap` : its pid,
            which is also its session and process-group id, cannot be
            recycled meanwhile.
    """
    fd = pidfd_open(pid)
    if fd is None:
        _watch_with_thread(loop, pid, callback, reap)
        return

    def on_readable() -> None:
        code = _exit_status(pid, reap=reap, block=False)
        if code is None:  # spurious wake-up; the pidfd stays registered
            return
        loop.remove_reader(fd)
        os.close(fd)
        callback(code)

    loop.add_reader(fd, on_readable)


def _exit_status(pid: int, *, reap: bool, block: bool) -> int | None:
    """The return code of exited child ``pid`` (None: still running), reaping it if asked."""
    if not hasattr(os, "waitid"):  # macOS: no waitid, so no WNOWAIT either; reap
        try:
            got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            _log.warning("corral: the exit status of pid %d was reaped by someone else", pid)
            return 255
        return os.waitstatus_to_exitcode(status) if got == pid else None
    options = os.WEXITED | (0 if block else os.WNOHANG) | (0 if reap else os.WNOWAIT)
    try:
        info = os.waitid(os.P_PID, pid, options)
    except ChildProcessError:
        # Someone else (a waitpid(-1) reaper in the host) took the status.
        _log.warning("corral: the exit status of pid %d was reaped by someone else", pid)
        return 255
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # CLD_KILLED, CLD_DUMPED


def reap(pid: int) -> None:
    """Reap child ``pid`` whose exit :func:`watch_exit` reported with ``reap=False``."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # reaped by someone else already


def _watch_with_thread(
    loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[[int], None], reap: bool
) -> None:
    def run() -> None:
        code = _exit_status(pid, reap=reap, block=True)
        try:
            loop.call_soon_threadsafe(callback, 255 if code is None else code)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name=f"corral-waitpid-{pid}", daemon=True).start()


# -- PID namespaces (see ``_pidns`` for the facts) ---------------------------------
_CLONE_NEWPID: Final = 0x20000000
#: Whether this process may give a group a PID namespace: ``None`` until the
#: first group asks (the probe is a real ``unshare``), then the answer. Tests
#: set it to ``False`` to force the walk.
HAS_PIDNS: bool | None = None if IS_LINUX else False
_pidns_lock = threading.Lock()


def pid_namespaces() -> bool:
    """True when groups can have a PID namespace here (probed once, lazily).

    Needs Linux, pidfds, ``/bin/sh`` (the init), ``CAP_SYS_ADMIN`` and either
    ``setns`` on pidfds (5.8+) or a ``/proc`` of our own namespace
    (``unshare(CLONE_NEWPID)`` is refused otherwise: not root, or a
    container's seccomp filter).
    """
    global HAS_PIDNS
    if HAS_PIDNS is None:
        with _pidns_lock:
            if HAS_PIDNS is None:
                HAS_PIDNS = _probe_pidns()
    return HAS_PIDNS


def _probe_pidns() -> bool:
    global _SETNS_PIDFD
    if not (HAS_PIDFD and CAT):
        return False
    own = os.pidfd_open(os.getpid())
    try:
        _ns_call("setns", own, _CLONE_NEWPID)
    except OSError:  # a kernel older than 5.8: namespaces by their /proc files
        _SETNS_PIDFD = False
    else:
        _SETNS_PIDFD = True
    finally:
        os.close(own)
    if not (_SETNS_PIDFD or HAS_PROC):
        return False
    try:
        with new_pid_namespace():
            pass
    except OSError as exc:
        _log.debug("corral: no pid namespace for groups: %s", exc)
        return False
    return True


#: ``setns`` takes a pidfd (Linux 5.8+): no ``/proc`` needed, so a group
#: started inside another group's namespace (whose ``/proc`` is foreign) can
#: have a namespace too.
_SETNS_PIDFD = False


def pid_namespace_of(pid: int) -> int:
    """A descriptor ``setns(..., CLONE_NEWPID)`` accepts for the pid namespace ``pid`` is in."""
    if _SETNS_PIDFD:
        return os.pidfd_open(pid)
    if not HAS_PROC:  # a foreign /proc would name another process's namespace
        raise OSError(errno.ENOSYS, "no setns() on pidfds and no /proc of our own")
    return os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


def _ns_call(name: str, *args: int) -> None:
    import ctypes

    try:
        fn = getattr(_libc(), name)
    except AttributeError as exc:  # not glibc/musl
        raise OSError(f"no {name}() in this C library") from exc
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def new_pid_namespace() -> contextlib.AbstractContextManager[None]:
    """The calling thread's next child is the init of a new PID namespace (within the block).

    Raises:
        OSError: the kernel refused.
    """
    return _pid_namespace_for_children("unshare", _CLONE_NEWPID)


def pid_namespace_for_children(ns_fd: int) -> contextlib.AbstractContextManager[None]:
    """The calling thread's children are born in namespace ``ns_fd`` (within the block)."""
    return _pid_namespace_for_children("setns", ns_fd, _CLONE_NEWPID)


@contextlib.contextmanager
def _pid_namespace_for_children(call: str, *args: int) -> Iterator[None]:
    """Within the block, this thread's ``pid_for_children`` is what ``call(*args)`` made it."""
    own = pid_namespace_of(os.getpid())
    try:
        _ns_call(call, *args)
        try:
            yield
        finally:
            _restore_pid_namespace(own)
    finally:
        os.close(own)


def _restore_pid_namespace(own: int) -> None:
    """Point this thread's children back at our own namespace, or stop the process.

    Left pointing at a group's namespace, every later fork of this thread (the
    host's own children too) would be born in the group and die with it, and
    fail for good once it is gone: no caller could recover from that, so a
    restore that fails twice (never seen: the capability was there a moment
    ago) is fatal.
    """
    for _ in range(2):
        try:
            _ns_call("setns", own, _CLONE_NEWPID)
        except OSError as exc:
            error = exc
        else:
            return
    _log.critical("corral: cannot restore this thread's pid namespace (%s): aborting", error)
    os.abort()


def spawn_helper(
    argv: Sequence[str], stdin: int, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start one of corral's own helper processes: no output, a session of its own."""
    import subprocess

    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,
    )


def children_of(pid: int) -> list[int]:
    """The children ``pid``'s main thread forked, from ``/proc/PID/task/PID/children``.

    One read per process (children forked by its other threads are not
    listed). Empty without a ``/proc`` of this process's pid namespace.
    """
    if not HAS_PROC:
        return []
    try:  # os.open/os.read: a buffered file object costs twice as much
        fd = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone
        return []
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    except OSError:
        return []
    finally:
        os.close(fd)
    return [int(c) for c in data.split()]
