"""What each rank was doing: Python stack dumps of live ranks (issue 11, item 4).

Two mechanisms, tried in this order for each rank:

1. **py-spy** (``py-spy dump --pid PID``), when the ``py-spy`` program is on
   ``PATH`` or next to this interpreter (``pip install py-spy``; optional,
   never a dependency). It reads any Python process's stacks from outside,
   command or callable rank, even one blocked in C (a collective), and its
   exit is the event that says the dump is complete (measured: ~13 ms per
   rank). A rank that is not Python gives no dump (py-spy fails; nothing is
   shown for it).
2. **faulthandler**, for callable ranks only: corral's bootstrap
   (``_child``) registers ``faulthandler.register(SIGURG, file=sys.stderr,
   all_threads=True, chain=True)``. SIGURG because its default action is to
   ignore it: a rank signalled before it registered, or a program that
   replaced the handler, is unaffected; ``chain=True`` still calls a handler
   of the program's own. The dump is written by the C signal handler, so a
   rank blocked in C code dumps too. It goes to the rank's stderr (no extra
   file descriptor in the rank); when stderr is redirected, the text is taken
   from its log. The kernel reports no end of a signal handler, so this path
   waits :data:`SETTLE` seconds (once, for all ranks) before reading the logs.

Every capture runs for all ranks in parallel and is bounded by one deadline
(``limit``, default :data:`TIMEOUT`); a py-spy still running then is
killed and reaped. Nothing here raises: a rank that cannot be dumped is left
out. Each dump is written to ``{log_dir}/{rank}/stacks.txt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ("DUMP_SIGNAL", "SETTLE", "STACKS_FILE", "TIMEOUT", "Target", "capture", "py_spy")

#: The signal the callable bootstrap registers faulthandler on.
DUMP_SIGNAL: Final = signal.SIGURG
#: Bound of one capture, for every rank together (seconds).
TIMEOUT: Final = 2.0
#: How long a faulthandler dump is given to reach the stderr log.
SETTLE: Final = 0.3
STACKS_FILE: Final = "stacks.txt"
#: Use py-spy when installed (tests patch this to force the faulthandler path).
USE_PY_SPY = True
#: The line faulthandler starts each thread's dump with.
_FAULTHANDLER_HEADS: Final = ("Thread 0x", "Current thread 0x")
_READ_MAX: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Target:
    """A live rank to dump.

    Attributes:
        rank: the rank.
        pid: its pid (held by the supervisor: not reaped, so not recycled).
        callable: True for a callable rank (its bootstrap registered faulthandler).
        stderr_log: its stderr log, where a faulthandler dump lands, or ``None``.
        out: where to write the dump (``{log_dir}/{rank}/stacks.txt``).
    """

    rank: int
    pid: int
    callable: bool
    stderr_log: Path | None
    out: Path


def py_spy() -> str | None:
    """The ``py-spy`` program, when installed (on PATH or beside this interpreter)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if os.access(beside, os.X_OK) else None


async def capture(targets: list[Target], limit: float = TIMEOUT) -> dict[int, str]:
    """Dump the stacks of ``targets`` in parallel, within ``limit`` seconds in all.

    Returns:
        rank -> dump text, for the ranks that gave one (also written to
        each target's ``out``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, limit)
    spy = py_spy() if USE_PY_SPY else None
    texts: dict[int, str] = {}
    if spy is not None and targets:
        dumps = await asyncio.gather(*(_spy(spy, t.pid, deadline) for t in targets))
        texts = {t.rank: text for t, text in zip(targets, dumps, strict=True) if text}
    rest = [t for t in targets if t.rank not in texts and t.callable]
    if rest:
        texts.update(await _faulthandler(rest, deadline))
    for t in targets:
        if t.rank in texts:
            with contextlib.suppress(OSError):
                t.out.write_text(texts[t.rank], encoding="utf-8")
    return texts


async def _spy(program: str, pid: int, deadline: float) -> str:
    """``py-spy dump --pid PID``'s output, or ``""`` (not Python, not allowed, too slow)."""
    loop = asyncio.get_running_loop()
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            "dump",
            "--pid",
            str(pid),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ""
    try:
        async with asyncio.timeout_at(deadline):
            out, _ = await proc.communicate()
    except TimeoutError:
        return ""
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reap it whatever happens (a cancelled capture included): shielded, bounded.
            bound = max(1.0, deadline - loop.time())
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(proc.wait(), bound))
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0 or "\nThread " not in text:
        return ""  # failed, or the process was exiting: no thread left to show
    return text


async def _faulthandler(targets: list[Target], deadline: float) -> dict[int, str]:
    """Signal callable ranks to dump to their stderr; take the dump from the stderr logs."""
    loop = asyncio.get_running_loop()
    sizes: dict[int, int] = {}
    for t in targets:
        if t.stderr_log is None:
            continue
        try:
            sizes[t.rank] = t.stderr_log.stat().st_size
            os.kill(t.pid, DUMP_SIGNAL)
        except OSError:
            sizes.pop(t.rank, None)
    if not sizes:
        return {}
    # No event marks the end of a signal handler in another process: one bounded wait.
    await asyncio.sleep(max(0.0, min(SETTLE, deadline - loop.time())))
    texts: dict[int, str] = {}
    for t in targets:
        if t.rank in sizes and t.stderr_log is not None:
            text = _dump_in_log(t.stderr_log, sizes[t.rank])
            if text:
                texts[t.rank] = text
    return texts


def _dump_in_log(path: Path, offset: int) -> str:
    """The faulthandler dump written to ``path`` after ``offset``, or ``""``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(_READ_MAX)
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(_FAULTHANDLER_HEADS):
            return "\n".join(lines[i:]) + "\n"
    return ""
