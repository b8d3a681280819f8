"""A supervising process for the containment tests: a script using the library.

Usage: ``contain_supervisor.py KIND SHAPE FIFO NPROCS GRACE``. It runs a group
of ``contain_rank.py`` ranks (KIND ``command``: the script; ``callable``: its
``run_shape`` function) and waits for it. SIGTERM and SIGINT are handled
the way an application (or corral's CLI) would: by cancelling the task, which
closes the group; the library itself installs no handler. The exit status is
128 + the signal then.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys

import corral

HERE = os.path.dirname(os.path.abspath(__file__))


async def main(kind: str, shape: str, fifo: str, nprocs: int, grace: float) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    got: list[int] = []

    def on_signal(sig: int) -> None:
        got.append(sig)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if kind == "callable":
        # This folder is sys.path[0] here, and the ranks' working directory.
        contain_rank = importlib.import_module("contain_rank")
        group = corral.spawn(
            contain_rank.run_shape, args=[shape, fifo], nprocs=nprocs, grace=grace, cwd=HERE
        )
    else:
        argv = [sys.executable, os.path.join(HERE, "contain_rank.py"), shape, fifo]
        group = corral.spawn(argv, nprocs=nprocs, grace=grace)
    try:
        async with group:
            result = await group.wait()
    except asyncio.CancelledError:
        if got:
            return 128 + got[0]
        raise
    return 0 if result.ok else 1


if __name__ == "__main__":
    kind, shape, fifo, nprocs, grace = sys.argv[1:6]
    sys.exit(asyncio.run(main(kind, shape, fifo, int(nprocs), float(grace))))
