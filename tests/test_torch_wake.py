"""corral.torch's InterruptibleEvent: a main-thread wait that signals cut short."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest

from corral.torch._context import _Writer
from corral.torch._wake import InterruptibleEvent

from .children import blocked

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from types import FrameType


class Interrupted(Exception):
    pass


@pytest.fixture
def program_fd() -> Iterator[tuple[int, socket.socket]]:
    """A wake-up descriptor of the program's own (asyncio's kind: a socket) and its reader."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    before = signal.set_wakeup_fd(ours.fileno())
    try:
        yield ours.fileno(), theirs
    finally:
        signal.set_wakeup_fd(before)
        ours.close()
        theirs.close()


def current_wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


@pytest.fixture
def usr1() -> Iterator[list[int]]:
    """SIGUSR1 handled by a recording handler (raising once the list holds ``-1``)."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if seen[-1:] == [-1]:
            raise Interrupted
        seen.append(signum)

    before = signal.signal(signal.SIGUSR1, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGUSR1, before)


def set_once_asleep(event: InterruptibleEvent) -> threading.Thread:
    """A thread setting ``event`` once the main thread sleeps in its ``wait()``."""

    def set_it() -> None:
        blocked.until_sleeps_in(InterruptibleEvent.wait.__code__)
        event.set()

    thread = threading.Thread(target=set_it)
    thread.start()
    return thread


def test_set_from_another_thread_wakes_the_main_thread() -> None:
    event = InterruptibleEvent()
    setter = set_once_asleep(event)
    assert event.wait(30)
    setter.join()
    assert event.wait(0)  # set stays set


def test_a_wait_that_times_out_returns_false_on_any_thread() -> None:
    event = InterruptibleEvent()
    assert not event.wait(0.01)
    assert not event.wait(0)
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(event.wait(0.01)))
    worker.start()
    worker.join()
    assert results == [False]


def test_the_programs_descriptor_is_put_back_and_gets_the_signals_that_came(
    program_fd: tuple[int, socket.socket], usr1: list[int]
) -> None:
    """A handler that returns: the wait goes on; asyncio's self-pipe still hears of the signal."""
    fd, reader = program_fd
    event = InterruptibleEvent()

    def signal_then_set() -> None:
        blocked.until_sleeps_in(InterruptibleEvent.wait.__code__)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # its C handler runs here
        event.set()

    helper = threading.Thread(target=signal_then_set)
    helper.start()
    assert event.wait(30)
    helper.join()
    assert usr1 == [signal.SIGUSR1]
    assert reader.recv(16) == bytes([signal.SIGUSR1])
    assert current_wakeup_fd() == fd


def test_a_handler_that_raises_ends_the_wait_at_once_and_the_descriptor_is_put_back(
    program_fd: tuple[int, socket.socket], usr1: list[int]
) -> None:
    """The signal's C handler runs in another thread: nothing else wakes the main thread.

    With ``threading.Event``, this wait would last its 60 s (then the test's timeout).
    """
    fd, reader = program_fd
    usr1.append(-1)  # the handler raises
    event = InterruptibleEvent()

    def signal_from_here() -> None:
        blocked.until_sleeps_in(InterruptibleEvent.wait.__code__)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    helper = threading.Thread(target=signal_from_here)
    helper.start()
    began = time.monotonic()
    with pytest.raises(Interrupted):
        event.wait(60)
    assert time.monotonic() - began < 30  # the signal ended it, not the timeout
    helper.join()
    assert reader.recv(16) == bytes([signal.SIGUSR1])
    assert current_wakeup_fd() == fd


def test_a_wait_off_the_main_thread_leaves_the_descriptor_alone(
    program_fd: tuple[int, socket.socket],
) -> None:
    fd, _ = program_fd
    event = InterruptibleEvent()
    seen: list[int] = []

    def wait_for_it() -> None:
        assert event.wait(30)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    blocked.until_sleeps_in(InterruptibleEvent.wait.__code__, waiter)
    seen.append(current_wakeup_fd())
    event.set()
    waiter.join()
    assert seen == [fd]


def test_a_timeout_longer_than_poll_takes_is_accepted() -> None:
    """poll() takes at most 2**31-1 ms (24.8 days); a longer wait still works."""
    event = InterruptibleEvent()
    setter = set_once_asleep(event)
    assert event.wait(30 * 86400)
    setter.join()


def test_a_descriptor_a_handler_changes_during_the_wait_stays(
    program_fd: tuple[int, socket.socket],
) -> None:
    """A handler closing asyncio's loop meanwhile (wake-up fd -1): that is what stays."""
    event = InterruptibleEvent()

    def drop_it(signum: int, frame: FrameType | None) -> None:
        signal.set_wakeup_fd(-1)
        raise Interrupted

    def signal_from_here() -> None:
        blocked.until_sleeps_in(InterruptibleEvent.wait.__code__)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    before = signal.signal(signal.SIGUSR1, drop_it)
    try:
        helper = threading.Thread(target=signal_from_here)
        helper.start()
        with pytest.raises(Interrupted):
            event.wait(60)
        helper.join()
        assert current_wakeup_fd() == -1
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_the_tee_writer_ends_even_if_closing_its_file_fails() -> None:
    """A filter file on a full disk: its last flush fails at close; join() still returns."""
    full = open("/dev/full", "w")  # noqa: SIM115 - the writer closes it
    writer = _Writer([full])
    writer.start()
    writer.queue.put((full, "a line the disk has no room for\n"))
    writer.queue.put(None)
    writer.join()
    assert writer.done.is_set()


def test_a_descriptor_closed_during_the_wait_is_not_put_back(tmp_path: Path) -> None:
    """Something closes the program's wake-up socket meanwhile and a file takes its number:
    the wake-up fd stays -1, the file gets no signal numbers, the handler's exception comes out."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    number = ours.fileno()
    before = signal.set_wakeup_fd(number)
    event = InterruptibleEvent()
    reused: list[int] = []

    def close_it(signum: int, frame: FrameType | None) -> None:
        ours.close()
        reused.append(os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT))
        raise Interrupted

    def signal_from_here() -> None:
        blocked.until_sleeps_in(InterruptibleEvent.wait.__code__)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    previous_handler = signal.signal(signal.SIGUSR1, close_it)
    try:
        helper = threading.Thread(target=signal_from_here)
        helper.start()
        with pytest.raises(Interrupted):
            event.wait(60)
        helper.join()
        assert current_wakeup_fd() == -1
        assert reused == [number]  # the file has the old number
        assert (tmp_path / "other").read_bytes() == b""
    finally:
        signal.signal(signal.SIGUSR1, previous_handler)
        signal.set_wakeup_fd(before)
        for fd in reused:
            os.close(fd)
        ours.close()
        theirs.close()
