"""A rank that reports the signal it got: a checkpoint line, then exit 0.

SIGINT reaches Python code as KeyboardInterrupt (as under torchrun's Ctrl-C);
SIGTERM, SIGHUP and SIGQUIT are caught by a handler. Prints ``ready`` first
(and, given a folder, writes it to the FIFO ``FOLDER/ready-R``).
"""

from __future__ import annotations

import os
import signal
import sys


def _caught(signum: int, frame: object) -> None:
    print(f"checkpoint on {signal.Signals(signum).name}", flush=True)
    sys.exit(0)


def main() -> None:
    """Say ready, wait for a signal, write the checkpoint line."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, _caught)
    try:  # entered before saying ready: a SIGINT right after it lands in the handler below
        print(f"ready {os.environ['RANK']}", flush=True)
        if len(sys.argv) > 1:  # also tell the test through its FIFO GO_DIR/ready-R
            with open(os.path.join(sys.argv[1], f"ready-{os.environ['RANK']}"), "wb") as fifo:
                fifo.write(b"ready")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("checkpoint on KeyboardInterrupt", flush=True)


if __name__ == "__main__":
    main()
