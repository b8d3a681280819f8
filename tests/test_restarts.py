"""Restarts: a failed attempt tears the whole group down and starts it again.

Every test uses real ranks whose behaviour depends on files in ``tmp_path`` (a
rank "fails once" by leaving a marker and exiting non-zero); backoffs are 0,
or an hour where a test shows that no restart happens (the test's timeout
would end it otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest

import corral
from corral import ConfigError, _platform

from .children import callable_fns as fns
from .cli_helpers import PY, corral_env
from .cli_helpers import corral as corral_cli
from .conftest import python

if TYPE_CHECKING:
    from pathlib import Path

CLI = (PY, "-m", "corral", "run")

#: Exit 3 the first time (leaving a marker), 0 after; print the attempt either way.
FAILS_ONCE = (
    "import os, sys, pathlib; "
    "print('attempt', os.environ['TORCHELASTIC_RESTART_COUNT'], "
    "'of', os.environ['TORCHELASTIC_MAX_RESTARTS']); "
    "mark = pathlib.Path(sys.argv[1]) / ('failed-' + os.environ['RANK']); "
    "first = not mark.exists(); mark.touch(); "
    "sys.exit(3 if first and os.environ['RANK'] == '1' else 0)"
)


async def test_a_rank_that_fails_once_succeeds_on_the_restart(tmp_path: Path) -> None:
    """Attempt 0 fails (rank 1 exits 3), attempt 1 succeeds; both attempts' logs are kept."""
    logs = tmp_path / "logs"
    async with asyncio.timeout(30):
        result = await corral.run(
            [*python(FAILS_ONCE), str(tmp_path)],
            nprocs=2,
            redirects="out",
            log_dir=logs,
            max_restarts=2,
            restart_backoff=0,
        )
    assert result.ok, result.describe()
    assert result.attempt == 1
    assert len(result.previous) == 1
    first = result.previous[0]
    assert first.attempt == 0
    assert set(first.failures) == {1}
    assert first.failures[1].exitcode == 3
    assert first.root_cause is not None
    for r in range(2):
        assert (logs / str(r) / "stdout.log").read_text() == "attempt 0 of 2\n"
        assert (logs / "attempt-1" / str(r) / "stdout.log").read_text() == "attempt 1 of 2\n"
        assert result.logs[r].stdout == logs / "attempt-1" / str(r) / "stdout.log"
    assert first.logs[1].stdout == logs / "1" / "stdout.log"
    assert not (logs / "attempt-2").exists()


async def test_restarts_exhausted(tmp_path: Path) -> None:
    """A rank that always fails: max_restarts + 1 attempts, the last one's failure reported."""
    async with asyncio.timeout(30):
        result = await corral.run(
            python("import sys; sys.exit(5)"),
            nprocs=2,
            log_dir=tmp_path,
            max_restarts=2,
            restart_backoff=0,
        )
    assert result.attempt == 2
    assert [r.attempt for r in result.previous] == [0, 1]
    assert all(r.failures for r in result.previous)
    assert result.root_cause is not None
    assert result.root_cause.exitcode == 5
    text = result.describe()
    assert "attempt 2 (after 2 restart(s)); earlier:" in text
    assert "attempt 0: rank " in text
    assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == [
        "0",
        "1",
        "attempt-1",
        "attempt-2",
        "report.json",
    ]


async def test_a_callable_rank_returns_after_a_restart(tmp_path: Path) -> None:
    """A callable's call file moves with each attempt; its return value comes from the last."""
    async with asyncio.timeout(30):
        result = await corral.run(
            fns.fail_once_then_return,
            args=(str(tmp_path / "marker"), 42),
            nprocs=1,
            log_dir=tmp_path / "logs",
            max_restarts=1,
            restart_backoff=0,
        )
    assert result.ok, result.describe()
    assert result.return_values == {0: 42}
    assert result.previous[0].failures[0].message.startswith("RuntimeError")


async def test_close_during_the_backoff_is_never_restarted(tmp_path: Path) -> None:
    """A close after a failure, while the restart waits: it ends there (an hour's backoff)."""
    async with asyncio.timeout(30):
        async with corral.spawn(
            python("import sys; sys.exit(4)"),
            nprocs=1,
            log_dir=tmp_path,
            max_restarts=3,
            restart_backoff=3600,
        ) as group:
            waiter = asyncio.ensure_future(group.wait())
            await asyncio.sleep(0)  # the waiter waits (a failure is seen with or without it)
            result = await group.close()
        assert await waiter is result
    assert group.attempt == 0
    assert result.attempt == 0
    assert not (tmp_path / "attempt-1").exists()


async def test_cancellation_is_never_restarted(tmp_path: Path) -> None:
    """A cancelled run closes its ranks (terminated, not failed) and starts no attempt."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    code = f"import time; open({str(fifo)!r}, 'w').write('ready'); time.sleep(600)"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(30) as scope:
            task = asyncio.ensure_future(
                corral.run(python(code), nprocs=1, log_dir=tmp_path / "logs", max_restarts=5)
            )
            assert await asyncio.to_thread(fifo.read_text) == "ready"  # the rank's handshake
            scope.reschedule(asyncio.get_running_loop().time())
            await task
    assert task.cancelled()
    assert not (tmp_path / "logs" / "attempt-1").exists()


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"max_restarts": 1.5}, "max_restarts"),
        ({"restart_backoff": "x"}, "restart_backoff"),
        ({"restart_backoff_max": float("inf")}, "restart_backoff_max"),
    ],
)
def test_bad_restart_options(tmp_path: Path, options: dict[str, object], word: str) -> None:
    """Bad restart keywords are a ConfigError naming the keyword; nothing is created."""
    with pytest.raises(ConfigError, match=word):
        corral.spawn(PY, nprocs=1, log_dir=tmp_path / "logs", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "logs").exists()


def test_an_earlier_runs_attempt_folders_are_refused(tmp_path: Path) -> None:
    """A log_dir holding attempt-K from an earlier run is refused: nothing is overwritten."""
    (tmp_path / "attempt-1").mkdir()
    with pytest.raises(ConfigError, match="attempt-1"):
        corral.spawn(PY, nprocs=1, log_dir=tmp_path, max_restarts=1)


@pytest.mark.parametrize("sub", ["run", "torchrun"])
def test_cli_max_restarts(tmp_path: Path, sub: str) -> None:
    """`--max-restarts 1`: corral says it restarts, then exits 0; the summary is empty."""
    script = tmp_path / "flaky.py"
    script.write_text(FAILS_ONCE.replace("; ", "\n"))
    if sub == "run":
        args = ["-n", "2", "--max-restarts", "1", "--restart-backoff", "0", "--"]
        args += [PY, str(script), str(tmp_path)]
    else:
        args = ["--nproc-per-node", "2", "--max-restarts", "1", str(script), str(tmp_path)]
    res = corral_cli(*args, command=sub, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "corral: attempt 0 failed (rank 1: exited with code 3); restart 1 of 1" in res.stderr
    assert "[0]: attempt 1 of 1\n" in res.stdout


def test_cli_restarts_exhausted_exit_with_the_last_failure(tmp_path: Path) -> None:
    """Every attempt fails: the summary names the last attempt and the earlier ones."""
    res = corral_cli("--max-restarts", "1", "--restart-backoff", "0", "--", *python("exit(9)"))
    assert res.returncode == 9, res.stderr
    assert "attempt 1 (after 1 restart(s)); earlier:" in res.stderr
    assert "attempt 0: rank 0 exited with code 9" in res.stderr


def test_sigterm_to_corral_is_never_restarted(tmp_path: Path) -> None:
    """SIGTERM while ranks run: forwarded, the group closes, no attempt follows."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    rank = f"import time; open({str(fifo)!r}, 'w').write('ready'); time.sleep(600)"
    proc = subprocess.Popen(
        [*CLI, "--max-restarts", "3", "--log-dir", str(tmp_path / "l"), "--", *python(rank)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=corral_env(),
    )
    try:
        assert fifo.read_text() == "ready"  # the rank's handshake
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "l" / "attempt-1").exists()


@pytest.mark.parametrize("max_restarts", [0, 2])
async def test_a_start_that_fails_still_ends_the_events_and_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_restarts: int
) -> None:
    """The start itself fails (here: no descriptors left): ``events()`` ends with
    ``closed`` carrying the error, and report.json says so, with or without restarts."""

    def no_descriptors(_: int) -> object:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(_platform, "fd_budget", no_descriptors)
    group = corral.spawn(python("pass"), nprocs=2, log_dir=tmp_path, max_restarts=max_restarts)
    with pytest.raises(corral.CorralError, match="could not start the group"):
        await group.start()
    async with asyncio.timeout(10):
        kinds = [e.kind async for e in group.events()]
    assert kinds[-1] == "closed"
    assert "could not start" in str(group.history[-1].detail.get("error", ""))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False
    assert "could not start" in report["error"]


async def test_entering_a_started_group_again_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A second start of a running group: a CorralError; the group runs on, unclosed."""
    group = corral.spawn(python("import time; time.sleep(600)"), nprocs=1, log_dir=tmp_path)
    async with group:
        with pytest.raises(corral.CorralError, match="entered only once"):
            await group.start()
        assert group.poll() is None
        assert [e.kind for e in group.history] == ["start"]
        result = await group.close(grace=5)
    assert result.terminated == {0}
