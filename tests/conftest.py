"""Shared fixtures: every test must leave no process behind."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator


def python(code: str) -> list[str]:
    """argv running ``code`` in a fresh, unbuffered interpreter (never a PATH shim)."""
    return [sys.executable, "-u", "-c", code]


#: Inherited by every process this test session starts: marked processes of
#: other test sessions running on the same machine are not ours to report.
_SESSION_KEY = "CORRAL_TEST_SESSION"
os.environ[_SESSION_KEY] = f"{os.getpid()}-{time.time_ns()}"
_SESSION_MARK = f"{_SESSION_KEY}={os.environ[_SESSION_KEY]}".encode()


def _marked_pids() -> set[int]:
    """Processes of this test session carrying a corral group marker (no parent links)."""
    found: set[int] = set()
    if not os.path.isdir("/proc/self"):
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
                if b"CORRAL_GROUP=" in environ and _SESSION_MARK in environ:
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.status()} {proc.cmdline()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a descendant or a marked process (alive or zombie)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    marked_before = _marked_pids()
    yield
    left: dict[int, psutil.Process] = {}
    for p in me.children(recursive=True):
        if p.pid not in before:
            left[p.pid] = p
    for pid in _marked_pids() - marked_before:
        try:
            left.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    if not left:
        return
    report = [_describe(p) for p in left.values()]
    for p in left.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    for p in left.values():
        try:
            if p.ppid() == me.pid:
                os.waitpid(p.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
    pytest.fail("test left processes behind:\n  " + "\n  ".join(report))
