"""Wait until the main thread sleeps inside a given function (a test's handshake).

A thread going to sleep fires no event, so this is a condition poll: the
main thread's state in ``/proc`` is S (sleeping) and its Python stack holds
``code``, three looks in a row 2 ms apart (so not a passing wait for the GIL).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import CodeType


def main_thread_sleeps_in(code: CodeType) -> bool:
    main = threading.main_thread()
    with open(f"/proc/self/task/{main.native_id}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    frame = sys._current_frames().get(main.ident or 0)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return state == "S" and frame is not None


def until_main_thread_sleeps_in(code: CodeType) -> None:
    seen = 0
    while seen < 3:
        seen = seen + 1 if main_thread_sleeps_in(code) else 0
        time.sleep(0.002)
