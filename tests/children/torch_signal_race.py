"""SIGTERM at the very start of ``wait()``, round after round (PyTorch's zombie test's timing).

Each round starts a context of one rank and hands ``ready`` to a writer
thread, as PyTorch's test hands its pids to a ``multiprocessing.Queue``
feeder, then waits (timeout 20 s). The writer takes the GIL exactly when the
main thread drops it to sleep, so the test's SIGTERM often lands in the few
instructions before the sleep begins. Each round prints ``exc <seconds>``
(``SignalException`` after that long in ``wait()``) or ``none`` (no signal).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

from corral.torch import DefaultLogsSpecs, SignalException, start_processes


def main() -> None:
    rounds = int(sys.argv[1])
    lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def writer() -> None:
        while (line := lines.get()) is not None:
            os.write(1, line)

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(rounds):
        pc = start_processes(
            name="race",
            entrypoint=sys.executable,
            args={0: ("-c", "import signal; signal.pause()")},
            envs={0: {}},
            logs_specs=DefaultLogsSpecs(log_dir="logs"),  # in its cwd: the test's tmp_path
        )
        began = time.monotonic()
        try:
            lines.put(b"ready\n")
            pc.wait(timeout=20)
            outcome = "none"
        except SignalException:
            outcome = f"exc {time.monotonic() - began:.3f}"
        pc.close()
        lines.put(f"{outcome}\n".encode())
    lines.put(None)
    thread.join()


if __name__ == "__main__":
    main()
