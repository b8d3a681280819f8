"""Wait until a thread sleeps inside a given function (a test's handshake).

A thread going to sleep fires no event, so this is a condition poll: the
thread's state in ``/proc`` is S (sleeping) and its Python stack holds
``code``, three looks in a row 2 ms apart (so not a passing wait for the GIL).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import CodeType


def sleeps_in(thread: threading.Thread, code: CodeType) -> bool:
    """``thread`` sleeps (state S) with ``code`` on its Python stack."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # not started yet, or ended
        return False
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return state == "S" and frame is not None


def until_sleeps_in(code: CodeType, thread: threading.Thread | None = None) -> None:
    """Return once ``thread`` (default: the main thread) sleeps inside ``code``."""
    thread = thread or threading.main_thread()
    seen = 0
    while seen < 3:
        seen = seen + 1 if sleeps_in(thread, code) else 0
        time.sleep(0.002)
