"""Containment at scale: threads, idle CPU and close time for 1, 64 and 512 teed ranks.

Every rank is ``sh -c 'trap "" TERM; echo ready; exec sleep 1000'``: it ignores
SIGTERM, so closing must wait the whole grace period and then SIGKILL; the
figure to watch is close time minus grace, which must not grow with the
number of ranks. Each rank's stdout and stderr are teed (5 descriptors a rank
in the supervisor).

Usage: ``python benchmarks/containment_scale.py [--ranks 1,64,512] [--grace 1.0]
[--idle 2.0] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import sys
import threading
import time
from typing import IO, cast

from corral._config import SpawnOptions
from corral._group import _spawn
from corral._tee import Console

RANK = ["/bin/sh", "-c", 'trap "" TERM; echo ready; exec sleep 1000']


class _Counter(io.RawIOBase):
    """A console that counts teed lines and wakes the benchmark at a target."""

    def __init__(self) -> None:
        self.lines = 0
        self.target = 0
        self.reached = asyncio.Event()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.lines += bytes(data).count(b"\n")
        if self.lines >= self.target:
            self.reached.set()
        return len(data)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


async def measure(nprocs: int, grace: float, idle: float) -> dict[str, float]:
    out = _Counter()
    out.target = nprocs
    console = Console.create(
        stdout=cast("IO[bytes]", out), stderr=cast("IO[bytes]", _Counter()), color=False
    )
    threads_before = _threads()
    fds_before = _fds()
    t0 = time.perf_counter()
    group = _spawn(RANK, console, SpawnOptions(nprocs=nprocs, tee="all", grace=grace))
    async with group:
        await asyncio.wait_for(out.reached.wait(), timeout=120)
        started = time.perf_counter() - t0
        threads_running = _threads()
        fds_running = _fds()
        cpu0, wall0 = _cpu(), time.perf_counter()
        await asyncio.sleep(idle)
        cpu_idle = (_cpu() - cpu0) / (time.perf_counter() - wall0)
        c0 = time.perf_counter()
        result = await group.close()
        close = time.perf_counter() - c0
    assert result.terminated == frozenset(range(nprocs)), result.describe()
    return {
        "ranks": nprocs,
        "start_to_all_ready_s": round(started, 3),
        "threads_before": threads_before,
        "threads_running": threads_running,
        "threads_after": _threads(),
        "fds_added_running": fds_running - fds_before,
        "idle_cpu_percent": round(100 * cpu_idle, 2),
        "grace_s": grace,
        "close_s": round(close, 3),
        "close_minus_grace_s": round(close - grace, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,64,512")
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.ranks.split(",")):
        rows.append(await measure(n, args.grace, args.idle))
        print(json.dumps(rows[-1]), file=sys.stderr)
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
