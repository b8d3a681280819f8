"""A command rank whose main() is wrapped in @corral.record (run by path)."""

from __future__ import annotations

import sys

import corral


class TrainingError(RuntimeError):
    """Raised by the step below."""


def step(batch: int) -> None:
    """Fail on the given batch."""
    raise TrainingError(f"loss is NaN at batch {batch}")


@corral.record
def main() -> None:
    """Print, then fail inside a nested call."""
    print("training", flush=True)
    step(int(sys.argv[1]))


if __name__ == "__main__":
    main()
