"""A supervising script whose log files hit RLIMIT_FSIZE (a real write failure).

Usage: ``contain_fsize.py LOG_DIR RESULT_JSON LIMIT``. The file size limit is
set to LIMIT bytes with SIGXFSZ ignored, so a write past it fails with EFBIG,
as on a full disk. Rank 0 writes 3 x LIMIT bytes to its teed stdout, rank 1
LIMIT / 2 bytes, then both exit 0.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys

import corral

RANK_CODE = (
    "import os, sys\n"
    "n = int(sys.argv[1]) if os.environ['RANK'] == '0' else int(sys.argv[2])\n"
    "block = b'y' * 4096\n"
    "while n > 0:\n"
    "    n -= os.write(1, block[:n])\n"
)


async def main(log_dir: str, out: str, limit: int) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    result = await corral.run(
        [sys.executable, "-c", RANK_CODE, str(3 * limit), str(limit // 2)],
        nprocs=2,
        tee="out",
        log_dir=log_dir,
    )
    with open(out, "w") as f:
        json.dump(
            {
                "ok": result.ok,
                "exit_codes": result.exit_codes,
                "log_errors": result.log_errors,
                "describe": result.describe(),
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
