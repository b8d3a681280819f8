"""Rank programs shared by every implementation (corral, torch, raw)."""

from __future__ import annotations

import shutil
import sys

PY = sys.executable
TRUE = shutil.which("true") or "/bin/true"
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = "/bin/sh"

#: Rank 0 of the failure scenario: block until the benchmark opens the FIFO,
#: stamp CLOCK_MONOTONIC into a file, exit 1.
FAIL_RANK0 = (
    "import os,sys,time\n"
    "fifo, stamp = sys.argv[1], sys.argv[2]\n"
    "with open(fifo, 'rb') as f: f.read()\n"
    "t = time.clock_gettime(time.CLOCK_MONOTONIC)\n"
    "fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); os.write(fd, repr(t).encode())\n"
    "os._exit(1)\n"
)

#: A peer of the failure scenario: says it is ready by creating a file, and sleeps.
PEER = ': > "$1/$RANK"; exec ' + SLEEP + " 1000"
#: The same, ignoring SIGTERM (the disposition survives exec).
IGNORE_TERM = "trap '' TERM; " + PEER

#: Write MIB MiB of 100-byte lines to stdout.
WRITER = (
    "import os,sys\n"
    "line = b'x' * 99 + b'\\n'\n"
    "block = memoryview(line * 10486)\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    v = block\n"
    "    while v: v = v[os.write(1, v):]\n"
)

#: Write COUNT lines, each carrying the CLOCK_MONOTONIC time of its write.
LATENCY = (
    "import os,sys,time\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    os.write(1, b'LAT %r\\n' % time.clock_gettime(time.CLOCK_MONOTONIC))\n"
    "    time.sleep(0.005)\n"
)


def trivial(x: int = 0) -> int:
    """The callable of the callables scenario."""
    return x + 1


def answer() -> int:
    """A function rank returning a small value (torch_facade.py)."""
    return 42
