"""Containment by the kernel (issue 9): the faults the /proc walk could not close.

Each test runs the group in its own PID namespace (skipped where the kernel
refuses one: not root, or a seccomp filter). The oracle is independent of
corral: psutil looking for a program argument unique to the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import psutil
import pytest

import corral
from corral import _contain, _pidns, _platform

from .conftest import python, spawn_on, watched_console
from .helpers import (
    own_children,
    reap_new_children,
    subreaper,
    use_mechanism,
    wait_exit,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not (_platform.HAS_PROC and _platform.HAS_PIDFD), reason="needs Linux /proc and pidfds"
)


@pytest.fixture(autouse=True)
def _in_a_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    use_mechanism("pidns", monkeypatch)


def _unique() -> str:
    """A ``sleep`` argument no other process on the machine has (60 s and a few µs)."""
    return f"60.{os.getpid()}{os.urandom(3).hex().translate(str.maketrans('abcdef', '123456'))}"


def running(arg: str) -> list[int]:
    """Pids of every process whose last argument is ``arg`` (alive or zombie)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[-1:] == [arg]:
            found.append(proc.info["pid"])
    return found


#: A supervisor: ``LOG_DIR NPROCS COMMAND...`` with the library, nothing else.
SUPERVISOR = (
    "import asyncio, sys, corral; "
    "asyncio.run(corral.run(sys.argv[3:], nprocs=int(sys.argv[2]), log_dir=sys.argv[1]))"
)


async def test_supervisor_sigkilled_while_ranks_start_helpers(tmp_path: Path) -> None:
    """Regression (issue 9, fault 1): 32 ranks each start 40 helpers with a cleared
    environment (``env -i sleep &``), and the supervisor is SIGKILLed as soon as the
    first helper runs, while ranks are still starting: no helper survives. The
    namespace's init dies with the supervisor and the kernel ends everything in it."""
    arg = _unique()
    fifo = tmp_path / "first.fifo"
    os.mkfifo(fifo)
    rank = [
        "/bin/sh",
        "-c",
        'i=0; while [ $i -lt 40 ]; do /usr/bin/env -i /bin/sleep "$1" & i=$((i+1)); '
        '[ $i = 1 ] && [ "$RANK" = 0 ] && echo go > "$2"; done; wait',
        "rank",
        arg,
        str(fifo),
    ]
    with subreaper():
        before = own_children()
        sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), "32", *rank])
        try:
            async with asyncio.timeout(30):
                await asyncio.to_thread(fifo.read_text)  # the first helper runs
            os.kill(sup.pid, signal.SIGKILL)
            assert sup.wait(timeout=30) == -signal.SIGKILL
            # Everything of the group was re-parented to us: the namespace's init is
            # reaped only once every process of the namespace is (SPEC: "within
            # about a second").
            async with asyncio.timeout(2):
                orphans = await reap_new_children(before)
        finally:
            if sup.returncode is None:
                sup.kill()
                sup.wait()
    assert orphans, "the supervisor was killed before it started anything"
    assert running(arg) == []


#: A rank that starts a helper in a session of its own, with an environment
#: without corral's token, every 10 ms, and says how many it started.
FORKER = """
import subprocess, sys, time
n = 0
while True:
    subprocess.Popen(['/bin/sleep', sys.argv[1]], env={'PATH': '/usr/bin'}, start_new_session=True)
    n += 1
    if n == 10:
        print('ten', flush=True)
    time.sleep(0.01)
"""


async def test_close_catches_children_forked_while_it_signals() -> None:
    """Regression (issue 9, fault 2): a rank forking setsid() helpers without the token
    every 10 ms while the group closes leaves none behind, in ten closes out of ten."""
    arg = _unique()
    for _ in range(10):
        console, out, _err = watched_console()
        async with asyncio.timeout(30):
            async with spawn_on(
                [*python(FORKER), arg], nprocs=2, tee="out", grace=2.0, console=console
            ) as group:
                assert isinstance(group._attempt._contain, _contain.NamespaceContainment)
                await out.wait_for(b"ten", count=2)
                result = await group.close()
        assert result.terminated == {0, 1}
        assert running(arg) == []


async def test_a_required_namespace_that_cannot_be_made_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``CORRAL_PID_NAMESPACE=1`` where the kernel refuses one: the start fails, clearly."""

    def refused() -> object:
        raise PermissionError(1, "unshare: Operation not permitted")

    monkeypatch.setattr(_pidns.Namespace, "create", refused)
    with pytest.raises(corral.CorralError, match="could not start the group"):
        async with corral.spawn(python("pass"), nprocs=1, log_dir=tmp_path / "logs"):
            pass
    monkeypatch.undo()
    use_mechanism("pidns", monkeypatch)
    monkeypatch.setattr(_platform, "HAS_PIDNS", False)  # as for an ordinary user
    with pytest.raises(corral.CorralError, match="CAP_SYS_ADMIN"):
        async with corral.spawn(python("pass"), nprocs=1, log_dir=tmp_path / "logs2"):
            pass


async def test_ranks_see_namespace_pids_and_host_proc(tmp_path: Path) -> None:
    """What a rank sees inside: its own pid counts from 2 (the init is 1), its parent is
    outside (0), and ``/proc/self`` still resolves to the pid the supervisor knows."""
    code = "import os; print(os.getpid(), os.getppid(), os.readlink('/proc/self'))"
    async with corral.spawn(python(code), nprocs=2, redirects="out", log_dir=tmp_path) as g:
        result = await g.wait()
    assert result.ok, result.describe()
    for rank in (0, 1):
        pid, ppid, host = (tmp_path / str(rank) / "stdout.log").read_text().split()
        assert int(pid) >= 2
        assert ppid == "0"
        assert int(host) == g.pids[rank]


async def test_the_host_sees_its_children_outside_the_namespace(tmp_path: Path) -> None:
    """The supervisor's own children (started by the host while a group runs) are not
    born in the group's namespace: only the ranks are."""
    async with corral.spawn(python("import time; time.sleep(60)"), nprocs=1, grace=0.1) as g:
        mine = subprocess.Popen(
            [sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE
        )
        out, _ = await asyncio.to_thread(mine.communicate, timeout=30)
        assert int(out) == mine.pid  # its pid is the same inside and out: our namespace
        await g.close()


#: A supervisor that forks a copy of itself (no exec) once its group runs, then waits:
#: argv FIFO; the copy's pid and the rank's are written to the FIFO.
FORKING_SUPERVISOR = """
import asyncio, os, sys, time, corral
async def main():
    code = "import os, time; print(os.readlink('/proc/self'), flush=True); time.sleep(600)"
    async with corral.spawn([sys.executable, '-c', code], nprocs=1, redirects='out',
                            log_dir=sys.argv[2]) as group:
        copy = os.fork()
        if copy == 0:
            time.sleep(600)  # a fork of the supervisor, holding whatever it inherited
            os._exit(0)
        with open(sys.argv[1], 'w') as f:
            f.write(f"{copy} {group.pids[0]}\\n")
        await group.wait()
asyncio.run(main())
"""


async def test_a_fork_of_the_supervisor_does_not_keep_the_group_alive(tmp_path: Path) -> None:
    """A copy of the supervisor made by ``fork()`` without ``exec`` (multiprocessing's
    "fork" start method does that) does not hold the namespace's lifeline: SIGKILL of the
    supervisor still ends the group while the copy lives on."""
    fifo = tmp_path / "pids.fifo"
    os.mkfifo(fifo)
    with subreaper():
        before = own_children()
        sup = subprocess.Popen(
            [sys.executable, "-c", FORKING_SUPERVISOR, str(fifo), str(tmp_path / "logs")]
        )
        copy = None
        try:
            async with asyncio.timeout(30):
                copy, rank = map(int, (await asyncio.to_thread(fifo.read_text)).split())
            os.kill(sup.pid, signal.SIGKILL)
            assert sup.wait(timeout=30) == -signal.SIGKILL
            async with asyncio.timeout(2):
                await wait_exit(rank)
            assert psutil.pid_exists(copy), "the copy should still live: it is the test's point"
        finally:
            if sup.returncode is None:
                sup.kill()
                sup.wait()
            if copy is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(copy, signal.SIGKILL)
            async with asyncio.timeout(10):
                await reap_new_children(before)


#: A rank that runs a group of its own: its two ranks print their NSpid line.
NESTED = (
    "import asyncio, sys, corral\n"
    'code = \'print(open("/proc/self/status").read().split("NSpid:")[1].split(chr(10))[0])\'\n'
    "result = asyncio.run(corral.run([sys.executable, '-c', code], nprocs=2, tee='out'))\n"
    "sys.exit(0 if result.ok else 1)\n"
)


async def test_a_group_inside_a_rank_gets_a_namespace_of_its_own(tmp_path: Path) -> None:
    """corral used inside a rank (whose ``/proc`` is the host's, foreign to it) still
    contains its own group in a nested namespace (``setns`` by pidfd, no ``/proc``)."""
    result = await corral.run(python(NESTED), nprocs=1, redirects="out", log_dir=tmp_path)
    assert result.ok, result.describe()
    lines = (tmp_path / "0" / "stdout.log").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        # The pid as seen from the host, the outer group's namespace, the inner one's.
        assert len(line.split(":")[-1].split()) == 3, line


async def test_the_keyword_chooses_the_walk() -> None:
    """``pid_namespace=False`` beats the environment: the group walks /proc instead."""
    async with corral.spawn(python("pass"), nprocs=1, pid_namespace=False) as group:
        assert isinstance(group._attempt._contain, _contain.WalkContainment)
        result = await group.wait()
    assert result.ok


async def test_an_orphan_dying_in_the_namespace_ends_nothing(tmp_path: Path) -> None:
    """Regression: rank 0 exits leaving a child, which exits later (re-parented to the
    namespace's init, a zombie there). The init must live on: rank 1, still running,
    finishes on its own with 0 (a shell init's `read` was interrupted by that SIGCHLD,
    the init exited and the kernel SIGKILLed rank 1)."""
    for name in ("child-go", "rank1-go"):
        os.mkfifo(tmp_path / name)
    child = f"open({str(tmp_path / 'child-go')!r}).read()"
    code = (
        "import os, subprocess, sys\n"
        "if os.environ['RANK'] == '0':\n"
        f"    subprocess.Popen([sys.executable, '-c', {child!r}]); sys.exit(0)\n"
        f"open({str(tmp_path / 'rank1-go')!r}).read()\n"
    )
    async with asyncio.timeout(30):
        async with corral.spawn(python(code), nprocs=2, log_dir=tmp_path / "logs", grace=5) as g:
            await wait_exit(g.pids[0])  # rank 0 is gone; its child lives on
            await asyncio.to_thread((tmp_path / "child-go").write_text, "go")  # it exits now
            await asyncio.to_thread((tmp_path / "rank1-go").write_text, "go")
            result = await g.wait()
    assert result.exit_codes == {0: 0, 1: 0}, result.describe()
