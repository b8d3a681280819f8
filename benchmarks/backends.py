#!/usr/bin/env python3
"""The same corral under asyncio and under trio (anyio's backends), side by side.

Usage::

    python benchmarks/backends.py > /dev/null     # the tee goes to stdout: discard it

Printed on stderr, medians over repetitions:

* failure: 8 ranks, rank 0 exits 1 at once, the others sleep: ``run()``
  called -> Result (every rank torn down). Compared with the raw floor of
  ``benchmarks/run.py`` (posix_spawn + pidfd + SIGKILL, no library).
* tee: one rank writes 64 MiB of 100-byte lines, teed to stdout: MiB/s.

Under trio the asyncio core runs on corral's own loop thread; each public
call is one hop between the two loops (README, "Under trio").
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import anyio

import corral

FAIL = "import os, sys, time; sys.exit(1) if os.environ['RANK'] == '0' else time.sleep(600)"
TEE = (
    "import sys; line = b'x' * 99 + b'\\n'; block = line * 10000; w = sys.stdout.buffer.write\n"
    "for _ in range(67): w(block)\n"
)
TEE_MIB = 67 * 10000 * 100 / 2**20


def measure(backend: str) -> tuple[float, float]:
    """One failure and one tee under ``backend``: (ms, MiB/s)."""
    got: list[float] = []

    async def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            await corral.run([sys.executable, "-c", FAIL], nprocs=8, log_dir=tmp, grace=5)
            got.append((time.perf_counter() - t0) * 1000)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            await corral.run([sys.executable, "-c", TEE], nprocs=1, log_dir=tmp, tee="out")
            got.append(TEE_MIB / (time.perf_counter() - t0))

    anyio.run(body, backend=backend)
    return got[0], got[1]


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    # Interleaved, one repetition of each backend after the other: this VM's
    # throughput drifts by 1.5x over minutes, more than the backends differ.
    samples: dict[str, list[tuple[float, float]]] = {"asyncio": [], "trio": []}
    for _ in range(reps):
        for backend, runs in samples.items():
            runs.append(measure(backend))
    a0, a1 = (statistics.median(x[i] for x in samples["asyncio"]) for i in (0, 1))
    t0, t1 = (statistics.median(x[i] for x in samples["trio"]) for i in (0, 1))
    print(f"{'':34} {'asyncio':>10} {'trio':>10} {'trio/asyncio':>13}", file=sys.stderr)
    print(
        f"{'failure of 1 in 8 -> Result (ms)':34} {a0:10.1f} {t0:10.1f} {t0 / a0:13.2f}",
        file=sys.stderr,
    )
    print(
        f"{'tee of 64 MiB (MiB/s)':34} {a1:10.0f} {t1:10.0f} {t1 / a1:13.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
