"""What each rank's whole process tree uses right now: CPU time, memory, threads, processes.

On Linux the trees are walked from the ranks down through
``/proc/PID/task/TID/children`` and each process's ``/proc/PID/stat`` is read
once: the cost grows with the group's own processes, never with the host's.
Elsewhere psutil walks them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ("RankStats", "sample")

_PROC: Final = os.path.isdir("/proc/self/task")
_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class RankStats:
    """One rank's process tree (the rank and every live descendant), at ``time``.

    Attributes:
        rank, pid: the rank and its pid.
        time: when sampled (seconds since the epoch).
        cpu_seconds: user + system CPU time of the live processes of the tree.
        cpu_percent: CPU use since the previous ``group.stats()`` call (100 = one
            core), ``None`` on the first call.
        rss: resident memory, in bytes, summed over the tree.
        threads: threads, summed over the tree.
        processes: processes in the tree (1 when the rank has no child).
    """

    rank: int
    pid: int
    time: float
    cpu_seconds: float
    cpu_percent: float | None
    rss: int
    threads: int
    processes: int


def sample(
    pids: Mapping[int, int], previous: Mapping[int, RankStats] | None = None
) -> dict[int, RankStats]:
    """The stats of each rank in ``pids`` (rank -> pid) that is still alive."""
    now = time.time()
    out: dict[int, RankStats] = {}
    for rank, pid in pids.items():
        totals = _tree(pid) if _PROC else _tree_psutil(pid)
        if totals is None:
            continue
        cpu, rss, threads, count = totals
        before = previous.get(rank) if previous else None
        percent = None
        if before is not None and before.pid == pid and now > before.time:
            percent = max(0.0, 100.0 * (cpu - before.cpu_seconds) / (now - before.time))
        out[rank] = RankStats(rank, pid, now, cpu, percent, rss, threads, count)
    return out


def _tree(root: int) -> tuple[float, int, int, int] | None:
    """(cpu seconds, rss bytes, threads, processes) of ``root`` and its descendants."""
    cpu = 0
    rss = threads = count = 0
    todo = [root]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        if stat is None:
            if pid == root:
                return None
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":  # a zombie holds nothing any more
            continue
        # fields[k] is stat field k + 3: utime 14, stime 15, num_threads 20, rss 24.
        cpu += int(fields[11]) + int(fields[12])
        threads += int(fields[17])
        rss += int(fields[21]) * _PAGE
        count += 1
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            children = _read(f"/proc/{pid}/task/{tid}/children")
            if children:
                todo.extend(int(c) for c in children.split())
    return cpu / _TICK, rss, threads, count


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _tree_psutil(root: int) -> tuple[float, int, int, int] | None:
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return None
    cpu = 0.0
    rss = threads = count = 0
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
                threads += p.num_threads()
                count += 1
        except psutil.Error:
            continue
    return cpu, rss, threads, count
