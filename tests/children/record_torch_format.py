"""A command rank that writes PyTorch's @record error format by hand, then exits 1.

This is byte-for-byte what torch.distributed.elastic's ErrorHandler writes
(``timestamp`` a string of whole seconds), so the test needs no torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main() -> None:
    """Record a ValueError the way torch's @record does, then exit 1."""
    try:
        raise ValueError(sys.argv[1])
    except ValueError as exc:
        data = {
            "message": {
                "message": f"{type(exc).__name__}: {exc}",
                "extraInfo": {
                    "py_callstack": traceback.format_exc(),
                    "timestamp": str(int(time.time()) - int(sys.argv[2])),
                },
            }
        }
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump(data, f)
    sys.exit(1)


if __name__ == "__main__":
    main()
