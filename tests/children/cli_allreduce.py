"""An unchanged torch.distributed script: gloo, ``init_process_group()`` with env:// defaults."""

from __future__ import annotations

import torch  # type: ignore[import-not-found, unused-ignore]  # optional: torch is a bench extra
import torch.distributed as dist  # type: ignore[import-not-found, unused-ignore]


def main() -> None:
    """All-reduce ``rank + 1`` over the group and print the sum."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"rank {rank}/{world} sum={value.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
