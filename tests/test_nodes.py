"""Multi-node groups on torch's c10d rendezvous: "nodes" are corral processes on 127.0.0.1.

Each test starts two ``corral run --nnodes 2`` processes on a fresh endpoint
and looks at what a person sees on each: exit status, summary, logs. Ranks
synchronise with the test through files in ``tmp_path`` (a rank "fails once"
by leaving a marker). Skipped without torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import corral
from corral import ConfigError, Rendezvous
from corral._config import free_port

from .cli_helpers import PY, Lines, corral_env

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)

CLI = (PY, "-m", "corral", "run")
ALLREDUCE = str(Path(__file__).parent / "children" / "cli_allreduce.py")

#: Print "up RANK attempt K", then: exit CODE when RANK is the failing rank, else
#: sleep (outside any collective: only corral can end it). With ONCE, every rank
#: of a restarted attempt exits 0.
RANK = (
    "import os, sys, time, pathlib\n"
    "rank = os.environ['RANK']\n"
    "print('up', rank, 'attempt', os.environ['TORCHELASTIC_RESTART_COUNT'], flush=True)\n"
    "fail, code, once, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', sys.argv[4]\n"
    "again = os.environ['TORCHELASTIC_RESTART_COUNT'] != '0'\n"
    "if once and again:\n"
    "    sys.exit(0)\n"
    "if rank == fail:\n"
    "    time.sleep(0.5); sys.exit(code)\n"
    "time.sleep(600)\n"
)


@dataclass
class Nodes:
    """The corral processes of one job, their output collected as it comes."""

    lines: list[Lines]

    def finish(self, timeout: float = 120) -> list[tuple[int, str, str]]:
        return [(x.finish(timeout), "".join(x.out), "".join(x.err)) for x in self.lines]

    def kill(self) -> None:
        for x in self.lines:
            if x.proc.poll() is None:
                x.proc.kill()
                x.finish()

    def wait_up(self, per_node: int) -> None:
        """Until every rank of every node said "up" (the ranks' handshake)."""
        for x in self.lines:

            def up(x: Lines = x) -> bool:
                return sum(line.startswith("[") and " up " in line for line in x.out) >= per_node

            x.wait_for(up, timeout=60)


def nodes(tmp_path: Path, *args: str, n: int = 2, sub: str = "run") -> Nodes:
    """Start ``n`` corral nodes of one job on a fresh endpoint; ARGS after ``run``."""
    endpoint = f"127.0.0.1:{free_port()}"
    started = []
    for k in range(n):
        cmd = [PY, "-m", "corral", sub, "--nnodes", str(n), "--rdzv-endpoint", endpoint]
        cmd += ["--rdzv-id", "test", "--log-dir", str(tmp_path / f"node{k}"), *args]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=corral_env(),
        )
        started.append(Lines(proc))
    return Nodes(started)


def rank_cmd(tmp_path: Path, fail: int, code: int, *, once: bool = False) -> list[str]:
    return ["--", PY, "-c", RANK, str(fail), str(code), "1" if once else "0", str(tmp_path)]


@pytest.mark.parametrize("sub", ["run", "torchrun"])
def test_two_nodes_all_reduce(tmp_path: Path, sub: str) -> None:
    """2 nodes x 2 ranks: an unchanged gloo script sees RANK 0..3 of WORLD_SIZE 4."""
    if sub == "run":
        job = nodes(tmp_path, "-n", "2", "--", PY, ALLREDUCE)
    else:
        job = nodes(tmp_path, "--nproc-per-node", "2", ALLREDUCE, sub="torchrun")
    try:
        ends = job.finish()
    finally:
        job.kill()
    assert [code for code, _, _ in ends] == [0, 0], ends
    lines = "".join(out for _, out, _ in ends)
    assert sorted(re.findall(r"rank (\d)/4 sum=10", lines)) == ["0", "1", "2", "3"], lines


def test_a_failure_on_one_node_ends_every_node(tmp_path: Path) -> None:
    """Global rank 3 exits 7 while the others sleep: both nodes end, both name rank 3, exit 7."""
    job = nodes(tmp_path, "-n", "2", "--grace", "5", *rank_cmd(tmp_path, 3, 7))
    try:
        ends = job.finish()
    finally:
        job.kill()
    assert [code for code, _, _ in ends] == [7, 7], ends
    for _, _, err in ends:
        assert re.search(r"rank 3 \(node \d on .+, local rank 1\)", err), err
        assert "exited with code 7" in err
    # The node of rank 3 reports it as its own; the other as a remote failure.
    assert sum("failed on another node" in err for _, _, err in ends) == 1


def test_a_restart_restarts_every_node(tmp_path: Path) -> None:
    """Rank 3 fails once: the world restarts (both nodes, attempt 1), then succeeds."""
    args = ["-n", "2", "--max-restarts", "1", "--restart-backoff", "0"]
    job = nodes(tmp_path, *args, *rank_cmd(tmp_path, 3, 7, once=True))
    try:
        ends = job.finish()
    finally:
        job.kill()
    assert [code for code, _, _ in ends] == [0, 0], ends
    for k, (_, out, err) in enumerate(ends):
        assert "restart 1 of 1" in err, err
        assert re.search(r"up \d attempt 1", out), out
        attempt1 = tmp_path / f"node{k}" / "attempt-1"
        assert sorted(os.listdir(attempt1)) == ["0", "1"]
        assert "attempt 0" in (tmp_path / f"node{k}" / "0" / "stdout.log").read_text()


def test_restarts_exhausted_on_every_node(tmp_path: Path) -> None:
    """Rank 0 always exits 5, one restart: both nodes give up after attempt 1, exit 5."""
    args = ["-n", "2", "--max-restarts", "1", "--restart-backoff", "0", "--grace", "5"]
    job = nodes(tmp_path, *args, *rank_cmd(tmp_path, 0, 5))
    try:
        ends = job.finish()
    finally:
        job.kill()
    assert [code for code, _, _ in ends] == [5, 5], ends
    for _, _, err in ends:
        assert "attempt 1 (after 1 restart(s)); earlier:" in err, err


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_one_nodes_corral_ends_the_other(tmp_path: Path, victim: int) -> None:
    """SIGKILL one corral (the store's host or not): its ranks die with it, the other node
    ends its own ranks and exits 1, naming the lost node (or the lost store)."""
    job = nodes(tmp_path, "-n", "2", "--grace", "5", *rank_cmd(tmp_path, -1, 0))
    try:
        job.wait_up(2)
        job.lines[victim].proc.send_signal(signal.SIGKILL)
        ends = job.finish(timeout=60)
    finally:
        job.kill()
    other = ends[1 - victim]
    assert ends[victim][0] == -signal.SIGKILL
    assert other[0] == 1, other
    assert re.search(
        r"node \d.*ended: its corral ended without a word|lost the rendezvous", other[2]
    )


def test_sigterm_to_one_node_stops_the_world(tmp_path: Path) -> None:
    """SIGTERM to one corral: it exits 143; the other closes its ranks, says why, exits 1;
    nobody restarts."""
    args = ["-n", "2", "--grace", "5", "--max-restarts", "3"]
    job = nodes(tmp_path, *args, *rank_cmd(tmp_path, -1, 0))
    try:
        job.wait_up(2)
        job.lines[0].proc.send_signal(signal.SIGTERM)
        ends = job.finish(timeout=60)
    finally:
        job.kill()
    assert ends[0][0] == 128 + signal.SIGTERM, ends[0]
    assert ends[1][0] == 1, ends[1]
    assert "was stopped" in ends[1][2] or "it was stopped" in ends[1][2], ends[1][2]
    assert not (tmp_path / "node1" / "attempt-1").exists()


def test_a_node_that_never_arrives(tmp_path: Path) -> None:
    """One node of two, join timeout 3 s: a clear error, exit 2 or 1, nothing left behind."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-conf", "join_timeout=3"]
    res = subprocess.run(
        [*CLI, *args, "--", PY, "-c", "print('never')"],
        capture_output=True,
        text=True,
        env=corral_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0
    assert "never" not in res.stdout
    assert "rendezvous" in res.stderr, res.stderr
    assert "failed" in res.stderr


def test_bad_rendezvous_input() -> None:
    """Bad multi-node input is a ConfigError (library) or a one-line exit 2 (CLI)."""
    for kwargs in (
        {"endpoint": "h:0"},
        {"endpoint": "h:1", "nnodes": "3:2"},
        {"endpoint": "h:1", "backend": "etcd-v9"},
        {"endpoint": "h:1", "backend": "static", "nnodes": 2},
        {"endpoint": "h:1", "node_rank": 1},
        {"endpoint": ""},
    ):
        with pytest.raises(ConfigError):
            Rendezvous(**kwargs)
    with pytest.raises(ConfigError, match="rendezvous"):
        corral.spawn(PY, nprocs=1, rendezvous="h:1")  # type: ignore[arg-type]
    res = subprocess.run(
        [PY, "-m", "corral", "run", "--nnodes", "2", "--", PY, "-c", "pass"],
        capture_output=True,
        text=True,
        env=corral_env(),
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    assert "--rdzv-endpoint" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


async def test_a_cancelled_join_leaves_no_thread(tmp_path: Path) -> None:
    """The library, one node of two: cancelling the join closes the rendezvous, awaits its
    thread, starts nothing and creates no log beyond the (empty) rank folders."""
    import asyncio
    import threading

    before = threading.active_count()
    rdzv = Rendezvous(endpoint=f"127.0.0.1:{free_port()}", run_id="cancel", nnodes=2)
    group = corral.spawn(PY, nprocs=1, log_dir=tmp_path / "logs", rendezvous=rdzv)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):  # the other node never comes
            async with group:
                pytest.fail("the group started without its other node")
    assert group.pids == {}
    assert threading.active_count() == before
    assert sorted(os.listdir(tmp_path / "logs" / "0")) == []


async def test_closing_a_node_whose_ranks_are_done_ends_at_once(tmp_path: Path) -> None:
    """The library, two nodes in one process: node 0's ranks succeed while node 1's run
    on; closing node 0 once it told the world it is done returns at once (it does not
    wait for node 1's ranks) and node 1 is stopped by it."""
    import asyncio

    endpoint = f"127.0.0.1:{free_port()}"
    # Node 0's rank ends once the test says so (its FIFO), after the hook below is in:
    # ended sooner, under load, node 0 could tell the world before the test listens.
    go = tmp_path / "go.fifo"
    os.mkfifo(go)
    code = (
        "import os, sys, time\n"
        "if os.environ['GROUP_RANK'] == '1': time.sleep(600)\n"
        "else: open(sys.argv[1]).read()"
    )
    groups = [
        corral.spawn(
            [PY, "-c", code, str(go)],
            nprocs=1,
            log_dir=tmp_path / f"node{k}",
            rendezvous=Rendezvous(endpoint=endpoint, run_id="close", nnodes=2),
            grace=5,
        )
        for k in range(2)
    ]
    async with asyncio.timeout(90):
        await asyncio.gather(*(g.start() for g in groups))
        groups.sort(key=lambda g: g.world.node if g.world else -1)  # c10d numbers the nodes
        published = asyncio.Event()
        node = groups[0]._node
        assert node is not None
        told = node.publish

        async def publish(result: corral.Result, *, closed: bool) -> None:
            await told(result, closed=closed)
            published.set()  # node 0 told the world it is done; node 1 runs on

        node.publish = publish  # type: ignore[method-assign]
        try:
            await asyncio.to_thread(go.write_text, "")  # node 0's rank ends now
            await published.wait()
            first = await groups[0].close()
            second = await groups[1].wait()
        finally:
            for g in groups:
                await g.close(grace=0)
    assert first.ok
    assert second.terminated == {0}
    assert second.world_failure is not None
    assert "stopped" in second.world_failure.message
