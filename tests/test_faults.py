"""Faults (SPEC guarantees 2-4): none of them hangs the supervisor, loses a log or leaks a process.

Every test is bounded by ``asyncio.timeout`` (grace plus a generous margin):
a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from corral import _platform
from corral._tee import Console

from .conftest import python, run_on, spawn_on
from .helpers import (
    CHILDREN,
    handshakes,
    own_children,
    rank_argv,
    survivors,
    use_mechanism,
    wait_exit,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not (_platform.HAS_PROC and _platform.HAS_PIDFD), reason="needs Linux /proc and pidfds"
)

GRACE = 0.3


def _console() -> tuple[Console, io.BytesIO, io.BytesIO]:
    out, err = io.BytesIO(), io.BytesIO()
    return Console.create(stdout=out, stderr=err, color=False), out, err


async def test_full_pipe_is_drained(tmp_path: Path) -> None:
    """A rank writing far more than a pipe holds is never blocked for good: every byte is logged."""
    console, out, _ = _console()
    size = 8 << 20
    code = (
        "import os, sys\n"
        f"n = {size}\n"
        "line = b'z' * 99 + b'\\n'\n"
        "buf = line * 2000\n"
        "while n > 0:\n"
        "    n -= os.write(1, buf[:n])\n"
    )
    async with asyncio.timeout(60):
        result = await run_on(
            python(code), nprocs=2, tee="out", log_dir=tmp_path / "logs", console=console
        )
    assert result.ok, result.describe()
    line = b"z" * 99 + b"\n"
    expected = hashlib.sha256((line * (size // 100 + 1))[:size]).hexdigest()
    for rank in (0, 1):
        data = (tmp_path / "logs" / str(rank) / "stdout.log").read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == expected
    # Every line on the console, the last one (no newline) completed by the tee.
    assert out.getvalue().count(b"\n") == 2 * (size // 100 + 1)


async def test_close_while_rank_is_writing_and_ignores_sigterm(tmp_path: Path) -> None:
    """A rank flooding its teed pipe and ignoring SIGTERM is SIGKILLed after the grace period."""
    console, _, _ = _console()
    with handshakes(tmp_path) as hs:
        code = (
            "import os, signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"fd = os.open({str(hs.path)!r}, os.O_WRONLY)\n"
            "me = os.readlink('/proc/self')  # the pid outside a pid namespace\n"
            "line = f\"{os.environ['RANK']} {os.environ['CORRAL_GROUP']} {me}\\n\"\n"
            "os.write(fd, line.encode())\n"
            "os.close(fd)\n"
            "while True:\n"
            "    os.write(1, b'w' * 65535 + b'\\n')\n"
        )
        since = time.time()
        async with asyncio.timeout(GRACE + 20):
            async with spawn_on(
                python(code), nprocs=2, tee="out", log_dir=tmp_path / "logs", console=console
            ) as group:
                report = await hs.report(2)
                result = await group.close(grace=GRACE)
    assert result.exit_codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL}
    assert result.terminated == {0, 1}
    for rank in (0, 1):
        data = (tmp_path / "logs" / str(rank) / "stdout.log").read_bytes()
        assert data
        assert data.strip(b"w\n") == b""
    assert survivors(report, since) == []


async def test_rank_closes_stdout_early(tmp_path: Path) -> None:
    """A rank that closes its stdout and runs on: EOF on one pump ends nothing else."""
    console, out, err = _console()
    code = (
        "import os, sys\n"
        "sys.stdout.write('before\\n'); sys.stdout.flush()\n"
        "os.close(1)\n"
        "sys.stderr.write('after\\n'); sys.stderr.flush()\n"
    )
    async with asyncio.timeout(30):
        result = await run_on(
            python(code), nprocs=1, tee="all", log_dir=tmp_path / "logs", console=console
        )
    assert result.ok, result.describe()
    assert (tmp_path / "logs/0/stdout.log").read_bytes() == b"before\n"
    assert (tmp_path / "logs/0/stderr.log").read_bytes() == b"after\n"
    assert out.getvalue() == b"[0]: before\n"
    assert err.getvalue() == b"[0]: after\n"


async def test_grandchild_holding_the_pipe(tmp_path: Path) -> None:
    """A setsid() grandchild holding the rank's pipe neither delays wait() nor survives it."""
    console, _, _ = _console()
    since = time.time()
    with handshakes(tmp_path) as hs:
        async with asyncio.timeout(30):
            group = spawn_on(
                rank_argv("setsid", hs.path),
                nprocs=2,
                tee="all",
                grace=GRACE,
                log_dir=tmp_path / "logs",
                console=console,
            )
            async with group:
                report = await hs.report(2)
                for pid in report.ranks.values():
                    os.kill(pid, signal.SIGUSR2)  # the ranks exit 0; the daemons live on
                result = await group.wait()
    assert result.ok, result.describe()
    assert survivors(report, since) == []


@pytest.mark.parametrize("mechanism", ["pidns", "walk"])
async def test_escaped_process_holding_the_pipe(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mechanism: str,
) -> None:
    """A writer that escaped the group (no token, own session, parent gone) cannot hang wait().

    In the group's PID namespace nothing escapes: it dies with the group. With the
    walk it is not found (the documented limit): the pipe is closed after the
    drain timeout.
    """
    use_mechanism(mechanism, monkeypatch)
    console, _, _ = _console()
    code = (
        "import os, sys\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        os.execve('/bin/sleep', ['sleep', '1000'], {})\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "os.wait()  # the daemon's parent is gone\n"
        "os.read(r, 1)  # EOF: the daemon has exec'd (w is close-on-exec)\n"
        "print('rank done')\n"
    )
    before = set(own_children())
    try:
        async with asyncio.timeout(30):
            result = await run_on(
                python(code), nprocs=1, tee="out", log_dir=tmp_path / "logs", console=console
            )
        assert result.ok, result.describe()
        assert (tmp_path / "logs/0/stdout.log").read_bytes() == b"rank done\n"
        if mechanism == "pidns":
            assert "still holds a rank's pipe" not in caplog.text
            assert own_children() - before == set(), "the escaped daemon survived"
        else:
            assert "still holds a rank's pipe" in caplog.text
    finally:
        for pid in own_children() - before:  # the escaped daemon, re-parented to us
            os.kill(pid, signal.SIGKILL)
            await wait_exit(pid)
            os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (it has exited)


async def _finish(sup: subprocess.Popen[bytes]) -> str:
    """Wait (event-driven, bounded) for a supervisor script to exit 0; return its stderr."""
    try:
        async with asyncio.timeout(60):
            await wait_exit(sup.pid)
        assert sup.wait() == 0
        assert sup.stderr is not None
        return sup.stderr.read().decode()
    finally:
        if sup.returncode is None:
            sup.kill()
            sup.wait()
        if sup.stderr is not None:
            sup.stderr.close()


async def test_console_goes_away(tmp_path: Path) -> None:
    """A console that goes away (broken pipe) disables the tee, not the run or its logs."""
    nprocs, lines = 2, 5000  # 500 kB a rank: far more than the console pipe holds
    out = tmp_path / "result.json"
    sup = subprocess.Popen(
        [
            sys.executable,
            str(CHILDREN / "contain_console.py"),
            str(tmp_path / "logs"),
            str(out),
            str(nprocs),
            str(lines),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert sup.stdout is not None
    assert sup.stdout.readline()  # the tee is flowing
    sup.stdout.close()  # the console goes away
    stderr = await _finish(sup)
    assert json.loads(out.read_text())["ok"] is True
    assert "tee to stdout disabled" in stderr
    for rank in range(nprocs):
        data = (tmp_path / "logs" / str(rank) / "stdout.log").read_bytes()
        assert data.count(b"\n") == lines
        assert data.endswith(b"%08d " % (lines - 1) + b"x" * 90 + b"\n")


async def test_log_write_failure_is_reported(tmp_path: Path) -> None:
    """A log file whose write fails (EFBIG past RLIMIT_FSIZE) is reported; other logs flow on."""
    limit = 100_000
    out = tmp_path / "result.json"
    sup = subprocess.Popen(
        [
            sys.executable,
            str(CHILDREN / "contain_fsize.py"),
            str(tmp_path / "logs"),
            str(out),
            str(limit),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = await _finish(sup)
    report = json.loads(out.read_text())
    assert report["exit_codes"] == {"0": 0, "1": 0}  # the rank itself ran to its end
    assert list(report["log_errors"]) == ["0"]
    assert "File too large" in report["log_errors"]["0"][0]
    assert "incomplete log of rank 0" in report["describe"]
    assert "rank 0 out" in stderr  # logged as an error too
    assert (tmp_path / "logs/0/stdout.log").stat().st_size == limit
    assert (tmp_path / "logs/1/stdout.log").read_bytes() == b"y" * (limit // 2)


def test_fd_budget_raises_the_soft_limit_or_names_it(tmp_path: Path) -> None:
    """Many teed ranks, low soft RLIMIT_NOFILE: raised to the hard limit, else a clear error."""
    script = (
        "import asyncio, resource, sys, corral\n"
        "soft, hard = (int(x) for x in sys.argv[1:3])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))\n"
        "async def main():\n"
        "    try:\n"
        "        r = await corral.run('/bin/true', nprocs=60, tee='all', log_dir=sys.argv[3])\n"
        "    except corral.CorralError as exc:\n"
        "        print('error:', exc)\n"
        "        return\n"
        "    print('ok' if r.ok else 'failed', resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "asyncio.run(main())\n"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("the hard RLIMIT_NOFILE is too low to show the raise")

    def run(soft: int, hard: int, logs: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(soft), str(hard), str(tmp_path / logs)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return proc.stdout.decode()

    assert run(128, 1024, "a").split() == ["ok", "1024"]
    message = run(128, 128, "b")
    assert message.startswith("error:")
    assert "file descriptors" in message
    assert "RLIMIT_NOFILE allows 128" in message


#: Two groups started at once under RLIMIT_NOFILE 200 (argv: LOG_DIR); prints one line
#: per group (``ok`` or the error's type and text), then the open descriptors before/after.
TWO_GROUPS_AT_ONCE = """
import asyncio, os, resource, sys
import corral
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

async def main():
    before = len(os.listdir('/proc/self/fd'))
    argv = [sys.executable, '-c', 'pass']
    results = await asyncio.gather(
        corral.run(argv, nprocs=30, tee='all', log_dir=os.path.join(sys.argv[1], 'a')),
        corral.run(argv, nprocs=11, tee='all', log_dir=os.path.join(sys.argv[1], 'b')),
        return_exceptions=True,
    )
    for r in results:
        print('ok' if isinstance(r, corral.Result) and r.ok else f'{type(r).__name__}: {r}')
    print('fds', before, len(os.listdir('/proc/self/fd')))

asyncio.run(main())
"""


async def test_two_groups_starting_at_once_into_the_fd_limit(tmp_path: Path) -> None:
    """Regression (issue 9, fault 6): two groups starting at once that do not both fit
    RLIMIT_NOFILE: the one that does not fit fails with a CorralError naming the budget
    (never a raw OSError), and no descriptor or process of it is left behind."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TWO_GROUPS_AT_ONCE,
        str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    first, second, fds = out.decode().splitlines()
    outcomes = [first, second]
    assert "ok" in outcomes, outcomes
    failed = [o for o in outcomes if o != "ok"]
    for line in failed:
        assert line.startswith("CorralError: could not start the group"), line
        assert "RLIMIT_NOFILE" in line, line
        assert "ulimit -n" in line, line
    _, before, after = fds.split()
    assert before == after, f"descriptors leaked: {before} before, {after} after"
