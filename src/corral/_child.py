"""Bootstrap of a callable rank: ``python -m corral._child CALL RESULT``."""

from __future__ import annotations

import pickle
import sys


def main(argv: list[str]) -> int:
    """Load ``(fn, args)`` from CALL, run it, pickle its return value to RESULT."""
    call_file, result_file = argv[1], argv[2]
    with open(call_file, "rb") as f:
        fn, args = pickle.load(f)
    value = fn(*args)
    with open(result_file, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
