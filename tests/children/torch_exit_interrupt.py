"""Two corral.torch contexts left running at exit, started off the main thread.

Off the main thread no ``SignalException`` handler is installed, so a Ctrl-C
during the exit hook is a ``KeyboardInterrupt``. The ranks ignore SIGTERM
(each close waits its grace). Prints ``pids <rank pids...>`` once started;
each rank writes ``up``; reads one line from stdin, then exits 3.
"""

from __future__ import annotations

import os
import sys
import threading

from corral.torch import DefaultLogsSpecs, PContext, start_processes

CODE = (
    "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    "os.write(1, b'up\\n'); signal.pause()"
)


def main() -> None:
    contexts: list[PContext] = []

    def start() -> None:
        contexts.extend(
            start_processes(
                name=name,
                entrypoint=sys.executable,
                args={0: ("-c", CODE)},
                envs={0: {}},
                logs_specs=DefaultLogsSpecs(log_dir=f"logs-{name}"),
            )
            for name in ("first", "second")
        )

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    pids = [pid for pc in contexts for pid in pc.pids().values()]
    os.write(1, " ".join(map(str, ["pids", *pids])).encode() + b"\n")
    sys.stdin.readline()
    sys.exit(3)


if __name__ == "__main__":
    main()
