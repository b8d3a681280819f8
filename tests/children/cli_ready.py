"""A rank for the CLI signal tests: print ``ready PID [GRANDCHILD_PID]``, then wait forever.

Pids are printed as the test sees them (see ``contain_rank.host_pid``).

Options: ``--ignore-term`` ignores SIGTERM, ``--ignore-int`` SIGINT (so only SIGKILL ends it);
``--grandchild`` first starts a grandchild that sleeps, and prints its pid too.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys

# This folder is sys.path[0]: the helper is shared with the containment ranks.
host_pid = importlib.import_module("contain_rank").host_pid


def main() -> None:
    """Install the handlers, start the grandchild, say ready, wait for a signal."""
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--ignore-int" in sys.argv:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids = [host_pid(os.getpid())]
    if "--grandchild" in sys.argv:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.DEVNULL
        )
        pids.append(host_pid(child.pid))
    print("ready", *pids, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
