"""A torch gloo DDP-style all-reduce that prints (no flush) and waits for a go between steps.

argv: GO_DIR. Each rank joins the group with env:// defaults, prints ``joined R``
without flushing, waits for the test's go on ``GO_DIR/go-R``, all-reduces
``rank + 1`` and prints the sum. The test writes the go only after it saw every
``joined`` line, so they must stream live.
"""

from __future__ import annotations

import os
import sys

import torch  # type: ignore[import-not-found, unused-ignore]  # optional: torch is a bench extra
import torch.distributed as dist  # type: ignore[import-not-found, unused-ignore]


def main() -> None:
    """Join, say so, wait for the go, all-reduce, print."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"joined {rank}/{world}")
    with open(os.path.join(sys.argv[1], f"go-{rank}"), "rb") as fifo:
        fifo.read()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"rank {rank}/{world} sum={value.item():g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
