"""A chatty rank's pipe is grown and read in bigger chunks; nothing is lost or torn."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING

from corral import _pump
from corral._tee import Console

from .conftest import python, run_on, spawn_on

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

# 8 MiB of numbered 100-byte lines, written in 1 MiB blocks (faster than one
# wake-up drains a 64 KiB pipe), then a last line without a newline.
_WRITER = (
    "import os\n"
    "lines = b''.join(b'%098d\\n' % i for i in range(83886))\n"
    "v = memoryview(lines)\n"
    "while v:\n"
    "    v = v[os.write(1, v[:1048576]):]\n"
    "os.write(1, b'tail-without-newline')\n"
)


async def test_busy_stream_keeps_every_byte_and_whole_lines(tmp_path: Path) -> None:
    """After the pipe grows, the log holds every byte in order and the tee only whole lines."""
    grown: list[int] = []
    original = _pump.Pump._grow

    def spy(self: _pump.Pump) -> None:
        original(self)
        transport = self._transport
        grown.append(getattr(transport, "max_size", 0))

    console_out = io.BytesIO()
    console = Console.create(stdout=console_out, stderr=io.BytesIO(), color=False)
    _pump.Pump._grow = spy  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(30):
            result = await run_on(
                python(_WRITER), nprocs=1, log_dir=tmp_path / "logs", tee="out", console=console
            )
    finally:
        _pump.Pump._grow = original  # type: ignore[method-assign]
    assert result.ok, result
    expected = b"".join(b"%098d\n" % i for i in range(83886)) + b"tail-without-newline"
    stdout = result.logs[0].stdout
    assert stdout is not None
    assert stdout.read_bytes() == expected
    teed = console_out.getvalue().split(b"\n")
    assert teed[-1] == b""
    lines = teed[:-1]
    assert lines[-1] == b"[0]: tail-without-newline"
    assert [ln[5:] for ln in lines[:-1]] == [b"%098d" % i for i in range(83886)]
    assert all(ln.startswith(b"[0]: ") for ln in lines)
    assert grown == [_pump.BUSY_PIPE]
    assert _pump._grown == 0  # the budget is given back when the pipe closes


async def test_growth_budget_exhausted_keeps_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the grown-pipe budget used up, a busy stream keeps 64 KiB reads and loses nothing."""
    monkeypatch.setattr(_pump, "MAX_GROWN", 0)
    console = Console.create(stdout=io.BytesIO(), stderr=io.BytesIO(), color=False)
    async with asyncio.timeout(30):
        group = spawn_on(
            python(_WRITER), nprocs=1, log_dir=tmp_path / "logs", tee="out", console=console
        )
        async with group:
            pumps = [p for r in group._attempt._ranks for p in r.pumps]
            result = await group.wait()
    assert result.ok, result
    assert [getattr(p._transport, "max_size", None) for p in pumps] == [_pump.CHUNK]
    stdout = result.logs[0].stdout
    assert stdout is not None
    expected = b"".join(b"%098d\n" % i for i in range(83886)) + b"tail-without-newline"
    assert stdout.read_bytes() == expected


async def test_quiet_stream_keeps_default_pipe(tmp_path: Path) -> None:
    """A rank that writes a few lines never gets a bigger pipe (pipe memory is pinned)."""
    calls: list[None] = []
    original = _pump.Pump._grow

    def spy(self: _pump.Pump) -> None:
        calls.append(None)
        original(self)

    console = Console.create(stdout=io.BytesIO(), stderr=io.BytesIO(), color=False)
    _pump.Pump._grow = spy  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(30):
            result = await run_on(
                python("print('a'); print('b')"),
                nprocs=1,
                log_dir=tmp_path / "logs",
                tee="all",
                console=console,
            )
    finally:
        _pump.Pump._grow = original  # type: ignore[method-assign]
    assert result.ok
    assert calls == []
