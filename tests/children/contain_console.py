"""A supervising script whose console (stdout) the test closes mid-run.

Usage: ``contain_console.py LOG_DIR RESULT_JSON NPROCS LINES``. Every rank
prints LINES lines of 100 bytes, teed to this process's stdout. The test
reads a little of it and closes the pipe: the tee must disable itself, the
ranks must run to the end and the log files must be complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import corral

RANK_CODE = (
    "import sys\n"
    "for i in range(int(sys.argv[1])):\n"
    "    sys.stdout.write(f'{i:08d} ' + 'x' * 90 + '\\n')\n"
)


async def main(log_dir: str, out: str, nprocs: int, lines: int) -> int:
    result = await corral.run(
        [sys.executable, "-c", RANK_CODE, str(lines)],
        nprocs=nprocs,
        tee="all",
        log_dir=log_dir,
        grace=1.0,
    )
    with open(out, "w") as f:
        json.dump({"ok": result.ok, "exit_codes": result.exit_codes}, f)
    # The console is gone: do not let the interpreter's last flush fail loudly.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
