"""Guarantee 1: every byte in the log files, every line on the console, whole."""

from __future__ import annotations

import asyncio
import io
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import corral
from corral import Std, _pump
from corral._pump import LINE_CAP
from corral._tee import Console

from .conftest import python, run_on, spawn_on, watched_console

if TYPE_CHECKING:
    import pytest


def _console() -> tuple[Console, io.BytesIO, io.BytesIO]:
    out, err = io.BytesIO(), io.BytesIO()
    return Console.create(stdout=out, stderr=err, color=False), out, err


def _unprefix(console: bytes, prefix: bytes) -> bytes:
    lines = console.split(b"\n")
    assert lines[-1] == b""
    assert all(line.startswith(prefix) for line in lines[:-1])
    return b"\n".join(line[len(prefix) :] for line in lines[:-1]) + b"\n"


async def test_eight_mib_of_every_byte_value_through_the_tee(tmp_path: Path) -> None:
    """A teed log file is byte-exact (all 256 byte values, no final newline); the console
    gets the same bytes as prefixed lines plus a newline after the last one."""
    rng = random.Random(1234)
    data = rng.randbytes(8 * 1024 * 1024).rstrip(b"\n") + b"tail without newline"
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    code = f"import sys; sys.stdout.buffer.write(open({str(blob)!r}, 'rb').read())"
    console, out, _ = _console()
    async with asyncio.timeout(30):
        result = await run_on(
            python(code), nprocs=1, tee=Std.OUT, log_dir=tmp_path / "logs", console=console
        )
    assert result.ok
    assert (tmp_path / "logs" / "0" / "stdout.log").read_bytes() == data
    assert _unprefix(out.getvalue(), b"[0]: ") == data + b"\n"


async def test_redirect_only_is_written_by_the_rank_itself(tmp_path: Path) -> None:
    """A stream that is only redirected is the log file itself in the child (no pipe)."""
    code = (
        "import os, stat, sys;"
        "print(stat.S_ISREG(os.fstat(1).st_mode), stat.S_ISREG(os.fstat(2).st_mode));"
        "sys.stderr.write('to err')"
    )
    result = await corral.run(python(code), nprocs=2, redirects=Std.ALL, log_dir=tmp_path)
    assert result.ok
    for rank in (0, 1):
        assert (tmp_path / str(rank) / "stdout.log").read_text() == "True True\n"
        assert (tmp_path / str(rank) / "stderr.log").read_text() == "to err"
    assert result.logs[0].stdout == tmp_path / "0" / "stdout.log"


async def test_unredirected_streams_have_no_file(tmp_path: Path) -> None:
    """A stream that is neither redirected nor teed has no file and RankLogs says None."""
    result = await corral.run(python("pass"), nprocs=2, redirects={1: Std.ERR}, log_dir=tmp_path)
    assert result.logs[0].stdout is None
    assert result.logs[0].stderr is None
    assert result.logs[1].stdout is None
    assert result.logs[1].stderr == tmp_path / "1" / "stderr.log"
    assert not (tmp_path / "0" / "stdout.log").exists()
    assert result.logs[1].error_file == tmp_path / "1" / "error.json"


async def test_prefix_stream_field_and_console_streams(tmp_path: Path) -> None:
    """Teed stdout goes to the console's stdout and stderr to its stderr, each prefixed."""
    code = "import sys; print('o1'); sys.stderr.write('e1\\n'); print('o2')"
    console, out, err = _console()
    result = await run_on(
        python(code),
        nprocs=2,
        tee="all",
        prefix="<{rank}|{stream}> ",
        log_dir=tmp_path,
        console=console,
    )
    assert result.ok
    out_lines = sorted(out.getvalue().splitlines())
    assert out_lines == [b"<0|out> o1", b"<0|out> o2", b"<1|out> o1", b"<1|out> o2"]
    assert sorted(err.getvalue().splitlines()) == [b"<0|err> e1", b"<1|err> e1"]


async def test_tee_ranks_filters_the_console_not_the_files(tmp_path: Path) -> None:
    """Only tee_ranks reach the console; every rank still writes its log files."""
    console, out, _ = _console()
    result = await run_on(
        python("import os; print('rank', os.environ['RANK'])"),
        nprocs=3,
        tee="all",
        tee_ranks=[1],
        log_dir=tmp_path,
        console=console,
    )
    assert result.ok
    assert out.getvalue() == b"[1]: rank 1\n"
    for rank in range(3):
        assert (tmp_path / str(rank) / "stdout.log").read_text() == f"rank {rank}\n"


async def test_per_rank_tee_mapping(tmp_path: Path) -> None:
    """A tee mapping may omit ranks: they get Std.NONE (no file unless redirected)."""
    console, out, err = _console()
    result = await run_on(
        python("import sys; print('o'); print('e', file=sys.stderr)"),
        nprocs=3,
        tee={0: Std.OUT, 2: Std.ERR},
        redirects={1: Std.ALL},
        log_dir=tmp_path,
        console=console,
    )
    assert result.ok
    assert out.getvalue() == b"[0]: o\n"
    assert err.getvalue() == b"[2]: e\n"
    assert result.logs[0].stderr is None
    assert (tmp_path / "1" / "stdout.log").read_text() == "o\n"
    assert (tmp_path / "2" / "stderr.log").read_text() == "e\n"


async def test_a_huge_line_is_teed_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 6 MiB line without newline: the file is exact; the console gets pieces no longer
    than LINE_CAP, and the supervisor never holds more than LINE_CAP of the line."""
    held: list[int] = []
    real_feed = _pump._LineTee.feed

    def feed(self: _pump._LineTee, data: bytes) -> None:
        real_feed(self, data)
        held.append(len(self._partial))

    monkeypatch.setattr(_pump._LineTee, "feed", feed)
    size = 6 * 1024 * 1024
    code = (
        f"import sys; sys.stdout.buffer.write(b'x' * {size}); sys.stdout.buffer.write(b'\\nend\\n')"
    )
    console, out, _ = _console()
    result = await run_on(python(code), nprocs=1, tee="out", log_dir=tmp_path, console=console)
    assert result.ok
    assert (tmp_path / "0" / "stdout.log").read_bytes() == b"x" * size + b"\nend\n"
    lines = out.getvalue().split(b"\n")
    assert lines[-2:] == [b"[0]: end", b""]
    pieces = lines[:-2]
    assert all(p.startswith(b"[0]: ") for p in pieces)
    assert max(len(p) for p in pieces) <= LINE_CAP + len(b"[0]: ")
    assert sum(len(p) - len(b"[0]: ") for p in pieces) == size
    assert held  # the spy saw the stream
    assert max(held) < LINE_CAP


async def test_output_written_just_before_a_kill_is_kept(tmp_path: Path) -> None:
    """Bytes a rank wrote right before it was SIGKILLed, including what it wrote after
    SIGTERM during the grace period (more than a pipe holds), reach its log and console."""
    code = textwrap.dedent(
        """
        import os, signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.write(1, b"before, ")
        os.write(2, b"ready\\n")
        signal.sigwait({signal.SIGTERM})
        last = memoryview(b"y" * 200_000 + b"-end, no newline")
        while last:
            last = last[os.write(1, last):]
        while True:  # further SIGTERMs are ignored: only SIGKILL ends it
            signal.sigwait({signal.SIGTERM})
        """
    )
    console, out, err = watched_console()
    async with asyncio.timeout(20):
        async with spawn_on(
            python(code), nprocs=1, tee="all", grace=0.5, log_dir=tmp_path, console=console
        ) as group:
            await err.wait_for(b"ready")
            result = await group.close()
    assert result.exit_codes == {0: -9}
    assert (tmp_path / "0" / "stderr.log").read_bytes() == b"ready\n"
    expected = b"before, " + b"y" * 200_000 + b"-end, no newline"
    assert (tmp_path / "0" / "stdout.log").read_bytes() == expected
    shown = out.getvalue()
    assert shown.startswith(b"[0]: before, yyy")
    assert shown.endswith(b"-end, no newline\n")
    assert shown.replace(b"\n[0]: ", b"") == b"[0]: " + expected + b"\n"  # pieces of one line


TEE_RUN = str(Path(__file__).parent / "children" / "tee_run.py")

BUSY_WRITER = textwrap.dedent(
    """
    import os, random, sys
    rank = int(os.environ["RANK"])
    rng = random.Random(rank)
    for i in range(3000):
        line = f"rank{rank}-line{i}-" + "x" * rng.randrange(0, 3000) + f"-end{rank}"
        sys.stdout.write(line + "\\n")
        if i % 7 == 0:
            sys.stdout.flush()
    """
)


def test_four_busy_ranks_never_interleave_mid_line(tmp_path: Path) -> None:
    """Through the real console (the supervisor's stdout pipe), every teed line is one
    whole, correctly prefixed line of one rank, and each rank's lines stay in order."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, TEE_RUN, str(tmp_path), "4", "out", BUSY_WRITER],
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    seen: dict[int, list[int]] = {r: [] for r in range(4)}
    for line in proc.stdout.decode().splitlines():
        prefix, _, body = line.partition(": ")
        rank = int(prefix.strip("[]"))
        assert body.startswith(f"rank{rank}-line"), line[:80]
        assert body.endswith(f"-end{rank}"), line[-80:]
        seen[rank].append(int(body.split("-")[1][4:]))
    for rank in range(4):
        assert seen[rank] == list(range(3000))
        lines = (tmp_path / str(rank) / "stdout.log").read_text().splitlines()
        assert len(lines) == 3000


async def test_a_console_nobody_reads_never_blocks_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tee's console is a pipe that nobody reads: the event loop keeps running (the
    rank's stderr handshake still arrives), close() finishes within its bound, the log
    file keeps every byte the rank wrote, and the unshown console rest is reported."""
    code = textwrap.dedent(
        """
        import os, sys
        line = b"x" * 99 + b"\\n"
        for _ in range(10_000):          # ~1 MiB: far more than the console pipe holds
            os.write(1, line)
        os.write(2, b"flooded\\n")
        while True:
            os.write(1, line)
        """
    )
    r, w = os.pipe()
    console_out = os.fdopen(w, "wb")
    _, _, err = watched_console()
    console = Console.create(stdout=console_out, stderr=err, color=False)
    try:
        async with (
            asyncio.timeout(20),
            spawn_on(
                python(code), nprocs=1, tee="all", grace=0.2, log_dir=tmp_path, console=console
            ) as group,
        ):
            await err.wait_for(b"flooded")  # the loop was not stuck writing the console
            result = await group.close()
    finally:
        console.close()
        console_out.close()
        os.close(r)
    assert result.terminated == {0}
    log = (tmp_path / "0" / "stdout.log").read_bytes()
    assert len(log) >= 10_000 * 100
    assert log == b"x" * 99 + b"\n" + log[100:]  # whole lines, in order, from the start
    assert set(log.split(b"\n")[:-1]) == {b"x" * 99}
    assert "not being read" in caplog.text


def _read_slowly(argv: list[str], stderr: int | None = None) -> list[str]:
    """Run a supervisor script, reading its stdout in small reads (slower than it
    writes, so the pipe fills up); return its lines once it exited 0."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    chunks = []
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 512):
        chunks.append(chunk)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode().splitlines()


OUT_AND_ERR_WRITER = textwrap.dedent(
    """
    import os
    rank = os.environ["RANK"]
    for i in range(4000):
        os.write(1, f"rank{rank}-out{i}-".encode() + b"o" * 300 + b"-end\\n")
        os.write(2, f"rank{rank}-err{i}-".encode() + b"e" * 300 + b"-end\\n")
    """
)


def test_stdout_and_stderr_into_one_backed_up_pipe_stay_whole_lines(tmp_path: Path) -> None:
    """Regression (review): with the supervisor's stdout and stderr on one pipe (``2>&1``,
    or one terminal) that is read slower than written, every line stays whole: the two
    console streams share one writer and one queue."""
    lines = _read_slowly(
        [sys.executable, TEE_RUN, str(tmp_path), "2", "all", OUT_AND_ERR_WRITER],
        stderr=subprocess.STDOUT,
    )
    assert len(lines) == 2 * 2 * 4000
    for line in lines:
        prefix, _, body = line.partition(": ")
        assert prefix in ("[0]", "[1]"), line[:80]
        assert body.startswith(f"rank{prefix[1]}-"), line[:80]
        assert body.endswith("-end"), line[-80:]
        assert len(body) in range(310, 320), line[:80]


TAGGED_WRITER = textwrap.dedent(
    """
    import os
    tag = os.environ["TAG"]
    for i in range(3000):
        os.write(1, f"{tag}-{i}-".encode() + b"x" * 200 + b"-end\\n")
    """
)


def test_groups_on_two_threads_share_a_backed_up_console(tmp_path: Path) -> None:
    """Two groups, each on its own thread's event loop, tee into the supervisor's one
    stdout pipe, read slower than written: every line arrives whole, none is lost."""
    lines = _read_slowly([sys.executable, TEE_RUN, str(tmp_path), "2", "out", TAGGED_WRITER, "2"])
    assert len(lines) == 2 * 2 * 3000
    for line in lines:
        prefix, _, body = line.partition(": ")
        assert prefix in ("[0]", "[1]"), line[:80]
        assert body.endswith("-end"), line[-80:]
        assert len(body) in range(206, 214), line[:80]


def test_console_backlog_outlives_the_loop_that_watched_it() -> None:
    """Regression (CI): the loop watching a backed-up console ends (its group closed on
    another thread) while bytes queued by another loop are still pending: the next write
    or close on a live loop takes the console over, and every byte arrives."""
    read_end, write_end = os.pipe()
    chunk = b"x" * 99 + b"\n"
    expected = chunk * 6000
    received = bytearray()

    def read_all() -> None:  # until every byte came, or the console's writers closed
        while len(received) < len(expected) and (data := os.read(read_end, 1 << 16)):
            received.extend(data)

    reader = threading.Thread(target=read_all, daemon=True)
    target = open(write_end, "wb", buffering=0)  # noqa: SIM115 (closed in finally)
    console = Console.create(stdout=target, stderr=target, color=False)
    try:

        async def first_group() -> None:  # its bytes wait on its loop, which then ends
            console.stdout.write(chunk * 3000)

        thread = threading.Thread(target=asyncio.run, args=(first_group(),))
        thread.start()
        thread.join()

        async def second_group() -> None:
            console.stdout.write(chunk * 3000)
            reader.start()
            await console.wait_flushed(give_up_after=10.0)

        asyncio.run(second_group())
    finally:
        console.close()
        target.close()  # the reader sees EOF if bytes are missing
        reader.join(timeout=30)
        os.close(read_end)
    assert len(received) == len(expected)
    assert bytes(received) == expected


class _PumpSpy:
    """Stands for a pump's transport: the console pauses and resumes it."""

    paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


async def test_a_closing_group_leaves_the_console_backlog_to_a_group_on_its_loop() -> None:
    """Regression (review): two groups on one loop share the console; one closes while the
    other's backlog has its pump paused. The console must keep being watched on that loop,
    or the paused pump never resumes and that group's ranks block for ever."""
    read_end, write_end = os.pipe()
    target = open(write_end, "wb", buffering=0)  # noqa: SIM115 (closed in finally)
    first = Console.create(stdout=target, stderr=target, color=False)
    second = Console.create(stdout=target, stderr=target, color=False)
    pump = _PumpSpy()
    second.stdout.attach(pump)
    line = b"x" * 1023 + b"\n"
    loop = asyncio.get_running_loop()
    received = bytearray()
    drained = asyncio.Event()

    def on_readable() -> None:
        received.extend(os.read(read_end, 1 << 16))
        if len(received) >= 2048 * len(line):
            drained.set()

    try:
        for _ in range(2048):  # 2 MiB into a console nobody reads yet
            second.stdout.write(line)
        assert pump.paused
        first.close()  # the first group lets go of the console
        loop.add_reader(read_end, on_readable)  # now the console is read again
        async with asyncio.timeout(10):
            await drained.wait()
        assert bytes(received) == line * 2048
        assert not pump.paused
    finally:
        loop.remove_reader(read_end)
        second.stdout.detach(pump)
        second.close()
        target.close()
        os.close(read_end)


async def test_a_loop_that_ends_hands_the_console_backlog_to_a_loop_still_pumping() -> None:
    """Regression (review): group A, whose loop watches the console backlog, closes and
    its thread's loop ends, while group B's pump on another loop is paused behind that
    backlog. The watch must pass to B's loop: without it nothing would ever write the
    backlog or resume B's pump (B writes nothing more, and it is not closing)."""
    read_end, write_end = os.pipe()
    target = open(write_end, "wb", buffering=0)  # noqa: SIM115 (closed in finally)
    first = Console.create(stdout=target, stderr=target, color=False)
    second = Console.create(stdout=target, stderr=target, color=False)
    line = b"x" * 1023 + b"\n"
    resumed = threading.Event()
    paused = threading.Event()

    class Pump(_PumpSpy):
        def pause(self) -> None:
            super().pause()
            paused.set()

        def resume(self) -> None:
            super().resume()
            resumed.set()

    pump = Pump()
    loop_b = asyncio.new_event_loop()
    thread_b = threading.Thread(target=loop_b.run_forever)
    thread_b.start()

    async def attach() -> None:
        second.stdout.attach(pump)

    async def group_a() -> None:  # its bytes wait on its loop; then it closes
        for _ in range(2048):
            first.stdout.write(line)
        first.close()

    loop = asyncio.get_running_loop()
    received = bytearray()
    drained = asyncio.Event()

    def on_readable() -> None:
        received.extend(os.read(read_end, 1 << 16))
        if len(received) >= 2048 * len(line):
            drained.set()

    try:
        asyncio.run_coroutine_threadsafe(attach(), loop_b).result(timeout=10)
        thread_a = threading.Thread(target=asyncio.run, args=(group_a(),))
        thread_a.start()
        thread_a.join()  # A's loop is closed now
        # The pause is posted to B's loop: wait for it to run there.
        assert await asyncio.to_thread(paused.wait, 10)
        assert pump.paused
        loop.add_reader(read_end, on_readable)  # the console is read again
        async with asyncio.timeout(10):
            await drained.wait()
            await asyncio.to_thread(resumed.wait, 10)
        assert bytes(received) == line * 2048
        assert not pump.paused
    finally:
        loop.remove_reader(read_end)
        second.stdout.detach(pump)
        loop_b.call_soon_threadsafe(loop_b.stop)
        thread_b.join()
        second.close()
        loop_b.close()
        target.close()
        os.close(read_end)
