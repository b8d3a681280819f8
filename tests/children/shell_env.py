"""Print, as JSON on one line, the torchrun-parity variables this rank got."""

from __future__ import annotations

import json
import os

NAMES = (
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "RANK",
    "WORLD_SIZE",
)

if __name__ == "__main__":
    print(json.dumps({name: os.environ.get(name) for name in NAMES}), flush=True)
