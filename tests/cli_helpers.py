"""Helpers shared by the command-line tests: run ``python -m corral`` as a person does."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

PY = sys.executable


def corral_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that change corral's behaviour."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "NO_COLOR", "FORCE_COLOR")
    }
    env.update(extra)
    return env


def corral(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, command: str = "run"
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m corral COMMAND ARGS`` to completion and capture its output."""
    return subprocess.run(
        [PY, "-m", "corral", command, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else corral_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def code(source: str) -> list[str]:
    """``python -c SOURCE`` as a command for corral."""
    return [PY, "-c", source]


class Lines:
    """Collect a process's stdout and stderr lines as they come (one thread per pipe)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                sink.append(line)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 20) -> None:
        """Block until ``pred()`` holds (checked as lines arrive), or fail the test."""
        with self._cond:
            if not self._cond.wait_for(pred, timeout):
                self.proc.kill()
                pytest.fail(f"timed out; stdout={self.out!r} stderr={self.err!r}")

    def finish(self, timeout: float = 20) -> int:
        """Wait for the process to exit and for both pipes to reach EOF."""
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def run_on_pty(args: Sequence[str], env: dict[str, str], command: str = "run") -> tuple[int, bytes]:
    """Run ``corral COMMAND ARGS`` with stdout and stderr on a pseudo-terminal.

    Returns the exit status and every byte the terminal showed.
    """
    term = OnPty(command, args, env)
    return term.finish(), term.seen


class OnPty:
    """``corral COMMAND ARGS`` on a pseudo-terminal, its output collected as it comes."""

    def __init__(self, command: str, args: Sequence[str], env: dict[str, str]) -> None:
        self._master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(
                [PY, "-m", "corral", command, *args],
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=slave,
                env=env,
            )
        finally:
            os.close(slave)
        self.seen = b""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    return
                if not chunk:
                    return
                with self._cond:
                    self.seen += chunk
                    self._cond.notify_all()
        finally:
            os.close(self._master)

    def wait_for(self, data: bytes, timeout: float = 20) -> None:
        """Block until ``data`` has been shown, or fail the test."""
        with self._cond:
            if not self._cond.wait_for(lambda: data in self.seen, timeout):
                self.proc.kill()
                pytest.fail(f"timed out waiting for {data!r}; seen={self.seen!r}")

    def finish(self, timeout: float = 20) -> int:
        """Wait for the process to exit and the terminal to be drained."""
        rc = self.proc.wait(timeout)
        self._thread.join(timeout)
        return rc


def screen(seen: bytes) -> list[str]:
    """The lines a terminal leaves after showing ``seen`` (``\\r``, ``\\n``, ``ESC[K``)."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    text = re.sub("\x1b\\[[0-9;]*m", "", seen.decode())  # colours do not move the cursor
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    if line:
        lines.append("".join(line))
    return lines
