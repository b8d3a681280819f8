#!/usr/bin/env python3
"""What embedding costs: event latency and per-rank stats (issue targets side by side).

Usage::

    python benchmarks/embedding.py            # 30 exits, 256 ranks x 10 stats calls

* event latency: a rank writes ``time.time()`` to a file as its last act, then
  ``os._exit(0)``; the latency is the ``exit`` event's time minus that (the
  kernel's process teardown included). Target: median <= 1 ms.
* stats: ``group.stats()`` for 256 sleeping ranks. Target: <= 20 ms per call.
* hang: a rank prints once then sleeps, ``hang_timeout=1``: its ``stacks.txt``
  written, minus its last output + 1 s. Target: <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import corral

EXIT = "import os, sys, time; open(sys.argv[1], 'w').write(repr(time.time())); os._exit(0)"


async def event_latency(runs: int) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs):
            stamp = Path(tmp) / f"t{k}"
            cmd = [sys.executable, "-S", "-c", EXIT, str(stamp)]
            async with corral.spawn(cmd, nprocs=1, log_dir=Path(tmp) / f"g{k}") as group:
                await group.wait()
            exit_event = next(e for e in group.history if e.kind == "exit")
            out.append((exit_event.time - float(stamp.read_text())) * 1000)
    return out


async def stats_cost(ranks: int, calls: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with corral.spawn(["sleep", "600"], nprocs=ranks, log_dir=tmp, grace=5) as group:
            costs = []
            for _ in range(calls):
                t0 = time.perf_counter()
                got = group.stats()
                costs.append((time.perf_counter() - t0) * 1000)
                assert len(got) == ranks
            await group.close(grace=0)
    return costs


HUNG = "import time; print('working', flush=True); time.sleep(600)"


async def hang_dump(runs: int, hang_after: float = 1.0) -> list[float]:
    """A rank goes silent: its stacks.txt written, minus (its last output + hang_timeout)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs):
            folder = Path(tmp) / f"h{k}"
            cmd = [sys.executable, "-c", HUNG]
            async with corral.spawn(
                cmd, nprocs=1, log_dir=folder, redirects="out", hang_timeout=hang_after, grace=1
            ) as group:
                await group.wait()
            last_output = (folder / "0" / "stdout.log").stat().st_mtime
            stacks = folder / "0" / "stacks.txt"
            if stacks.exists():
                out.append((stacks.stat().st_mtime - (last_output + hang_after)) * 1000)
    return out


TEE = (
    "import sys; line = b'x' * 99 + b'\\n'; block = line * 10000; w = sys.stdout.buffer.write\n"
    "for _ in range(67): w(block)\n"
)
TEE_MIB = 67 * 10000 * 100 / 2**20


async def tee_with_subscriber(runs: int, subscribe: bool) -> list[float]:
    """MiB/s of a 64 MiB tee (to stdout), with or without one lines() subscriber reading all."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs):
            cmd = [sys.executable, "-c", TEE]
            t0 = time.perf_counter()
            async with corral.spawn(cmd, nprocs=1, log_dir=Path(tmp) / f"t{k}", tee="out") as g:
                if subscribe:
                    count = 0
                    async for _line in g.lines(maxsize=1_000_000):
                        count += 1
                        if count == 670_000:
                            break
                await g.wait()
            out.append(TEE_MIB / (time.perf_counter() - t0))
    return out


def show(label: str, values: list[float], target: str) -> None:
    med = statistics.median(values)
    print(
        f"{label:40} {med:8.2f} ms  [{min(values):.2f}-{max(values):.2f}]  target {target}",
        file=sys.stderr,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--exits", type=int, default=30)
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    show("exit -> exit event (median)", await event_latency(args.exits), "<= 1 ms")
    show(f"group.stats(), {args.ranks} ranks", await stats_cost(args.ranks, args.calls), "<= 20 ms")
    if not sys.stdout.isatty():  # the tee goes to stdout: run with > /dev/null
        plain = await tee_with_subscriber(3, subscribe=False)
        subscribed = await tee_with_subscriber(3, subscribe=True)
        print(
            f"tee 64 MiB: {statistics.median(plain):.0f} MiB/s alone, "
            f"{statistics.median(subscribed):.0f} MiB/s with a lines() subscriber",
            file=sys.stderr,
        )
    dumps = await hang_dump(5)
    if dumps:
        show("hang deadline -> stacks dumped", dumps, "<= 2000 ms")
    else:
        print("hang deadline -> stacks dumped: no dump (py-spy not installed?)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
