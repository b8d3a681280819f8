"""Module-level functions run as callable ranks by tests/test_callable.py.

Kept in their own small module (not the test module) so a rank imports only
this file, not pytest.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading


def add(a: int, b: int) -> dict[str, object]:
    """Return the sum and what the rank saw of its environment."""
    return {
        "sum": a + b,
        "rank": int(os.environ["RANK"]),
        "world": int(os.environ["WORLD_SIZE"]),
        "extra": os.environ.get("EXTRA"),
        "per_rank": os.environ.get("PER_RANK"),
    }


def void(text: str) -> None:
    """Print to stdout and stderr and return nothing."""
    print(f"out: {text}")
    print(f"err: {text}", file=sys.stderr)


def big(n_bytes: int, fill: int) -> bytes:
    """Return ``n_bytes`` bytes of ``fill``."""
    return bytes([fill]) * n_bytes


class BadInput(ValueError):
    """A user-defined exception type."""


def fail(text: str) -> None:
    """Raise with a message after a nested call (so the traceback has depth)."""
    _inner(text)


def _inner(text: str) -> None:
    raise BadInput(f"bad input: {text}")


def exit_with(code: int) -> None:
    """Leave through SystemExit(code)."""
    raise SystemExit(code)


def return_lock() -> object:
    """Return a value pickle refuses."""
    return threading.Lock()


def return_none() -> None:
    """Return nothing."""


def interrupt() -> None:
    """An uncaught KeyboardInterrupt, as if Ctrl-C reached a normal program."""
    raise KeyboardInterrupt


def modules() -> list[str]:
    """The modules the rank had imported when its function started."""
    return sorted(sys.modules)


async def async_add(a: int, b: int) -> int:
    """A coroutine function: the rank runs it with asyncio.run."""
    import asyncio

    await asyncio.sleep(0)
    return a + b


async def async_fail() -> None:
    """A coroutine function that raises after awaiting."""
    import asyncio

    await asyncio.sleep(0)
    raise LookupError("nothing here")


def block() -> None:
    """Say ``ready`` (a handshake the test awaits on the tee), then block until killed."""
    print("ready", flush=True)
    threading.Event().wait()


def _refuse_load() -> None:
    raise RuntimeError("this value only loads in a rank")


class LoadsNowhere:
    """Pickles fine; unpickling it raises (as a type the supervisor cannot import would)."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_refuse_load, ())


def return_unloadable() -> LoadsNowhere:
    """Return a value the supervisor cannot unpickle."""
    return LoadsNowhere()


def open_fds() -> list[int]:
    """The rank's open descriptors (listing /proc/self/fd opens one more)."""
    return sorted(int(f) for f in os.listdir("/proc/self/fd"))


def fail_once_then_return(marker: str, value: int) -> int:
    """Raise the first time (leaving ``marker``), return ``value`` after."""
    path = pathlib.Path(marker)
    if not path.exists():
        path.touch()
        raise RuntimeError("first attempt fails")
    return value
