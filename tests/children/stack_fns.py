"""Callable ranks for tests/test_stacks.py (importable by name from a fresh interpreter)."""

from __future__ import annotations

import time


def blocked_in_collective() -> None:
    """Say ready, then block in C (as a rank stuck in a collective would)."""
    print("ready", flush=True)
    time.sleep(60)
