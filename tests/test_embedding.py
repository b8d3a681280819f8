"""For programs that embed corral: explicit start/close, events, stats, the run report."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from typing import TYPE_CHECKING

import pytest

import corral

from .conftest import python

if TYPE_CHECKING:
    from pathlib import Path


def kinds(events: list[corral.Event]) -> list[tuple[str, int | None]]:
    return [(e.kind, e.rank) for e in events]


async def test_explicit_start_and_close(tmp_path: Path) -> None:
    """start() then close(): the same as ``async with``; the ranks are gone after close."""
    group = corral.spawn(python("import time; time.sleep(600)"), nprocs=2, log_dir=tmp_path)
    assert await group.start() is group
    try:
        assert sorted(group.pids) == [0, 1]
        assert group.poll() is None
    finally:
        result = await group.close(grace=5)
    assert result.terminated == {0, 1}
    with pytest.raises(corral.CorralError):
        await group.start()


async def follow(group: corral.Group, into: list[corral.Event]) -> None:
    into.extend([event async for event in group.events()])


async def test_events_for_every_consumer_early_or_late(tmp_path: Path) -> None:
    """Two consumers, one from the start, one after the close: the same events, in order;
    both iterations end with ``closed``."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    code = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        f"    open({str(fifo)!r}).read(); sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    early: list[corral.Event] = []
    async with asyncio.timeout(30):
        async with corral.spawn(python(code), nprocs=2, log_dir=tmp_path / "logs", grace=5) as g:
            consumer = asyncio.ensure_future(follow(g, early))
            await asyncio.to_thread(fifo.write_text, "go")  # rank 1 may exit now
            result = await g.wait()
        await consumer
    late: list[corral.Event] = []
    await follow(g, late)
    assert early == late == list(g.history)
    assert sorted(kinds(early)[:2]) == [("start", 0), ("start", 1)]
    assert kinds(early)[-1] == ("closed", None)
    exits = {e.rank: e for e in early if e.kind == "exit"}
    assert (exits[1].exitcode, exits[1].failed) == (3, True)
    assert (exits[0].exitcode, exits[0].failed) == (-15, False)  # ended by corral's close
    assert kinds(early).index(("closing", None)) < kinds(early).index(("exit", 0))
    assert exits[1].pid == result.pids[1]
    assert early[-1].detail == {"ok": False}


async def test_events_of_restarts(tmp_path: Path) -> None:
    """A restart is an event; each event carries its attempt."""
    async with asyncio.timeout(30):
        async with corral.spawn(
            python("import sys; sys.exit(4)"),
            nprocs=1,
            log_dir=tmp_path,
            max_restarts=1,
            restart_backoff=0,
        ) as group:
            await group.wait()
    got = [(e.kind, e.attempt) for e in group.history]
    assert got == [
        ("start", 0),
        ("exit", 0),
        ("closing", 0),
        ("restart", 1),
        ("start", 1),
        ("exit", 1),
        ("closing", 1),
        ("closed", 1),
    ]


async def test_stats_cover_the_whole_tree(tmp_path: Path) -> None:
    """A rank with a child that holds 64 MiB: 2 processes, at least that much RSS; a second
    call gives cpu_percent."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    child = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * (len(b) // 4096); "
    child += f"open({str(fifo)!r}, 'w').write('ready'); time.sleep(600)"
    rank = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
    rank += "time.sleep(600)"
    async with asyncio.timeout(30):
        async with corral.spawn(python(rank), nprocs=1, log_dir=tmp_path / "logs", grace=5) as g:
            assert await asyncio.to_thread(fifo.read_text) == "ready"
            first = g.stats()
            second = g.stats()
    s = first[0]
    assert (s.rank, s.pid) == (0, g.pids[0])
    assert s.processes == 2
    assert s.rss >= 64 << 20
    assert s.threads >= 2
    assert s.cpu_seconds > 0
    assert s.cpu_percent is None
    assert second[0].cpu_percent is not None


async def test_the_run_report(tmp_path: Path) -> None:
    """report.json in the log folder: every attempt, every rank, the root cause."""
    async with asyncio.timeout(30):
        result = await corral.run(
            python("import sys; sys.exit(6)"),
            nprocs=2,
            log_dir=tmp_path,
            max_restarts=1,
            restart_backoff=0,
        )
    report = json.loads(await asyncio.to_thread((tmp_path / "report.json").read_text))
    assert report["format"] == "corral-report/1"
    assert report["ok"] is False
    assert report["command"][0] == sys.executable
    assert report["root_cause"]["exitcode"] == 6
    assert [a["attempt"] for a in report["attempts"]] == [0, 1]
    last = report["attempts"][1]["ranks"]
    assert [r["pid"] for r in last] == [result.pids[0], result.pids[1]]
    assert {r["ended"] for r in last} <= {"failed", "terminated"}
    assert all(r["duration"] is not None and r["duration"] >= 0 for r in last)
    assert last[0]["stdout"] is None  # not redirected
    assert report["duration"] > 0


async def test_lines_of_a_watched_stream(tmp_path: Path) -> None:
    """watch="all": every line of every rank to a subscriber (no console); the logs match."""
    for r in range(2):
        os.mkfifo(tmp_path / f"go-{r}")
    code = (
        "import os, sys\n"
        "r = os.environ['RANK']\n"
        f"open({str(tmp_path)!r} + '/go-' + r).read()\n"
        "for k in range(3):\n"
        "    print(f'out {r} {k}', flush=True)\n"
        "sys.stderr.write(f'err {r} no newline')\n"
    )
    got: list[corral.Line] = []
    async with asyncio.timeout(30):
        async with corral.spawn(python(code), nprocs=2, log_dir=tmp_path / "l", watch="all") as g:
            lines = g.lines()  # subscribed now
            first = asyncio.ensure_future(anext(lines))
            for r in range(2):
                await asyncio.to_thread((tmp_path / f"go-{r}").write_text, "go")
            got.append(await first)
            result = await g.wait()  # the group is closed now: the subscription ends
            got.extend([line async for line in lines])
    assert result.ok
    for r in range(2):
        outs = [x.data for x in got if x.rank == r and x.stream == "out"]
        assert outs == [f"out {r} {k}\n".encode() for k in range(3)]
        errs = [x.data for x in got if x.rank == r and x.stream == "err"]
        assert errs == [f"err {r} no newline".encode()]
        log = (tmp_path / "l" / str(r) / "stdout.log").read_bytes()
        assert log == b"".join(outs)
    assert all(x.missed == 0 and x.attempt == 0 for x in got)


async def test_a_slow_line_consumer_is_told_what_it_missed(tmp_path: Path) -> None:
    """A subscriber that stops reading keeps its newest maxsize lines, then learns how many
    it missed; the rank never waits for it and the log has every line."""
    go, printed, last = tmp_path / "go", tmp_path / "printed", tmp_path / "last"
    for f in (go, printed, last):
        os.mkfifo(f)
    code = (
        f"open({str(go)!r}).read()\n"
        "for k in range(1000):\n"
        "    print(k, flush=True)\n"
        f"open({str(printed)!r}, 'w').write('printed')\n"
        f"open({str(last)!r}).read()\n"
        "print('last', flush=True)\n"
    )
    async with asyncio.timeout(30):
        async with corral.spawn(python(code), nprocs=1, log_dir=tmp_path / "l", watch="out") as g:
            lines = g.lines(maxsize=10)  # subscribed now; not read until the rank printed
            witness = g.lines()  # reads on: it shows when the pump has read everything
            await asyncio.to_thread(go.write_text, "go")
            assert await asyncio.to_thread(printed.read_text) == "printed"
            while (await anext(witness)).data != b"999\n":
                pass
            # It kept the oldest maxsize lines: read them (its queue is empty then),
            # then let the rank print its last line.
            got = [await anext(lines) for _ in range(10)]
            await asyncio.to_thread(last.write_text, "go")
            after = await anext(lines)
            assert await g.wait()
            await witness.aclose()  # type: ignore[attr-defined]
    assert [x.data for x in got] == [b"%d\n" % k for k in range(10)]
    assert all(x.missed == 0 for x in got)
    assert after.data == b"last\n"
    assert after.missed == 990  # told, with the first line after the gap
    log = (tmp_path / "l" / "0" / "stdout.log").read_text().splitlines()
    assert log == [*map(str, range(1000)), "last"]


async def test_a_silent_rank_is_failed_as_hung(tmp_path: Path) -> None:
    """hang_timeout: rank 0 goes silent (hung), rank 1 only touches its heartbeat file,
    rank 2 keeps printing. Rank 0 is dumped and failed as hung, the root cause; the others
    are terminated by the close that follows."""
    code = (
        "import os, pathlib, sys, time\n"
        "r = os.environ['RANK']\n"
        "beat = pathlib.Path(os.environ['CORRAL_HEARTBEAT_FILE'])\n"
        "print('started', flush=True)\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
        "    if r == '1':\n"
        "        beat.touch()\n"
        "    elif r == '2':\n"
        "        print('.', flush=True)\n"
    )
    async with asyncio.timeout(30):
        async with corral.spawn(
            python(code), nprocs=3, log_dir=tmp_path, redirects="out", hang_timeout=1.5, grace=5
        ) as group:
            result = await group.wait()
    assert set(result.failures) == {0}
    hung = result.failures[0]
    assert hung.message.startswith("hung: no output or heartbeat for ")
    assert result.root_cause is hung
    assert result.terminated == {1, 2}
    assert [e.rank for e in group.history if e.kind == "hang"] == [0]
    if 0 in result.stacks:  # py-spy (or faulthandler) could read it
        assert result.stacks[0].exists()
    with pytest.raises(corral.ConfigError, match="hang_timeout"):
        corral.spawn(python("pass"), nprocs=1, hang_timeout=0)


async def test_ready_waits_for_each_ranks_line(tmp_path: Path) -> None:
    """ready_line: ready() returns once every rank printed it; a signal sent then reaches
    the rank's handler (the README's use); a "ready" event per rank."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: (print('got usr1', flush=True), sys.exit(0)))\n"
        "if os.environ['RANK'] == '1':\n"
        f"    open({str(fifo)!r}).read()\n"
        "print('listening on 1234', flush=True)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    async with asyncio.timeout(30):
        async with corral.spawn(
            python(code), nprocs=2, log_dir=tmp_path / "l", ready_line="listening on"
        ) as group:
            await group.ready([0])
            assert not any(e.kind == "ready" and e.rank == 1 for e in group.history)
            await asyncio.to_thread(fifo.write_text, "go")
            await group.ready()
            group.send_signal(signal.SIGUSR1)
            result = await group.wait()
    assert result.ok, result.describe()
    assert (tmp_path / "l" / "1" / "stdout.log").read_text().endswith("got usr1\n")
    assert sorted(e.rank or 0 for e in group.history if e.kind == "ready") == [0, 1]


async def test_a_rank_not_ready_in_time_is_failed(tmp_path: Path) -> None:
    """fail_after: the silent rank is failed as not ready (the root cause), the group closes."""
    code = (
        "import os, time\nif os.environ['RANK'] == '0': print('READY', flush=True)\ntime.sleep(600)"
    )
    async with asyncio.timeout(30):
        async with corral.spawn(
            python(code), nprocs=2, log_dir=tmp_path, ready_line="READY", grace=5
        ) as group:
            with pytest.raises(TimeoutError, match=r"\[1\] not ready within 0.5 s"):
                await group.ready(fail_after=0.5)
            result = await group.wait()
    assert set(result.failures) == {1}
    assert result.failures[1].message.startswith("not ready within 0.5 s")
    assert result.root_cause is result.failures[1]
    assert result.terminated == {0}
    with pytest.raises(corral.ConfigError, match="ready_line"):
        corral.spawn(python("pass"), nprocs=1, ready_line="two\nlines")


async def test_ready_by_a_write_to_the_ready_fd(tmp_path: Path) -> None:
    """ready_fd=True: a rank says it is ready by writing to $CORRAL_READY_FD (no output,
    no corral import) and may write again (never SIGPIPE); a rank that closes it
    unwritten is never ready, and ready() says so at once; every pipe closes with the
    group."""
    go, again = tmp_path / "go", tmp_path / "again"
    os.mkfifo(go)
    os.mkfifo(again)
    code = (
        "import os, time\n"
        "fd = int(os.environ['CORRAL_READY_FD'])\n"
        "if os.environ['RANK'] == '0':\n"
        f"    open({str(go)!r}).read()\n"
        "    os.write(fd, b'R')\n"
        f"    open({str(again)!r}).read()\n"
        "    os.write(fd, b'\\n')\n"
        "    raise SystemExit(0)\n"
        "os.close(fd)\n"
        "time.sleep(600)\n"
    )
    fds = len(os.listdir("/proc/self/fd"))
    async with asyncio.timeout(30):
        async with corral.spawn(
            python(code), nprocs=2, log_dir=tmp_path / "l", ready_fd=True, redirects="out", grace=5
        ) as group:
            events = group.events()
            assert not any(e.kind == "ready" for e in group.history)
            await asyncio.to_thread(go.write_text, "go")
            await group.ready([0])
            await asyncio.to_thread(again.write_text, "go")
            async for event in events:
                if event.kind == "exit" and event.rank == 0:
                    assert event.exitcode == 0  # the second write did not break its pipe
                    break
            with pytest.raises(corral.CorralError, match=r"\[1\] closed \$CORRAL_READY_FD"):
                await group.ready(fail_after=20)
            result = await group.close()
    assert [e.rank for e in group.history if e.kind == "ready"] == [0]
    assert result.exit_codes[0] == 0
    assert result.terminated == {1}
    assert (tmp_path / "l" / "0" / "stdout.log").read_text() == ""
    assert len(os.listdir("/proc/self/fd")) == fds  # every readiness pipe closed
    with pytest.raises(corral.ConfigError, match="ready_fd"):
        corral.spawn(python("pass"), nprocs=1, ready_fd=1)  # type: ignore[arg-type]


async def test_a_rank_not_ready_by_its_fd_in_time_is_failed(tmp_path: Path) -> None:
    """ready_fd and fail_after: a rank that keeps its fd open, unwritten, is failed as
    not ready, naming what it did not do."""
    async with asyncio.timeout(30):
        async with corral.spawn(
            python("import time; time.sleep(600)"), nprocs=1, log_dir=tmp_path, ready_fd=True
        ) as group:
            with pytest.raises(TimeoutError, match=r"no write to \$CORRAL_READY_FD"):
                await group.ready(fail_after=0.3)
            result = await group.wait()
    assert result.failures[0].message == "not ready within 0.3 s (no write to $CORRAL_READY_FD)"


async def test_ready_needs_a_way_to_say_it(tmp_path: Path) -> None:
    """ready() on a group with neither ready_line nor ready_fd: a ConfigError naming both."""
    async with corral.spawn(python("pass"), nprocs=1, log_dir=tmp_path) as group:
        with pytest.raises(corral.ConfigError, match=r"ready_line=.*ready_fd=True"):
            await group.ready()
        await group.wait()


async def test_ready_of_a_rank_that_exits_first(tmp_path: Path) -> None:
    """A rank that ends before its ready line: ready() says so at once."""
    async with asyncio.timeout(30):
        async with corral.spawn(
            python("import sys; sys.exit(2)"), nprocs=1, log_dir=tmp_path, ready_line="up"
        ) as group:
            with pytest.raises(
                corral.CorralError, match="ended before saying ready \\(no 'up' on its stdout\\)"
            ):
                await group.ready()


async def test_a_start_failing_midway_leaks_no_readiness_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ready_fd, and the third rank's log cannot be opened: the start fails cleanly and no
    readiness pipe (of the started ranks or of the one that failed) is left open."""
    from corral import _spawn

    opened = _spawn._open_log
    calls = 0

    def third_fails(path: os.PathLike[str] | None) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return opened(path)

    monkeypatch.setattr(_spawn, "_open_log", third_fails)
    fds = len(os.listdir("/proc/self/fd"))
    group = corral.spawn(
        python("import time; time.sleep(600)"),
        nprocs=3,
        log_dir=tmp_path,
        ready_fd=True,
        redirects="out",
    )
    with pytest.raises(corral.CorralError, match="could not start the group"):
        await group.start()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert "could not start the group" in str(group.history[-1].detail.get("error"))
