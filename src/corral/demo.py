"""A tiny rank for trying corral: ``corral run -n 4 -- python -m corral.demo``.

Each rank reads its place in the group from the environment corral sets
(``RANK``, ``WORLD_SIZE``), counts the primes in its share of a range, prints
a few lines to stdout and one to stderr, and exits 0. ``--fail RANK`` makes
that rank raise an exception instead (recorded with :func:`corral.record`),
to see how corral explains a failure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import TYPE_CHECKING

from ._record import record

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("count_primes", "main")


def count_primes(start: int, stop: int) -> int:
    """Count the primes in ``[start, stop)`` by trial division (deliberately simple)."""
    found = 0
    for n in range(max(start, 2), stop):
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            found += 1
    return found


@record
def _pid() -> str:
    """This process's pid as the rest of the machine sees it.

    In the group's PID namespace ``os.getpid()`` is the namespace's own
    number; ``/proc`` (the host's) names the outside one.
    """
    try:
        outside = os.readlink("/proc/self")
    except OSError:  # no /proc (macOS)
        return str(os.getpid())
    inside = os.getpid()
    return outside if outside == str(inside) else f"{outside}, {inside} in the group's namespace"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one demo rank and return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m corral.demo", description=__doc__)
    parser.add_argument("--limit", type=int, default=150_000, help="count primes below this")
    parser.add_argument("--fail", type=int, default=None, metavar="RANK", help="rank that fails")
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    share = -(-opts.limit // world)
    start, stop = rank * share, min(opts.limit, (rank + 1) * share)
    print(f"hello from rank {rank} of {world} (pid {_pid()})", flush=True)
    print(f"rank {rank}/{world}: this is stderr", file=sys.stderr, flush=True)
    if opts.fail == rank:
        raise RuntimeError(f"rank {rank} was asked to fail (--fail {rank})")
    print(f"counting primes in [{start}, {stop})", flush=True)
    began = time.perf_counter()
    found = count_primes(start, stop)
    took = time.perf_counter() - began
    print(f"found {found} primes in {took * 1000:.0f} ms; done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
