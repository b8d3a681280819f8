"""An ``Event`` whose ``wait()`` on the main thread a signal's handler cuts short at once.

PyTorch's API blocks the caller's thread, and its users stop a wait with a
signal: torchrun's agent and PyTorch's own tests send SIGTERM and expect the
``SignalException`` that ``start()``'s handler raises in ``wait()``. CPython
runs a Python signal handler in the main thread, between bytecodes, so a
thread blocked in ``threading.Event.wait`` runs it only if the signal
interrupts *that* system call. Two cases escape:

* the signal's C handler runs just before the wait blocks (a SIGTERM sent
  the moment ``wait()`` begins: PyTorch's ``test_no_zombie_process_binary``
  does exactly that), or
* the kernel delivers it to another thread (the main thread already had one
  pending, or blocked it).

Then nothing wakes the main thread: the handler waits for the whole
timeout (``wait(timeout=300)``: 300 s, with the ranks running meanwhile;
measured here: 1 SIGTERM in 10-25 sent as ``wait()`` went to sleep, when a
thread of the supervisor handed on the line that triggered it). PyTorch's
own ``time.sleep(period)`` has the same hole, bounded by its period.

CPython's cure is ``signal.set_wakeup_fd``: the C handler writes the signal
number to that file descriptor, in whatever thread it runs. While the main
thread waits here, the wake-up descriptor is a pipe of this module, which
``InterruptibleEvent.set`` also writes to (a ``0`` byte, which is no signal);
the waiter polls it, so the handler runs as soon as the signal lands. The
program's own wake-up descriptor (asyncio's, if any) is put back afterwards
and gets the signal numbers that arrived meanwhile, so its handlers still
run. Off the main thread (no Python handler can run there) the wait is
``threading.Event``'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import signal
import threading
import time

__all__ = ("InterruptibleEvent",)

#: A pipe's default capacity (Linux): one read empties it.
_PIPE_BYTES = 65536
#: ``poll()``'s longest timeout (ms); a longer wait polls again.
_POLL_MAX_MS = 2**31 - 1
#: (read end, write end) of the wake-up pipe, both non-blocking; made at the first wait.
_pipe: tuple[int, int] | None = None
#: The program's wake-up descriptor while a wait here holds ours (-1: it had none).
_program_fd = -1
#: Swap the wake-up descriptor (a C call: see ``_wait_main`` for why that matters).
_swap = functools.partial(signal.set_wakeup_fd, warn_on_full_buffer=False)


def _wake_pipe() -> tuple[int, int]:
    """The pipe (made by the main thread, the only one that waits on it)."""
    global _pipe
    if _pipe is None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        _pipe = (r, w)
    return _pipe


def _after_fork_in_child() -> None:
    """A forked child gets a pipe of its own, and the program's wake-up descriptor back."""
    global _pipe
    pipe, _pipe = _pipe, None
    if pipe is None:
        return
    with contextlib.suppress(ValueError, OSError):  # forked while the main thread waited here
        current = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(_program_fd if current == pipe[1] else current)
    for fd in pipe:
        os.close(fd)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _nudge() -> None:
    """Wake the main thread if it waits here (it then checks its event again)."""
    pipe = _pipe
    if pipe is not None:
        with contextlib.suppress(OSError):  # full: the waiter is woken anyway
            os.write(pipe[1], b"\0")


def _drain(fd: int) -> bytes:
    """Everything in the pipe now: the signal numbers that arrived (nudges dropped)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, _PIPE_BYTES)
        except BlockingIOError:
            break
        chunks.append(chunk)
        if len(chunk) < _PIPE_BYTES:  # a pipe's read returns all it holds, up to the size
            break
    return b"".join(chunks).replace(b"\0", b"")


class InterruptibleEvent(threading.Event):
    """``threading.Event`` whose ``wait()`` on the main thread a signal handler interrupts.

    ``set()`` and ``is_set()`` are ``threading.Event``'s (any thread). A
    ``wait()`` on the main thread runs a signal's Python handler as soon as the
    signal arrives, whatever thread its C handler ran in, so the handler's
    exception (``SignalException``, ``KeyboardInterrupt``) leaves ``wait()``
    at once, never at its timeout.
    """

    def set(self) -> None:
        super().set()
        _nudge()

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        if threading.current_thread() is not threading.main_thread():
            return super().wait(timeout)
        return _wait_main(self, timeout)


def _wait_main(event: threading.Event, timeout: float | None) -> bool:
    global _program_fd
    r, w = _wake_pipe()
    # What is in the pipe now came before this wait: nudges nobody needed
    # (set() writes one whoever waits), signal numbers not yet handed on.
    arrived = _drain(r)
    # A handler may raise at the return of any call, even between two lines.
    # So the swap and its record are one C call (``list.extend`` over
    # ``map``): ``program`` holds the program's descriptor exactly when ours
    # is in. The put-back is one C call too, the first of the ``finally``,
    # over a ``map`` made now: it reads ``program`` when it runs.
    program: list[int] = []
    put_back = map(signal.set_wakeup_fd, program)
    current: list[int] = []
    try:
        try:
            program.extend(map(_swap, (w,)))
        except ValueError:  # not the main interpreter: no wake-up descriptor to borrow
            return threading.Event.wait(event, timeout)
        if program[0] != w:  # the outermost wait (a handler may wait here too)
            _program_fd = program[0]
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        poller = select.poll()
        poller.register(r, select.POLLIN)
        while not event.is_set():  # set() sets the flag, then writes: no wake-up is lost
            if deadline is None:
                poller.poll()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(min(math.ceil(left * 1000), _POLL_MAX_MS))
            # A signal's handler has run by now (it runs at the call's return) or raised.
            arrived += _drain(r)
        return True
    finally:
        if program:
            try:
                current.extend(put_back)
            except (OSError, ValueError):  # the program's descriptor was closed meanwhile
                current.extend(map(signal.set_wakeup_fd, (-1,)))
                program[0] = -1  # nothing to hand on to (its number may be another file's now)
            _hand_on(program[0], current[0], r, w, arrived)


def _hand_on(program: int, current: int, r: int, w: int, arrived: bytes) -> None:
    """After the put-back: the signal numbers that came to our pipe go to the program's.

    Best effort: a second handler raising meanwhile loses them (the Python
    handlers have run; only the program's descriptor misses them). The
    put-back turns ``warn_on_full_buffer`` on again: Python cannot tell what it was.
    """
    if current != w:  # a handler set a descriptor of its own meanwhile: it stays
        with contextlib.suppress(OSError, ValueError):
            signal.set_wakeup_fd(current)
        return
    arrived += _drain(r)
    if program == w:  # a nested wait: the outer one re-checks its event (it may be set now)
        arrived += b"\0"
    if arrived and program >= 0:
        with contextlib.suppress(OSError):
            os.write(program, arrived)
