"""Time to run 8 callable ranks that return at once: corral vs multiprocessing (spawn).

Each variant starts 8 fresh interpreters, calls a function in each, brings its
return value back and waits until every process is gone:

- ``corral.run(os.getpid, nprocs=8)``: call -> ``Result`` (logs, error files,
  containment sweep included).
- the same with a bootstrap that first imports the ``corral`` package (what
  ``python -m corral._child`` costs), to show what the light bootstrap saves.
- ``multiprocessing`` spawn context, 8 ``Process`` objects whose target puts a
  value on a ``SimpleQueue``; start all, read 8 values, join all.
- ``concurrent.futures.ProcessPoolExecutor`` (spawn, 8 workers): submit 8
  ``os.getpid`` calls, read the results, shut down.
- With ``--torch`` and torch installed: ``torch.distributed.elastic``'s
  ``start_processes`` (multiprocessing spawn underneath).

Heavy imports stay inside functions: multiprocessing's children re-import
this script as ``__mp_main__``, and the comparison should not charge them
for it. corral's ranks never import it (``os.getpid`` does not refer to it).

Usage: ``python benchmarks/callables_vs_mp.py [--runs N] [--nprocs N] [--torch]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def corral_run(nprocs: int) -> list[object]:
    import asyncio

    import corral

    result = asyncio.run(corral.run(os.getpid, nprocs=nprocs))
    result.raise_for_failure()
    return [result.return_values[r] for r in range(nprocs)]


def corral_run_heavy_bootstrap(nprocs: int) -> list[object]:
    """corral.run with a bootstrap that imports the corral package first (as ``-m`` would)."""
    from corral import _callable

    light = _callable._BOOT_CODE
    _callable._BOOT_CODE = "import corral;" + light  # type: ignore[misc]
    try:
        return corral_run(nprocs)
    finally:
        _callable._BOOT_CODE = light  # type: ignore[misc]


def mp_process(nprocs: int) -> list[object]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=queue.put, args=(rank,)) for rank in range(nprocs)]
    for p in procs:
        p.start()
    values = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    queue.close()
    return values


def mp_pool(nprocs: int) -> list[object]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=nprocs, mp_context=ctx) as pool:
        futures = [pool.submit(os.getpid) for _ in range(nprocs)]
        return [f.result() for f in futures]


def torch_start_processes(nprocs: int) -> list[object]:
    import tempfile

    from torch.distributed.elastic.multiprocessing import (  # type: ignore[import-not-found,unused-ignore]
        DefaultLogsSpecs,
        start_processes,
    )

    with tempfile.TemporaryDirectory() as log_dir:
        ctx = start_processes(
            name="bench",
            entrypoint=os.getpid,
            args=dict.fromkeys(range(nprocs), ()),
            envs={r: {} for r in range(nprocs)},
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        )
        result = ctx.wait()
        assert result is not None
        return [result.return_values[r] for r in range(nprocs)]


def measure(fn: Callable[[int], list[object]], nprocs: int, runs: int) -> list[float]:
    fn(nprocs)  # warm-up: page cache, imports in this process
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        values = fn(nprocs)
        times.append(time.perf_counter() - start)
        assert len(values) == nprocs
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--nprocs", type=int, default=8)
    parser.add_argument("--torch", action="store_true", help="also time torch start_processes")
    opts = parser.parse_args()
    variants: list[tuple[str, Callable[[int], list[object]]]] = [
        ("corral.run(fn)", corral_run),
        ("corral.run, bootstrap+corral", corral_run_heavy_bootstrap),
        ("mp spawn Process+queue", mp_process),
        ("ProcessPoolExecutor spawn", mp_pool),
    ]
    if opts.torch:
        variants.append(("torch start_processes", torch_start_processes))
    print(
        f"{opts.nprocs} callable ranks returning at once; {opts.runs} runs each; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
    )
    print(f"{'variant':30s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for name, fn in variants:
        times = measure(fn, opts.nprocs, opts.runs)
        print(
            f"{name:30s} {statistics.median(times) * 1e3:10.1f} "
            f"{min(times) * 1e3:8.1f} {max(times) * 1e3:8.1f}"
        )


if __name__ == "__main__":
    main()
