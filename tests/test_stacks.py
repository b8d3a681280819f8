"""What each rank was doing (stack dumps) and the victim-aware root cause (issue 11, item 4)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import corral
from corral import Failure, Result, _stacks
from tests.children import stack_fns
from tests.conftest import watched_console

from .conftest import spawn_on

if TYPE_CHECKING:
    from collections.abc import Iterator

CHILDREN = Path(__file__).parent / "children"
HAS_PY_SPY = _stacks.py_spy() is not None
needs_py_spy = pytest.mark.skipif(not HAS_PY_SPY, reason="py-spy is not installed")
#: Both mechanisms where both apply (callable ranks): py-spy, then faulthandler on SIGURG.
MECHANISMS = [
    pytest.param(True, id="py-spy", marks=needs_py_spy),
    pytest.param(False, id="faulthandler"),
]


@pytest.fixture
def use_py_spy(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Force py-spy on or off (the capability flag of ``corral._stacks``)."""
    wanted: bool = request.param
    before = _stacks.USE_PY_SPY
    _stacks.USE_PY_SPY = wanted
    try:
        yield wanted
    finally:
        _stacks.USE_PY_SPY = before


def _failure(rank: int, message: str, t: float, traceback: str | None = None) -> Failure:
    return Failure(
        rank=rank,
        pid=100 + rank,
        exitcode=1,
        signal=None,
        timestamp=t,
        error_file=None,
        error=None,
        message=message,
        traceback=traceback,
    )


# -- root cause -----------------------------------------------------------------------


def test_root_cause_rule_prefers_the_rank_that_stopped() -> None:
    """Earliest by timestamp among ranks not waiting for a peer; a victim only when all are."""
    gloo = "RuntimeError: [gloo] Timed out waiting 15000ms for send operation to complete"
    peer = "RuntimeError: Connection closed by peer [127.0.0.1]:29500"
    nccl_tb = "Traceback...\ntorch.distributed.DistBackendError: NCCL error in: ...\n"
    stopped = _failure(1, "exited with code 3", t=20.0)
    failures = {
        0: _failure(0, gloo, t=10.0),
        1: stopped,
        2: _failure(2, peer, t=11.0),
        3: _failure(3, "DistBackendError", t=12.0, traceback=nccl_tb),
    }
    result = Result(exit_codes=dict.fromkeys(failures, 1), failures=failures)
    assert [f.waited_on_peer for f in failures.values()] == [True, False, True, True]
    assert result.root_cause is stopped
    text = result.describe()
    assert text.startswith("rank 1 stopped, others then failed waiting for it (4 of 4 ranks")
    assert "rank 0 (pid 100) exited with code 1, 10.000 s earlier: RuntimeError: [gloo]" in text
    assert "(waiting for a peer: a victim, not the cause)" in text
    # Every failure a victim: the earliest by timestamp, as before.
    victims = {r: f for r, f in failures.items() if r != 1}
    assert Result(exit_codes={0: 1, 2: 1, 3: 1}, failures=victims).root_cause is victims[0]
    # Ties still go to the lower rank.
    tie = {5: _failure(5, "exited with code 1", 1.0), 4: _failure(4, "exited with code 1", 1.0)}
    assert Result(exit_codes={4: 1, 5: 1}, failures=tie).root_cause is tie[4]


async def _exited(pid: int) -> None:
    """Return once process ``pid`` (a rank, held unreaped by its group) has exited."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")
async def test_root_cause_is_the_rank_that_stopped_not_its_timed_out_peer(
    tmp_path: Path,
) -> None:
    """Real ranks: rank 1 exits 3; rank 0 then fails with gloo's "Timed out waiting ... for
    send operation", its error file dated *earlier*: rank 1 is still the root cause."""
    fifo = tmp_path / "collective"
    os.mkfifo(fifo)
    async with asyncio.timeout(20):
        async with corral.spawn(
            [sys.executable, str(CHILDREN / "stack_peer.py"), str(fifo)],
            nprocs=2,
            redirects="all",
            log_dir=tmp_path / "logs",
            grace=5,
        ) as group:
            # Both fail on their own, before anything makes the group close.
            await asyncio.gather(*(_exited(pid) for pid in group.pids.values()))
            # The group's own pidfd callbacks ran in the loop turn that woke this task.
            assert group.poll() is not None
            result = await group.wait()
    assert result.exit_codes == {0: 1, 1: 3}
    assert set(result.failures) == {0, 1}
    victim = result.failures[0]
    assert victim.waited_on_peer
    assert victim.timestamp < result.failures[1].timestamp  # earliest, and still not the cause
    assert result.root_cause is result.failures[1]
    with pytest.raises(corral.GroupFailedError, match="rank 1 stopped"):
        result.raise_for_failure()


# -- stack dumps ------------------------------------------------------------------------


@pytest.mark.parametrize("use_py_spy", MECHANISMS, indirect=True)
async def test_dump_stacks_shows_where_each_live_rank_is(use_py_spy: bool, tmp_path: Path) -> None:
    """group.dump_stacks(): each live rank's stack, in stacks.txt too; the ranks run on."""
    console, _out, err = watched_console()
    async with asyncio.timeout(20):
        async with spawn_on(
            stack_fns.blocked_in_collective,
            nprocs=2,
            tee="all",
            log_dir=tmp_path,
            console=console,
            grace=5,
        ) as group:
            await _out.wait_for(b"ready\n", count=2)
            texts = await group.dump_stacks()
            assert group.poll() is None  # dumping did not end them
            result = await group.close()
    assert set(texts) == {0, 1}
    for rank, text in texts.items():
        assert "blocked_in_collective" in text, text
        assert (tmp_path / str(rank) / "stacks.txt").read_text() == text
    assert result.stacks == {r: tmp_path / str(r) / "stacks.txt" for r in (0, 1)}
    assert result.terminated == {0, 1}
    if not use_py_spy:  # faulthandler writes to the rank's stderr: the console shows it too
        assert b"in blocked_in_collective" in err.getvalue()


@pytest.mark.parametrize("use_py_spy", MECHANISMS, indirect=True)
async def test_failure_records_what_the_other_ranks_were_doing(
    use_py_spy: bool, tmp_path: Path
) -> None:
    """With stacks_on_close, a failure dumps the still-running ranks before signalling them;
    Result.describe() (GroupFailedError's text, the CLI's summary) shows the dumps."""
    console, out, _err = watched_console()
    async with asyncio.timeout(20):
        async with spawn_on(
            stack_fns.blocked_in_collective,
            nprocs=3,
            tee="all",
            log_dir=tmp_path,
            console=console,
            grace=5,
        ) as group:
            group.stacks_on_close = True
            await out.wait_for(b"ready\n", count=3)
            group.send_signal(signal.SIGUSR1, ranks=[1])
            result = await group.wait()
    root = result.root_cause
    assert root is not None
    assert (root.rank, root.signal) == (1, "SIGUSR1")
    assert result.terminated == {0, 2}
    assert set(result.stacks) == {0, 2}
    text = result.describe()
    assert "what the ranks still running were doing when corral stopped them:" in text
    for rank in (0, 2):
        assert f"  rank {rank} ({tmp_path / str(rank) / 'stacks.txt'}):" in text
    assert text.count("blocked_in_collective") >= 2, text


async def test_capture_is_bounded_and_leaves_no_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A py-spy that never answers is killed at the deadline; the capture returns, empty."""
    started = tmp_path / "started"
    fake = tmp_path / "py-spy"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"open({str(started)!r}, 'a').close()\n"
        "time.sleep(60)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(_stacks, "py_spy", lambda: str(fake))
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = _stacks.Target(
            rank=0, pid=rank.pid, callable=False, stderr_log=None, out=tmp_path / "stacks.txt"
        )
        async with asyncio.timeout(10):
            texts = await _stacks.capture([target], 0.5)
    finally:
        rank.kill()
        rank.wait()
    assert texts == {}
    assert started.exists()  # it did run, and the leftover check proves it was reaped
    assert not (tmp_path / "stacks.txt").exists()


# -- the command line ---------------------------------------------------------------------

HANG = (
    "import os, sys, time\n"
    "fifos = sys.argv[1]\n"
    "def wait_for_peer():\n"
    "    with open(os.path.join(fifos, os.environ['RANK']), 'wb'):\n"
    "        pass\n"
    "    time.sleep(60)\n"
    "if os.environ['RANK'] == '1':\n"
    "    for peer in ('0', '2'):  # returns once that rank is in wait_for_peer\n"
    "        with open(os.path.join(fifos, peer), 'rb'):\n"
    "            pass\n"
    "    sys.exit(3)\n"
    "wait_for_peer()\n"
)


@needs_py_spy
def test_cli_summary_says_what_each_running_rank_was_doing(tmp_path: Path) -> None:
    """`corral run` with a rank that stops while the others wait: the summary shows their
    stacks (py-spy, any Python command), cut, with the path of each full dump."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(Path(corral.__file__).parent.parent)
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    for rank in ("0", "2"):
        os.mkfifo(fifos / rank)
    logs = tmp_path / "logs"
    res = subprocess.run(
        [
            *(sys.executable, "-m", "corral", "run", "-n", "3", "--log-dir", str(logs)),
            *("--", sys.executable, "-c", HANG, str(fifos)),
        ],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert res.returncode == 3, res.stderr
    err = res.stderr
    assert "corral: rank 1 failed: exited with code 3" in err
    assert "what the ranks still running were doing when corral stopped them:" in err
    for live in (0, 2):
        stacks = logs / str(live) / "stacks.txt"
        assert f"  rank {live} ({stacks}):" in err
        assert "wait_for_peer" in stacks.read_text()
    assert err.index("what the ranks still running") < err.index("corral: exit status 3")


@needs_py_spy
def test_cli_ctrl_c_summary_says_where_each_rank_was(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) to `corral run`: before the ranks are signalled, their stacks are
    dumped, and the summary shows them under "stopped by SIGINT" (issue 11, item 4)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(Path(corral.__file__).parent.parent)
    step = "import time\ndef train_step():\n    print('ready', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "corral", "run", "-n", "2", "--log-dir", str(tmp_path)),
            *("--", sys.executable, "-c", step + "train_step()\n"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready = [proc.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["[0]: ready\n", "[1]: ready\n"]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "corral: stopped by SIGINT" in err
    assert "what the ranks still running were doing when corral stopped them:" in err
    for rank in (0, 1):
        assert f"  rank {rank} ({tmp_path / str(rank) / 'stacks.txt'}):" in err
    assert err.count("train_step (<string>:4)") == 2, err
