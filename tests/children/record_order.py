"""A recorded command rank that fails, optionally only after another rank's error file exists.

argv: MESSAGE [WAIT_FOR_PATH]. Used to make two ranks fail in a known order.
"""

from __future__ import annotations

import os
import sys
import time

import corral


@corral.record
def main() -> None:
    """Wait for WAIT_FOR_PATH (a handshake with the other rank), then raise."""
    if len(sys.argv) > 2:
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.005)
    raise RuntimeError(sys.argv[1])


if __name__ == "__main__":
    main()
