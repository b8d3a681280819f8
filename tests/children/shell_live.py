"""A rank that streams: ``print()`` without flush, then wait for the test's go.

argv: GO_DIR. Prints ``before go R``, waits until the test writes to the FIFO
``GO_DIR/go-R`` (R = $RANK), then prints ``after go R``. With buffered stdout
the first line would only appear at exit, after the go, and the test (which
writes the go only once it saw the line) would time out.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Print, block on the FIFO, print again."""
    rank = os.environ["RANK"]
    print(f"before go {rank}")  # no flush=True: a pipe buffers unless unbuffered
    with open(os.path.join(sys.argv[1], f"go-{rank}"), "rb") as fifo:
        fifo.read()
    print(f"after go {rank}")


if __name__ == "__main__":
    main()
