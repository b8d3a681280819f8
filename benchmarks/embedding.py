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
LINES = 67 * 10000
TEE_MIB = LINES * 100 / 2**20


async def tee_with_subscriber(runs: int, mode: str, cpu: list[float] | None = None) -> list[float]:
    """MiB/s of a 64 MiB tee (to stdout): alone, or with one subscriber reading every line.

    ``mode``: ``"alone"``; ``"batched"`` (``lines(batched=True)``: one
    ``Lines`` per chunk; the consumer sums the bytes: ``Lines.count`` would
    add a ``bytes.count`` of each batch, ~3 GB/s, on the same thread);
    ``"per-line"`` (``lines()``: one ``Line`` per line).
    """
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs):
            cmd = [sys.executable, "-c", TEE]
            t0, c0 = time.perf_counter(), time.process_time()
            async with corral.spawn(cmd, nprocs=1, log_dir=Path(tmp) / f"t{k}", tee="out") as g:
                seen = [0, 0]  # lines, missed

                async def consume(group: corral.Group, seen: list[int] = seen) -> None:
                    if mode == "batched":
                        async for batch in group.lines(batched=True):
                            seen[0] += len(batch.data) // 100  # 100-byte lines
                            seen[1] += batch.missed
                    else:
                        async for line in group.lines():
                            seen[0] += 1
                            seen[1] += line.missed

                # The subscription ends when wait() closes the group.
                consumer = None if mode == "alone" else asyncio.ensure_future(consume(g))
                result = await g.wait()
                if consumer is not None:
                    await consumer
            out.append(TEE_MIB / (time.perf_counter() - t0))
            if cpu is not None:  # the supervisor's CPU seconds per GiB (steadier than MiB/s)
                cpu.append((time.process_time() - c0) / (TEE_MIB / 1024))
            assert result.ok
            count, missed = seen
            if mode != "alone" and count + missed != LINES:
                raise AssertionError(f"{mode}: {count} + {missed} missed != {LINES} lines")
            if missed:
                print(f"  {mode}: the subscriber missed {missed} lines", file=sys.stderr)
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
    ap.add_argument("--tee-runs", type=int, default=5)
    ap.add_argument("--only-tee", action="store_true", help="only the tee figures")
    args = ap.parse_args()
    if not args.only_tee:
        show("exit -> exit event (median)", await event_latency(args.exits), "<= 1 ms")
        ranks, calls = args.ranks, args.calls
        show(f"group.stats(), {ranks} ranks", await stats_cost(ranks, calls), "<= 20 ms")
    if not sys.stdout.isatty():  # the tee goes to stdout: run with > /dev/null
        # Interleaved (one run of each mode in turn): a busy machine skews them alike.
        modes = ("alone", "batched", "per-line")
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        cpus: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.tee_runs):
            for mode in modes:
                runs[mode] += await tee_with_subscriber(1, mode, cpus[mode])
        for mode, mibs in runs.items():
            print(
                f"tee 64 MiB, {mode:8}: {statistics.median(mibs):4.0f} MiB/s "
                f"[{min(mibs):.0f}-{max(mibs):.0f}]  target >= 700 MiB/s; "
                f"supervisor {statistics.median(cpus[mode]):.2f} CPU-s/GiB",
                file=sys.stderr,
            )
    if args.only_tee:
        return
    dumps = await hang_dump(5)
    if dumps:
        show("hang deadline -> stacks dumped", dumps, "<= 2000 ms")
    else:
        print("hang deadline -> stacks dumped: no dump (py-spy not installed?)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
