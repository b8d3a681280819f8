"""A rank of a given *shape* for the containment tests.

Usage: ``contain_rank.py SHAPE FIFO``, or as a callable rank:
``run_shape(SHAPE, FIFO)`` (importable as ``contain_rank`` with this folder
as the working directory, or ``tests.children.contain_rank`` from the
repository's root). The rank builds its shape (children,
a setsid grandchild, ...), then writes one line to the FIFO (the handshake):
``RANK TOKEN PID [DESCENDANT_PID ...]`` (pids as the test sees them), and
waits for its end: SIGUSR2 exits
0, SIGUSR1 exits 1, anything else is up to the shape (SIGTERM ignored, a
daemon started on SIGTERM, ...).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SLEEP = ["/bin/sleep", "1000"]


def _spawn_sleep(*, new_session: bool = False) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            if new_session:
                os.setsid()
            os.execv(SLEEP[0], SLEEP)
        finally:
            os._exit(127)
    return pid


def _setsid_grandchild() -> int:
    """Double fork: the grandchild calls setsid(), its parent exits at once (a daemon)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            grandchild = _spawn_sleep(new_session=True)
            os.write(w, b"%d" % grandchild)
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


def _fill_pipe() -> int:
    """Return the write end of a pipe that is full (nobody reads it)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    _fill_pipe.keep = r  # type: ignore[attr-defined]  # keep the read end open: no EPIPE
    return w


def host_pid(pid: int) -> int:
    """``pid`` (as this process sees it) as ``/proc`` numbers it, i.e. as the test sees it.

    In a group's PID namespace a rank sees namespace-local pids, but ``/proc``
    is still the host's: its ``NSpid`` lines map one to the other.
    """
    if os.readlink("/proc/self") == str(os.getpid()):
        return pid  # no namespace of our own
    if pid == os.getpid():
        return int(os.readlink("/proc/self"))
    ours = os.stat("/proc/self/ns/pid").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != ours:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        if int(line.split()[-1]) == pid:
                            return int(entry)
                        break
        except OSError:
            continue
    raise LookupError(f"no host pid for namespace pid {pid}")


def run_shape(shape: str, fifo: str) -> None:
    """Build ``shape``, hand-shake through ``fifo``, then wait for the end (never returns)."""
    pids: list[int] = []
    full_pipe = None
    if shape == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child too
        pids.append(_spawn_sleep())
    elif shape == "child":
        pids.append(_spawn_sleep())
    elif shape == "setsid":
        pids.append(_setsid_grandchild())
    elif shape == "children50":
        pids.extend(_spawn_sleep() for _ in range(50))
    elif shape == "full_pipe":
        full_pipe = _fill_pipe()
    elif shape == "fork_on_term":
        pass  # see below: it starts its daemon only when SIGTERM comes
    elif shape != "plain":
        raise SystemExit(f"unknown shape {shape}")
    # Block the end signals before the handshake and take them with sigwait():
    # a Python handler plus pause() would miss a signal that lands between the
    # handshake and the pause() call (it would run only after pause() returns).
    ends = {signal.SIGUSR1, signal.SIGUSR2}
    if shape == "fork_on_term":
        ends.add(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, ends)
    me = host_pid(os.getpid())
    line = " ".join([os.environ["RANK"], os.environ["CORRAL_GROUP"], str(me)])
    line += "".join(f" {host_pid(p)}" for p in pids) + "\n"
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, line.encode())
    os.close(fd)
    if full_pipe is not None:
        threading.Thread(target=_end_on, args=(ends,), daemon=True).start()
        os.write(full_pipe, b"x" * 65536)  # blocks for ever: nobody reads
    _end_on(ends)


def _end_on(signals: set[signal.Signals]) -> None:
    """Exit 1 on SIGUSR1, 0 on SIGUSR2 (blocked ``signals`` taken by sigwait).

    On SIGTERM (when it is among ``signals``: the ``fork_on_term`` shape), a
    ``setsid()`` daemon is started first, then the rank exits 0: a process
    born while the group closes, after the close's first look at ``/proc``.
    """
    sig = signal.sigwait(signals)
    if sig == signal.SIGTERM:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        _setsid_grandchild()
    os._exit(1 if sig == signal.SIGUSR1 else 0)


if __name__ == "__main__":
    run_shape(sys.argv[1], sys.argv[2])
