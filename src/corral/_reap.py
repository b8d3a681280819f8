"""Find, signal and reap the descendants of a group's ranks.

Parent links are not enough: once a rank dies its children are re-parented,
and a daemon that called ``setsid()`` leaves the rank's session and process
group. A process belongs to a group when any of these holds:

* its session id is a rank's pid (every rank is a session leader; its
  descendants keep the session unless they call ``setsid``) and it started
  after the group did (so a recycled pid cannot match);
* its environment carries the group's token in ``CORRAL_GROUP`` (inherited by
  default through ``fork``/``exec``, which catches ``setsid`` daemons);
* its parent belongs to the group.

On Linux the scan reads ``/proc``; elsewhere it falls back to psutil's parent
links, taken before the first signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import _platform

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

__all__ = ("Member", "boot_ticks_now", "scan", "signal_member")

_log = logging.getLogger("corral")
_GROUP_KEY: Final = b"CORRAL_GROUP="


@dataclass(frozen=True, slots=True)
class Member:
    """A descendant process of the group (never a rank itself)."""

    pid: int
    ppid: int
    starttime: int
    zombie: bool


def boot_ticks_now() -> int:
    """The current time in clock ticks since boot, the unit of ``/proc/PID/stat``'s starttime."""
    if not _platform.HAS_PROC:
        return 0
    with open("/proc/uptime", "rb") as f:
        uptime = float(f.read().split()[0])
    # Round down and step back a tick: a rank started in the same tick must match.
    return max(0, int(uptime * os.sysconf("SC_CLK_TCK")) - 1)


def _stat(pid: int) -> tuple[int, int, int, bool] | None:
    """Return (ppid, sid, starttime, zombie) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is the state; ppid, pgrp, session follow; starttime is field 22 (index 19 here).
    return int(fields[1]), int(fields[3]), int(fields[19]), fields[0] == b"Z"


def _has_token(pid: int, token: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return False
    start = environ.find(_GROUP_KEY)
    while start >= 0:
        end = environ.find(b"\0", start)
        value = environ[start + len(_GROUP_KEY) : end if end >= 0 else None]
        if token in value.split(b":"):
            return True
        start = environ.find(_GROUP_KEY, start + 1)
    return False


def scan(
    token: str, sessions: Collection[int], since: int, exclude: Collection[int]
) -> list[Member]:
    """Return the live or zombie descendants of a group, found without parent links.

    Args:
        token: the group's ``CORRAL_GROUP`` token.
        sessions: the ranks' pids (each rank leads its own session).
        since: boot ticks when the group started; older processes never match by session.
        exclude: pids never to report (the ranks themselves, the supervisor).
    """
    if not _platform.HAS_PROC:
        return _scan_psutil(sessions, exclude)
    me = os.getpid()
    token_b = token.encode()
    session_set = set(sessions)
    table: dict[int, tuple[int, int, int, bool]] = {}
    for entry in os.scandir("/proc"):
        name = entry.name
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        st = _stat(pid)
        if st is not None:
            table[pid] = st
    members: set[int] = set()
    for pid, (_ppid, sid, start, zombie) in table.items():
        if pid in exclude:
            continue
        if (sid in session_set and start >= since) or (not zombie and _has_token(pid, token_b)):
            members.add(pid)
    # Close over parent links: children of members are members (even with a cleared env).
    roots = members | (set(sessions) & table.keys())
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _sid, _start, _z) in table.items():
            if ppid in roots and pid not in roots and pid not in exclude and pid != me:
                roots.add(pid)
                members.add(pid)
                changed = True
    return [
        Member(pid=pid, ppid=table[pid][0], starttime=table[pid][2], zombie=table[pid][3])
        for pid in sorted(members)
    ]


def _scan_psutil(sessions: Iterable[int], exclude: Collection[int]) -> list[Member]:
    import psutil

    found: dict[int, Member] = {}
    for pid in sessions:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.pid not in exclude:
                        found[child.pid] = Member(
                            pid=child.pid,
                            ppid=child.ppid(),
                            starttime=int(child.create_time() * 100),
                            zombie=child.status() == psutil.STATUS_ZOMBIE,
                        )
    return list(found.values())


def open_member(member: Member) -> int | None:
    """Return a pidfd for ``member`` if it is still the same process, else None.

    Checking the start time after ``pidfd_open`` pins the identity: the pidfd
    then refers to exactly the process the scan saw, even if its pid is later
    recycled.
    """
    fd = _platform.pidfd_open(member.pid)
    if fd is None:
        return None
    st = _stat(member.pid) if _platform.HAS_PROC else None
    if _platform.HAS_PROC and (st is None or st[2] != member.starttime):
        os.close(fd)
        return None
    return fd


def signal_member(member: Member, pidfd: int | None, sig: int) -> None:
    """Send ``sig`` to one member, through its pidfd when there is one."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(member.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or never ours to signal)


def reap_if_child(pid: int) -> bool:
    """Reap ``pid`` if it is our (re-parented) child and has exited; True if reaped."""
    try:
        got, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return got == pid
