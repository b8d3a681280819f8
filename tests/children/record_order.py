"""A recorded command rank that fails, optionally only once the test lets it go.

argv: MESSAGE [GO_FIFO]. With GO_FIFO the rank blocks reading that FIFO until
the test opens and closes it (after another rank failed): a known order.
"""

from __future__ import annotations

import sys

import corral


@corral.record
def main() -> None:
    """Wait for the go (end of file on GO_FIFO), then raise."""
    if len(sys.argv) > 2:
        with open(sys.argv[2], "rb") as go:
            go.read()
    raise RuntimeError(sys.argv[1])


if __name__ == "__main__":
    main()
