"""Module-level functions run as ranks by tests/test_torch_facade.py (through corral.torch)."""

from __future__ import annotations

import os
import sys


def echo(msg: str) -> str:
    """Print ``msg`` on both streams, one line per comma-separated word; return it."""
    rank = int(os.environ["RANK"])
    for word in msg.split(","):
        print(f"{word} stdout from {rank}")
        print(f"{word} stderr from {rank}", file=sys.stderr)
    return f"{msg}_{rank}"


def fail(msg: str) -> None:
    """Raise (an error file is written by corral for the callable rank)."""
    raise RuntimeError(msg)


def leave(code: int) -> None:
    """Exit with ``code`` without an error file (``SystemExit`` is not recorded)."""
    sys.exit(code)


def block_on(fifo: str) -> None:
    """Say ``ready`` through the FIFO, then wait for a signal."""
    import signal

    with open(fifo, "w") as f:
        f.write("ready\n")
    signal.pause()
