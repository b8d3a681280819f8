"""Error files: ``@corral.record``, PyTorch's format, root cause by timestamp, the failure text."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import corral
from corral._record import read_error_file, write_error_file

if TYPE_CHECKING:
    from collections.abc import Iterable

CHILDREN = Path(__file__).parent / "children"
RECORD_MAIN = str(CHILDREN / "record_main.py")
RECORD_ORDER = str(CHILDREN / "record_order.py")
TORCH_FORMAT = str(CHILDREN / "record_torch_format.py")


NO_WAITID = pytest.mark.skipif(not hasattr(os, "waitid"), reason="needs os.waitid (Linux)")


def _block_until_exited(pids: Iterable[int]) -> None:
    """Block (the event loop too) until every pid has exited, without reaping it.

    While the loop is blocked corral cannot see the first exit and start
    closing, so every rank here gets to fail on its own.
    """
    for pid in pids:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _fail_in_order(first: int, go: Path, then: int) -> None:
    """Block (the loop too) until rank pid ``first`` has exited, then let the rank
    waiting on the FIFO ``go`` proceed, and block until ``then`` has exited too."""
    _block_until_exited([first])
    with open(go, "wb"):
        pass  # the waiting rank reads end of file: its go
    _block_until_exited([then])


async def test_record_in_a_command_rank(tmp_path: Path) -> None:
    """@corral.record on a command's main() writes error.json; the Failure reads it."""
    async with asyncio.timeout(20):
        result = await corral.run(
            [sys.executable, RECORD_MAIN], nprocs=1, args=["7"], redirects="all", log_dir=tmp_path
        )
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.message == "TrainingError: loss is NaN at batch 7"
    assert failure.error_file == tmp_path / "0" / "error.json"
    assert failure.error is not None
    assert failure.error["type"] == "__main__.TrainingError"
    assert failure.traceback is not None
    assert "in step" in failure.traceback
    stderr = (tmp_path / "0" / "stderr.log").read_text()
    assert "TrainingError: loss is NaN at batch 7" in stderr  # Python's own traceback too
    assert (tmp_path / "0" / "stdout.log").read_text() == "training\n"


@NO_WAITID
async def test_torch_format_error_file_read_without_torch(tmp_path: Path) -> None:
    """PyTorch's @record format (string timestamp of whole seconds) is read; torch is not used.

    A whole-second timestamp is refined by the exit time when that falls in
    the same second; otherwise (here: one recorded 100 s earlier) it is used as is.
    """
    had_torch = "torch" in sys.modules  # a multi-node test of this session may import it
    async with asyncio.timeout(20):
        async with corral.spawn(
            [sys.executable, TORCH_FORMAT],
            args={0: ["bad shape", "0"], 1: ["old news", "100"]},
            log_dir=tmp_path,
        ) as group:
            _block_until_exited(group.pids.values())  # both fail on their own
            result = await group.wait()
    assert had_torch or "torch" not in sys.modules
    now, old = result.failures[0], result.failures[1]
    assert now.exitcode == 1
    assert now.message == "ValueError: bad shape"
    assert now.error is not None
    raw = json.loads((tmp_path / "0" / "error.json").read_text())
    assert dict(now.error) == raw
    assert int(now.timestamp) == int(raw["message"]["extraInfo"]["timestamp"])
    assert now.traceback is not None
    assert "raise ValueError(sys.argv[1])" in now.traceback
    raw_old = json.loads((tmp_path / "1" / "error.json").read_text())
    assert old.timestamp == float(raw_old["message"]["extraInfo"]["timestamp"])
    assert old.message == "ValueError: old news"
    root = result.root_cause
    assert root is not None
    assert root.rank == 1


@NO_WAITID
async def test_root_cause_is_earliest_error_timestamp(tmp_path: Path) -> None:
    """Of two failing ranks, the root cause is the one whose error file says it failed first.

    Rank 1 raises first; rank 0 raises only once rank 1's error file exists.
    Both exits reach corral in the same loop iteration, so exit order cannot
    decide (a tie on exit time would go to the lower rank, 0): the error
    files' timestamps do.
    """
    go = tmp_path / "go"
    os.mkfifo(go)
    async with asyncio.timeout(20):
        async with corral.spawn(
            [sys.executable, RECORD_ORDER],
            args={0: ["second", str(go)], 1: ["first"]},
            redirects="all",
            log_dir=tmp_path / "logs",
        ) as group:
            _fail_in_order(group.pids[1], go, then=group.pids[0])
            result = await group.wait()
    assert set(result.failures) == {0, 1}
    first, second = result.failures[1], result.failures[0]
    assert first.message == "RuntimeError: first"
    assert second.message == "RuntimeError: second"
    assert first.timestamp < second.timestamp
    root = result.root_cause
    assert root is not None
    assert root.rank == 1


CRASH_AFTER = (
    "import os, signal, sys\n"
    "open(sys.argv[1], 'rb').read()\n"
    "print('segment table corrupt, giving up', file=sys.stderr, flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)
SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"


@NO_WAITID
async def test_raise_for_failure_text(tmp_path: Path) -> None:
    """raise_for_failure() raises GroupFailedError whose text explains the group at a glance.

    It names the root cause's rank, pid, exit code, message, traceback and
    logs; then the other failures (a signal, with the tail of its stderr)
    and the ranks corral terminated.
    """
    go = tmp_path / "go"
    os.mkfifo(go)
    async with asyncio.timeout(20):
        async with corral.spawn(
            [sys.executable],
            args={
                0: [RECORD_MAIN, "3"],
                1: ["-c", CRASH_AFTER, str(go)],
                2: ["-c", SLEEPER],
            },
            redirects="all",
            log_dir=tmp_path,
            grace=5,
        ) as group:
            _fail_in_order(group.pids[0], go, then=group.pids[1])
            result = await group.wait()
    assert result.terminated == frozenset({2})
    with pytest.raises(corral.GroupFailedError) as info:
        result.raise_for_failure()
    err = info.value
    assert isinstance(err, corral.CorralError)
    assert err.result is result
    text = str(err)
    print(text)  # shown with -s: what a user reads
    root, other = result.failures[0], result.failures[1]
    lines = text.splitlines()
    assert lines[0] == (
        "rank 0 failed first (2 of 3 ranks failed): TrainingError: loss is NaN at batch 3"
    )
    assert f"root cause: rank 0 (pid {root.pid}) exited with code 1 at " in text
    assert 'in step\n        raise TrainingError(f"loss is NaN at batch {batch}")' in text
    assert f"error file: {tmp_path / '0' / 'error.json'}" in text
    assert f"stderr: {tmp_path / '0' / 'stderr.log'}" in text
    assert f"rank 1 (pid {other.pid}) was killed by SIGKILL (exitcode -9), " in text
    assert "terminated by corral: ranks 2" in text
    assert text.endswith(f"logs: {tmp_path}")
    # The signalled rank's own description shows the end of its stderr.
    assert other.signal == "SIGKILL"
    assert "segment table corrupt, giving up" in other.describe()
    assert "last lines of stderr.log:" in other.describe()


def test_record_writes_once_and_lets_exits_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """record writes an exception once (innermost wins), skips SystemExit/KeyboardInterrupt."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("CORRAL_ERROR_FILE", str(path))

    @corral.record
    def inner() -> None:
        raise KeyError("k")

    @corral.record
    def outer() -> None:
        inner()

    with pytest.raises(KeyError):
        outer()
    written = json.loads(path.read_text())
    assert written["message"] == "KeyError: 'k'"
    assert written["type"] == "builtins.KeyError"
    assert "in inner" in written["traceback"]
    assert "in outer" not in written["traceback"]  # the outer record did not rewrite it
    assert "corral/_record.py" not in written["traceback"]  # nor is the wrapper's frame in it
    path.unlink()

    @corral.record
    def leave(exc: BaseException) -> None:
        raise exc

    with pytest.raises(SystemExit):
        leave(SystemExit(3))
    with pytest.raises(KeyboardInterrupt):
        leave(KeyboardInterrupt())
    assert not path.exists()


async def test_record_async_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """@record on an ``async def`` records the exception raised while awaiting it."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("CORRAL_ERROR_FILE", str(path))

    @corral.record
    async def main() -> int:
        await asyncio.sleep(0)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await main()
    assert json.loads(path.read_text())["message"] == "OSError: disk gone"


def test_record_outside_corral_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an error-file variable, record only re-raises."""
    monkeypatch.delenv("CORRAL_ERROR_FILE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    @corral.record
    def main(x: int) -> int:
        if x:
            raise ValueError(x)
        return 7

    assert main(0) == 7
    assert main.__name__ == "main"
    with pytest.raises(ValueError, match="1"):
        main(1)
    assert write_error_file(ValueError("x")) is False


def test_read_error_file_variants(tmp_path: Path) -> None:
    """Both formats parse; multi-line messages become one line; bad files are None."""
    corral_format = tmp_path / "c.json"
    corral_format.write_text(
        json.dumps({"message": "ValueError: a\nb", "type": "builtins.ValueError", "timestamp": 5.5})
    )
    info = read_error_file(corral_format)
    assert info is not None
    assert info.message == "ValueError: a [...]"
    assert info.timestamp == 5.5
    assert info.traceback is None

    torch_format = tmp_path / "t.json"
    torch_format.write_text(
        json.dumps(
            {
                "message": {
                    "message": "RuntimeError: x",
                    "extraInfo": {"py_callstack": "Traceback...", "timestamp": "1700000000"},
                }
            }
        )
    )
    info = read_error_file(torch_format)
    assert info is not None
    assert (info.message, info.traceback, info.timestamp) == (
        "RuntimeError: x",
        "Traceback...",
        1700000000.0,
    )

    for bad in ("{not json", "[1, 2]", ""):
        p = tmp_path / "bad.json"
        p.write_text(bad)
        assert read_error_file(p) is None
    assert read_error_file(tmp_path / "missing.json") is None


def test_describe_without_failures() -> None:
    """A Result with no failure says so (and raise_for_failure does nothing)."""
    ok = corral.Result(exit_codes={0: 0})
    ok.raise_for_failure()
    assert ok.describe() == "every rank succeeded"
    closed = corral.Result(exit_codes={0: -15, 1: -15}, terminated=frozenset({0, 1}))
    assert closed.describe() == "no rank failed; ranks 0-1 were terminated by close"
