"""A supervisor process for console tests: ``tee_run.py LOG_DIR NPROCS TEE CODE [THREADS]``.

Runs ``python -c CODE`` as NPROCS ranks with ``tee=TEE`` to this process's own
stdout/stderr (the console under test); with THREADS > 1, that many groups at
once, each on its own thread's event loop (rank env ``TAG`` = the group's index,
logs in ``LOG_DIR/TAG``). Exits 0 when every group succeeded.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import corral


def main() -> int:
    """Run the group(s) and report success through the exit status."""
    log_dir, nprocs, tee, code = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    ok: list[bool] = []

    def run(tag: int) -> None:
        result = asyncio.run(
            corral.run(
                [sys.executable, "-c", code],
                nprocs=nprocs,
                tee=tee,
                env={"TAG": str(tag)},
                log_dir=f"{log_dir}/{tag}" if threads > 1 else log_dir,
            )
        )
        ok.append(result.ok)

    workers = [threading.Thread(target=run, args=(tag,)) for tag in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return 0 if ok == [True] * threads else 1


if __name__ == "__main__":
    raise SystemExit(main())
