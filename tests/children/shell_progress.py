"""A rank drawing a tqdm-style progress bar on stderr (``\\r`` updates), step by step.

argv: GO_DIR. Rank 0 writes ``\\rstep 1/3`` then, for each later step, waits
for the test's go on the FIFO ``GO_DIR/go-0``... Rank 1 waits for its go
(``GO_DIR/go-1``), then prints one ordinary line on stderr. Rank 0 ends its bar
with a newline, as tqdm does when it closes.
"""

from __future__ import annotations

import os
import sys


def wait_go(go_dir: str, name: str) -> None:
    """Block until the test writes to (and closes) the FIFO ``go_dir/name``."""
    with open(os.path.join(go_dir, name), "rb") as fifo:
        fifo.read()


def main() -> None:
    """Rank 0: the bar; rank 1: one line in the middle of it."""
    go_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    if rank == 1:
        wait_go(go_dir, "go-1")
        sys.stderr.write("hello from rank 1\n")
        sys.stderr.flush()
        return
    for step in (1, 2, 3):
        if step > 1:
            wait_go(go_dir, f"go-0-{step}")
        sys.stderr.write(f"\rstep {step}/3 |{'#' * step}{' ' * (3 - step)}|")
        sys.stderr.flush()
    sys.stderr.write("\n")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
