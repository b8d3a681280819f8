"""Line subscriptions with real ranks: batches and single lines, byte-exact against the logs;
each subscriber's own ``missed``; a consumer that stops reading; subscribing at the call.

Every wait on a rank is a handshake (a FIFO the rank opens, or ``ready_line`` seen by the
pump), never a sleep. The ranks run with the default buffering of a user's interpreter
(no ``-u``, ``PYTHONUNBUFFERED`` unset): their chunks are what the kernel gives.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import TYPE_CHECKING, TypeVar

import pytest

import corral

from .helpers import fifos

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)

#: Varied output: short and empty lines, ``\r`` progress lines, lines of all lengths,
#: one of 200 000 bytes (it comes in 64 KiB pieces), big blocks, a last line without newline.
WRITER = """
import random, sys
open(sys.argv[1]).read()
rng = random.Random(7)
out = sys.stdout.buffer
for i in range(20000):
    out.write(b"line %d " % i + b"x" * rng.randrange(0, 300) + b"\\n")
    if i % 1000 == 0:
        out.write(b"\\n" + b"progress 1\\rprogress 2\\r\\n")
        out.flush()
out.write(b"y" * 200000 + b"\\n")
block = b"z" * 99 + b"\\n"
for _ in range(30):
    out.write(block * 1000)
out.write(b"the end, no newline")
"""


@pytest.fixture(autouse=True)
def buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks buffer their output as a user's Python does (this machine sets -u)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)


def py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


async def say(fifo: Path, text: str = "go") -> None:
    """Open the FIFO the rank waits on and write to it (returns once the rank read it)."""
    await asyncio.to_thread(fifo.write_text, text)


async def hear(fifo: Path) -> str:
    """Wait until the rank writes to the FIFO."""
    return await asyncio.to_thread(fifo.read_text)


T = TypeVar("T")


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def test_batches_are_the_log_byte_for_byte(tmp_path: Path) -> None:
    """lines(batched=True): the batches joined are the log file, each batch whole lines
    (or one 64 KiB piece, or the last line without newline); nothing missed."""
    (go,) = fifos(tmp_path, "go")
    async with corral.spawn(py(WRITER, go), nprocs=1, log_dir=tmp_path / "l", watch="out") as g:
        batches = g.lines(batched=True, maxbytes=2**30)
        reader = asyncio.ensure_future(collect(batches))
        await say(go)
        result = await g.wait()
        got = await reader
    assert result.ok
    log = (tmp_path / "l" / "0" / "stdout.log").read_bytes()
    assert b"".join(b.data for b in got) == log
    assert all(isinstance(b, corral.Lines) for b in got)
    assert all((b.rank, b.stream, b.attempt, b.missed) == (0, "out", 0, 0) for b in got)
    for b in got:
        assert b.data.endswith(b"\n") or b"\n" not in b.data
    lines = [line for b in got for line in b]
    assert b"".join(lines) == log
    assert sum(b.count for b in got) == len(lines)
    assert b"progress 1\rprogress 2\r\n" in lines  # split on \n only
    pieces = [x for x in lines[:-1] if not x.endswith(b"\n")]
    assert pieces
    assert all(len(x) == 64 * 1024 for x in pieces)
    assert lines[-1] == b"the end, no newline"
    assert len(got) < len(lines)  # delivered in batches, not line by line


async def test_single_lines_are_the_log_byte_for_byte(tmp_path: Path) -> None:
    """lines(): one Line per line (split from the batches in the consumer), the log exactly."""
    (go,) = fifos(tmp_path, "go")
    async with corral.spawn(py(WRITER, go), nprocs=1, log_dir=tmp_path / "l", watch="out") as g:
        reader = asyncio.ensure_future(collect(g.lines(maxbytes=2**30)))
        await say(go)
        result = await g.wait()
        got = await reader
    assert result.ok
    log = (tmp_path / "l" / "0" / "stdout.log").read_bytes()
    assert b"".join(x.data for x in got) == log
    assert all(isinstance(x, corral.Line) and x.missed == 0 for x in got)
    assert sum(1 for x in got if x.data == b"progress 1\rprogress 2\r\n") == 20
    pieces = [x.data for x in got[:-1] if not x.data.endswith(b"\n")]
    assert pieces
    assert all(p == b"y" * 64 * 1024 for p in pieces)
    assert got[-1].data == b"the end, no newline"


COUNTER = """
import sys
go, printed, last = sys.argv[1:]
open(go).read()
for k in range(1000):
    print(k, flush=True)
open(printed, "w").write("printed")
open(last).read()
print("last", flush=True)
"""


async def test_each_subscriber_gets_its_own_missed_count(tmp_path: Path) -> None:
    """Two subscribers: one stops reading (10 lines at most), one reads everything. The
    first learns what it missed; the second's lines never carry the first one's count."""
    go, printed, last = fifos(tmp_path, "go", "printed", "last")
    cmd = py(COUNTER, go, printed, last)
    async with corral.spawn(cmd, nprocs=1, log_dir=tmp_path / "l", watch="out") as g:
        slow = g.lines(maxsize=10)  # registered first: the one that misses lines
        fast = g.lines()
        fast_got = []
        await say(go)
        assert await hear(printed) == "printed"
        while (line := await anext(fast)).data != b"999\n":  # the pump read everything
            fast_got.append(line)
        fast_got.append(line)
        # The slow one kept its oldest 10 lines: once they are read its queue is empty.
        slow_got = [await anext(slow) for _ in range(10)]
        await say(last)
        after = await anext(slow)
        result = await g.wait()
        fast_got += [x async for x in fast]
        assert [x async for x in slow] == []  # ended with the group
    assert result.ok
    assert [x.data for x in fast_got] == [b"%d\n" % k for k in range(1000)] + [b"last\n"]
    assert all(x.missed == 0 for x in fast_got)
    assert [x.data for x in slow_got] == [b"%d\n" % k for k in range(10)]
    assert all(x.missed == 0 for x in slow_got)
    assert after.data == b"last\n"
    assert after.missed == 990  # told, with the first line after the gap
    log = (tmp_path / "l" / "0" / "stdout.log").read_bytes()
    assert log == b"".join(x.data for x in fast_got)


FLOOD = """
import sys
go, done, end = sys.argv[1:]
open(go).read()
block = b"w" * 99 + b"\\n"
for _ in range(200):
    sys.stdout.buffer.write(block * 1000)
sys.stdout.flush()
open(done, "w").write("done")
open(end).read()
sys.stdout.buffer.write(b"last\\n")
"""


async def test_a_consumer_that_stops_reading(tmp_path: Path) -> None:
    """A subscriber that reads nothing while the rank writes 20 MB: the rank finishes
    anyway, the subscriber holds at most maxbytes of the oldest lines, the next batch
    says how many lines it missed, and the log has everything."""
    go, done, end = fifos(tmp_path, "go", "done", "end")
    cmd = py(FLOOD, go, done, end)
    async with corral.spawn(cmd, nprocs=1, log_dir=tmp_path / "l", watch="out") as g:
        batches = g.lines(batched=True, maxbytes=256 * 1024)
        witness = g.lines(batched=True, maxbytes=2**30)  # shows when the pump read it all
        await say(go)
        assert await hear(done) == "done"  # all written: nothing waited for the subscriber
        seen = 0
        while seen < 20_000_000:
            seen += len((await anext(witness)).data)
        await say(end)
        kept = []
        while not (batch := await anext(batches)).data.endswith(b"last\n"):
            kept.append(batch)
        result = await g.wait()
        await witness.aclose()  # type: ignore[attr-defined]
    assert result.ok
    log = (tmp_path / "l" / "0" / "stdout.log").read_bytes()
    assert log == (b"w" * 99 + b"\n") * 200_000 + b"last\n"
    held = b"".join(b.data for b in kept)
    assert 0 < len(held) <= 256 * 1024  # bounded, and the oldest lines
    assert log.startswith(held)
    assert all(b.missed == 0 for b in kept)
    assert batch.data == b"last\n"
    assert batch.missed == 200_000 - len(held) // 100
    assert sum(b.count for b in kept) + batch.missed + 1 == 200_001


HALF = """
import os, sys
go, wrote, rest = sys.argv[1:]
open(go).read()
os.write(1, b"first\\n")
open(wrote, "w").write("wrote")
os.write(1, b"partial-")
open(rest).read()
os.write(1, b"rest\\n")
"""


async def test_a_subscription_starts_at_the_call_and_at_a_line_boundary(
    tmp_path: Path,
) -> None:
    """lines() subscribes when called, not at the first iteration: a line written before
    the first anext() is there. One that subscribes mid-line gets that line whole."""
    go, wrote, rest = fifos(tmp_path, "go", "wrote", "rest")
    cmd = py(HALF, go, wrote, rest)
    async with corral.spawn(
        cmd, nprocs=1, log_dir=tmp_path / "l", watch="out", ready_line="partial-"
    ) as g:
        early = g.lines()  # not iterated yet
        await say(go)
        assert await hear(wrote) == "wrote"
        await g.ready()  # the pump has read "partial-": a subscriber now joins mid-line
        late = g.lines(batched=True)
        await say(rest)
        assert (await g.wait()).ok  # closed: the subscriptions end once read
        assert [x.data async for x in early] == [b"first\n", b"partial-rest\n"]
        assert [x.data async for x in late] == [b"partial-rest\n"]


async def test_a_dropped_or_closed_subscription_is_unregistered(tmp_path: Path) -> None:
    """An iterator closed, or dropped without being iterated, stops receiving at once."""
    group = corral.spawn(py("import time; time.sleep(600)"), nprocs=1, log_dir=tmp_path)
    async with group:

        def listening() -> bool:
            return group._lines.listening

        assert not listening()
        unused = group.lines()
        assert listening()
        del unused
        gc.collect()
        assert not listening()
        closed = group.lines(batched=True)
        assert listening()
        await closed.aclose()  # type: ignore[attr-defined]
        assert not listening()
        await group.close(grace=5)


async def test_bad_limits_are_refused(tmp_path: Path) -> None:
    group = corral.spawn(py("pass"), nprocs=1, log_dir=tmp_path)
    for bad in ({"maxbytes": 0}, {"maxsize": 0}, {"maxbytes": True}, {"maxsize": 1.5}):
        with pytest.raises(corral.ConfigError):
            group.lines(**bad)
    assert not group._lines.listening
