"""The ``corral run`` command line, run the way a person runs it.

Most tests start ``python -m corral run ...`` as a subprocess and look only at
what a person sees: the exit status, stdout, stderr, the log files, and which
processes are left (none: the autouse fixture also scans for the group's
``CORRAL_GROUP`` marker). A few call ``main([...])`` in-process.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from corral import Failure, RankLogs, Result
from corral._cli import exit_status, main, render_summary
from corral._cli_args import parse_ranks
from corral._config import OMP_NOTE

from .cli_helpers import PY, Lines, code, corral, corral_env, run_on_pty

if TYPE_CHECKING:
    from collections.abc import Sequence


CHILDREN = Path(__file__).parent / "children"
READY = str(CHILDREN / "cli_ready.py")
LOG_LINE = re.compile(r"^corral: logs in (.+)$", re.MULTILINE)

# conftest's no_leftover_processes covers this module too: every corral
# subprocess inherits its per-session marker, so groups started by a `corral`
# process that has exited are still found by the marker scan.


def log_dir_of(stderr: str) -> Path:
    """The log folder corral printed at the end."""
    found = LOG_LINE.findall(stderr)
    assert found, stderr
    return Path(found[-1])


def start_corral(*args: str, env: dict[str, str] | None = None) -> Lines:
    proc = subprocess.Popen(
        [PY, "-m", "corral", "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else corral_env(),
    )
    return Lines(proc)


def ready_pids(lines: Sequence[str]) -> list[int]:
    """Every pid the ranks printed on their ``ready`` lines."""
    return [int(p) for line in lines if "ready" in line for p in line.split("ready", 1)[1].split()]


def assert_gone(pids: Sequence[int]) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid), f"pid {pid} is still there"


# -- output ---------------------------------------------------------------------------


def test_default_tee_of_three_ranks(tmp_path: Path) -> None:
    """By default every line of every rank is shown with its rank prefix and kept in its logs."""
    rank_code = (
        "import os, sys; r = os.environ['RANK']; "
        "print('out of', r, 'world', os.environ['WORLD_SIZE']); "
        "print('err of', r, file=sys.stderr); sys.stdout.write('no newline ' + r)"
    )
    res = corral("-n", "3", "--log-dir", str(tmp_path / "logs"), "--", *code(rank_code))
    assert res.returncode == 0, res.stderr
    for r in range(3):
        assert f"[{r}]: out of {r} world 3\n" in res.stdout
        assert f"[{r}]: no newline {r}\n" in res.stdout
        assert f"[{r}]: err of {r}\n" in res.stderr
        logs = tmp_path / "logs" / str(r)
        assert (logs / "stdout.log").read_text() == f"out of {r} world 3\nno newline {r}"
        assert (logs / "stderr.log").read_text() == f"err of {r}\n"
    assert len(res.stdout.splitlines()) == 6
    # On success corral adds only torchrun's OMP_NUM_THREADS note and where the logs are.
    assert [x for x in res.stderr.splitlines() if x.startswith("corral:")] == [
        f"corral: {OMP_NOTE}",
        f"corral: logs in {tmp_path / 'logs'}",
    ]


def test_log_dir_printed_when_not_given() -> None:
    """Without --log-dir the logs go to a fresh folder whose path is printed at the end."""
    res = corral("-n", "2", "--", *code("print('hi')"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.rstrip("\n").splitlines()[-1].startswith("corral: logs in ")
    logs = log_dir_of(res.stderr)
    assert (logs / "1" / "stdout.log").read_text() == "hi\n"


def test_rank_placeholder_env_and_master_defaults(tmp_path: Path) -> None:
    """{rank} is replaced in the program and its args; --env reaches every rank; MASTER_* set."""
    for r in range(2):
        (tmp_path / f"py{r}").symlink_to(PY)
    show = (
        "import os, sys; e = os.environ; "
        "print(os.path.basename(sys.executable), sys.argv[1:], e['FOO'], e['SEED'], "
        "e['RANK'], e['LOCAL_RANK'], e['WORLD_SIZE'], e['LOCAL_WORLD_SIZE'], "
        "e['MASTER_ADDR'], e['MASTER_PORT'])"
    )
    res = corral(
        "-n",
        "2",
        "--env",
        "FOO=bar=baz",
        "--env",
        "SEED=4{rank}",
        "--",
        str(tmp_path / "py{rank}"),
        "-c",
        show,
        "arg-{rank}",
        "{json: {rank}}",
    )
    assert res.returncode == 0, res.stderr
    ports = set()
    for r in range(2):
        line = next(x for x in res.stdout.splitlines() if x.startswith(f"[{r}]: "))
        fields = line.split("] ", 1)[1].split()
        assert line.startswith(
            f"[{r}]: py{r} ['arg-{r}', '{{json: {r}}}'] bar=baz 4{r} {r} {r} 2 2 "
        )
        assert fields[-2] == "127.0.0.1"
        ports.add(int(fields[-1]))
    assert len(ports) == 1  # one port for the whole group
    assert 0 < ports.pop() < 65536


def test_master_port_kept_when_already_set() -> None:
    """MASTER_ADDR/MASTER_PORT already in the environment or given by --env are not replaced."""
    show = "import os; print(os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])"
    res = corral("--", *code(show), env=corral_env(MASTER_ADDR="10.1.2.3", MASTER_PORT="4242"))
    assert res.stdout == "[0]: 10.1.2.3 4242\n", res.stderr
    res = corral("--env", "MASTER_PORT=1234", "--", *code(show))
    assert res.stdout == "[0]: 127.0.0.1 1234\n", res.stderr


def test_tee_ranks_shows_only_chosen_ranks(tmp_path: Path) -> None:
    """--tee-ranks 0,2-3 shows ranks 0, 2 and 3 on the console; rank 1 only writes its files."""
    show = "import os, sys; print('line', os.environ['RANK']); print('e', file=sys.stderr)"
    res = corral("-n", "4", "--tee-ranks", "0,2-3", "--log-dir", str(tmp_path), "--", *code(show))
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["[0]: line 0", "[2]: line 2", "[3]: line 3"]
    assert "[1]" not in res.stderr
    assert (tmp_path / "1" / "stdout.log").read_text() == "line 1\n"
    assert (tmp_path / "1" / "stderr.log").read_text() == "e\n"


def test_tee_and_redirects_specs(tmp_path: Path) -> None:
    """--tee 0:out shows only rank 0's stdout; --redirects all still records every stream."""
    show = "import os, sys; print('o', os.environ['RANK']); print('e', file=sys.stderr)"
    res = corral(
        "-n", "2", "--tee", "0:out", "--redirects", "all", "--log-dir", str(tmp_path), "--",
        *code(show),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "[0]: o 0\n"
    assert all(x.startswith("corral: ") for x in res.stderr.splitlines()), res.stderr
    assert (tmp_path / "1" / "stdout.log").read_text() == "o 1\n"
    assert (tmp_path / "0" / "stderr.log").read_text() == "e\n"


def test_custom_prefix() -> None:
    """--prefix takes {rank} and {stream}."""
    show = "import sys; print('x'); print('y', file=sys.stderr)"
    res = corral("--prefix", "{rank}/{stream}| ", "--", *code(show))
    assert res.stdout == "0/out| x\n"
    assert res.stderr.startswith("0/err| y\n")


# -- failures -------------------------------------------------------------------------


def test_rank_exiting_7_gives_7_and_a_summary(tmp_path: Path) -> None:
    """A rank exiting 7: status 7; the summary names rank, pid, code, stderr tail, log files."""
    fail = (
        "import os, sys, time\n"
        "print('pid', os.readlink('/proc/self'), flush=True)  # the pid outside a namespace\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('something went wrong on rank 1', file=sys.stderr)\n"
        "    sys.exit(7)\n"
        "time.sleep(60)\n"
    )
    res = corral("-n", "3", "--log-dir", str(tmp_path), "--grace", "5", "--", *code(fail))
    assert res.returncode == 7, res.stderr
    pid = int(re.findall(r"^\[1\]: pid (\d+)$", res.stdout, re.MULTILINE)[0])
    summary = res.stderr[res.stderr.index("corral: rank 1 failed: exited with code 7") :]
    assert f"root cause: rank 1 (pid {pid}) exited with code 7" in summary
    assert "last lines of stderr.log:\n    something went wrong on rank 1\n" in summary
    assert f"stderr: {tmp_path / '1' / 'stderr.log'}" in summary
    assert f"stdout: {tmp_path / '1' / 'stdout.log'}" in summary
    # The others are listed as terminated, after the root cause.
    assert summary.index("terminated by corral") > summary.index("something went wrong")
    assert re.search(r"rank 0 \(pid \d+\) was killed by SIGTERM", summary)
    assert re.search(r"rank 2 \(pid \d+\) was killed by SIGTERM", summary)
    assert summary.rstrip().endswith("corral: exit status 7")


def test_rank_killed_by_sigabrt_gives_134() -> None:
    """A rank killed by SIGABRT: status 134 (128+6) and the summary names SIGABRT."""
    abort = (
        "import os, resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
        "if os.environ['RANK'] == '0':\n"
        "    print('aborting now', file=sys.stderr, flush=True)\n"
        "    os.abort()\n"
        "time.sleep(60)\n"
    )
    res = corral("-n", "2", "--", *code(abort))
    assert res.returncode == 134, res.stderr
    assert re.search(r"rank 0 \(pid \d+\) was killed by SIGABRT \(exitcode -6\)", res.stderr)
    assert "last lines of stderr.log:\n    aborting now\n" in res.stderr
    assert "corral: exit status 134" in res.stderr
    assert "corral: logs in " in res.stderr


def test_summary_falls_back_to_stdout() -> None:
    """A rank that explains itself only on stdout: the summary shows its last stdout lines."""
    res = corral("--", *code("print('config file not found'); raise SystemExit(3)"))
    assert res.returncode == 3
    assert "last lines of stdout.log:\n    config file not found\n" in res.stderr


def test_missing_program_is_a_rank_failure_127() -> None:
    """A program that does not exist fails its ranks with 127, explained, not a crash."""
    res = corral("-n", "2", "--", "/nonexistent/corral-test-program")
    assert res.returncode == 127
    assert "rank 0 (never started) could not start (exitcode 127)" in res.stderr
    assert "/nonexistent/corral-test-program" in res.stderr


def test_recorded_exception_message_in_summary() -> None:
    """A rank using @corral.record: the summary shows the exception as the message."""
    src = (
        "import corral\n"
        "@corral.record\n"
        "def main():\n"
        "    raise ValueError('learning rate must be positive')\n"
        "main()\n"
    )
    res = corral("--", *code(src))
    assert res.returncode == 1
    assert "corral: rank 0 failed: ValueError: learning rate must be positive" in res.stderr
    assert "error file: " in res.stderr


# -- colour ---------------------------------------------------------------------------


SHOW_RANK = "import os; print('rank', os.environ['RANK'])"


def test_colours_on_a_terminal() -> None:
    """On a terminal each rank's prefix has its own colour."""
    rc, seen = run_on_pty(["-n", "3", "--", *code(SHOW_RANK)], corral_env())
    assert rc == 0, seen
    colours = dict(re.findall(rb"\x1b\[([0-9;]+)m\[(\d)\]: \x1b\[0mrank", seen))
    assert len(colours) == 3, seen
    assert len(set(colours.values())) == 3  # code -> rank: three different codes
    assert seen.count(b"\x1b[0mrank") == 3


def test_no_colour_with_no_color_or_when_piped() -> None:
    """NO_COLOR on a terminal, or output to a pipe: not one escape code."""
    rc, seen = run_on_pty(["-n", "2", "--", *code(SHOW_RANK)], corral_env(NO_COLOR="1"))
    assert rc == 0
    assert b"\x1b" not in seen
    assert b"[1]: rank 1" in seen
    res = corral("-n", "2", "--", *code(SHOW_RANK))
    assert res.returncode == 0
    assert "\x1b" not in res.stdout + res.stderr
    assert "[0]: rank 0\n" in res.stdout


# -- signals --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_closes_group_and_leaves_nothing(sig: signal.Signals) -> None:
    """SIGINT/SIGTERM/SIGHUP to corral: forwarded to the ranks, all closed; status 128+N."""
    lines = start_corral("-n", "2", "--", PY, "-u", READY, "--grandchild")
    lines.wait_for(lambda: sum("ready" in x for x in lines.out) == 2)
    pids = ready_pids(lines.out)
    assert len(pids) == 4
    lines.proc.send_signal(sig)
    rc = lines.finish()
    assert rc == 128 + sig, lines.err
    err = "".join(lines.err)
    assert f"corral: received {sig.name}" in err
    assert f"corral: stopped by {sig.name}" in err
    assert re.search(rf"rank 0 \(pid \d+\) was killed by {sig.name}", err)
    assert f"corral: exit status {128 + sig}" in err
    assert_gone(pids)


def test_second_sigint_skips_the_grace_period() -> None:
    """A rank ignoring SIGINT with --grace 600: the second SIGINT SIGKILLs it at once."""
    lines = start_corral("-n", "2", "--grace", "600", "--", PY, "-u", READY, "--ignore-int")
    lines.wait_for(lambda: sum("ready" in x for x in lines.out) == 2)
    pids = ready_pids(lines.out)
    lines.proc.send_signal(signal.SIGINT)
    lines.wait_for(lambda: any("received SIGINT:" in x for x in lines.err))
    # The ranks ignore SIGINT, so they are still there while the grace period runs.
    assert all(psutil.pid_exists(p) for p in pids)
    lines.proc.send_signal(signal.SIGINT)
    rc = lines.finish(timeout=30)  # far less than the 600 s grace
    assert rc == 130, lines.err
    err = "".join(lines.err)
    assert "received SIGINT again" in err
    assert re.search(r"rank 1 \(pid \d+\) was killed by SIGKILL", err)
    assert_gone(pids)


# -- torch ----------------------------------------------------------------------------


def test_torch_gloo_all_reduce_runs_unchanged() -> None:
    """A 3-rank gloo all-reduce with init_process_group() defaults works under corral run."""
    # find_spec, not importorskip: importing torch here would load it into the test
    # process, and test_record checks that reading torch's error format needs no torch.
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install torch==2.13.0)")
    res = corral("-n", "3", "--", PY, str(CHILDREN / "cli_allreduce.py"), timeout=120)
    assert res.returncode == 0, res.stderr
    for r in range(3):
        assert f"[{r}]: rank {r}/3 sum=6\n" in res.stdout


# -- bad usage ------------------------------------------------------------------------

BAD_USAGE = [
    pytest.param([], id="no-subcommand"),
    pytest.param(["frobnicate"], id="unknown-subcommand"),
    pytest.param(["run"], id="no-command"),
    pytest.param(["run", "-n", "2"], id="no-command-after-options"),
    pytest.param(["run", "-n", "2", "--"], id="nothing-after-dashes"),
    pytest.param(["run", "-n", "0", "--", "{cmd}"], id="n-zero"),
    pytest.param(["run", "-n", "two", "--", "{cmd}"], id="n-not-a-number"),
    pytest.param(["run", "--tee", "bogus", "--", "{cmd}"], id="bad-tee"),
    pytest.param(["run", "--tee", "0:out,0:err", "--", "{cmd}"], id="repeated-rank-in-tee"),
    pytest.param(["run", "-n", "2", "--tee", "5:all", "--", "{cmd}"], id="tee-rank-out-of-range"),
    pytest.param(["run", "--redirects", "0:x", "--", "{cmd}"], id="bad-redirects"),
    pytest.param(["run", "--env", "NOEQUALS", "--", "{cmd}"], id="env-without-equals"),
    pytest.param(["run", "--env", "=value", "--", "{cmd}"], id="env-without-key"),
    pytest.param(["run", "--tee-ranks", "1-", "--", "{cmd}"], id="tee-ranks-open-range"),
    pytest.param(["run", "--tee-ranks", "3-1", "--", "{cmd}"], id="tee-ranks-backwards"),
    pytest.param(["run", "--tee-ranks", "0,,1", "--", "{cmd}"], id="tee-ranks-empty-item"),
    pytest.param(["run", "-n", "2", "--tee-ranks", "0,5", "--", "{cmd}"], id="tee-ranks-range"),
    pytest.param(["run", "--grace", "-1", "--", "{cmd}"], id="negative-grace"),
    pytest.param(["run", "--prefix", "{host}", "--", "{cmd}"], id="bad-prefix-field"),
    pytest.param(["run", "--bogus", "--", "{cmd}"], id="unknown-option"),
    pytest.param(["run", "-n", "2", "extra", "--", "{cmd}"], id="stray-argument"),
]


@pytest.mark.parametrize("args", BAD_USAGE)
def test_bad_usage_exits_2_and_starts_nothing(args: list[str], tmp_path: Path) -> None:
    """Bad usage: status 2, exactly one line on stderr, nothing started, nothing created."""
    marker = tmp_path / "started"
    cmd = f"open({str(marker)!r}, 'w').close()"
    argv = [a for x in args for a in ([PY, "-c", cmd] if x == "{cmd}" else [x])]
    res = subprocess.run(
        [PY, "-m", "corral", *argv],
        capture_output=True,
        text=True,
        env=corral_env(TMPDIR=str(tmp_path)),
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert res.stderr.endswith("\n")
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "error" in res.stderr
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []  # not even a temporary log folder


def test_existing_rank_folder_is_refused(tmp_path: Path) -> None:
    """An existing rank folder in --log-dir: status 2, one line, its contents untouched."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "stdout.log").write_text("precious\n")
    marker = tmp_path / "started"
    res = corral("-n", "2", "--log-dir", str(tmp_path), "--", *code(f"open({str(marker)!r}, 'w')"))
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "already holds rank folder(s) 1" in res.stderr
    assert f"put {{run}} in it ({str(tmp_path / 'run-{run}')!r})" in res.stderr
    assert (tmp_path / "1" / "stdout.log").read_text() == "precious\n"
    assert not (tmp_path / "0").exists()
    assert not marker.exists()


def test_help_explains_every_option_with_an_example() -> None:
    """``corral run --help`` lists every option, each with an example."""
    res = subprocess.run(
        [PY, "-m", "corral", "run", "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for option in ("--nprocs", "--log-dir", "--redirects", "--tee ", "--tee-ranks", "--prefix"):
        assert option in text
    for example in (
        "e.g. -n 8",
        "e.g. --log-dir",
        "e.g. --redirects all",
        "e.g. --tee err",
        "--tee-ranks 0,2-5",
        "e.g. --prefix",
        "e.g. --grace 5",
        "e.g. --env OMP_NUM_THREADS=1",
        "e.g. -- python train.py",
    ):
        assert example in text, example


# -- in-process ------------------------------------------------------------------------


def test_main_in_process(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """main([...]) runs a group in-process and returns the exit status."""
    src = "import os, sys; print('hi', os.environ['RANK']); sys.exit(int(os.environ['RANK']) * 3)"
    status = main(["run", "-n", "2", "--log-dir", str(tmp_path), "--", *code(src)])
    out, err = capfd.readouterr()
    assert status == 3
    assert "[1]: hi 1\n" in out  # rank 0 may be closed before it prints
    assert "root cause: rank 1" in err
    assert main(["run", "--", *code("pass")]) == 0
    assert main(["run", "-n", "0", "--", "x"]) == 2
    out, err = capfd.readouterr()
    assert "-n/--nprocs: must be at least 1, got 0" in err


def test_python_dash_m_corral_version() -> None:
    """``python -m corral --version`` prints the version."""
    res = subprocess.run(
        [PY, "-m", "corral", "--version"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0
    assert res.stdout.startswith("corral ")


def _failure(rank: int, exitcode: int, signame: str | None = None, t: float = 1.0) -> Failure:
    return Failure(
        rank=rank,
        pid=100 + rank,
        exitcode=exitcode,
        signal=signame,
        timestamp=t,
        error_file=None,
        error=None,
        message=f"killed by {signame}" if signame else f"exited with code {exitcode}",
        logs=RankLogs(stdout=None, stderr=None, error_file=Path("/nowhere/error.json")),
    )


def test_exit_status_mapping() -> None:
    """One function maps a Result to 0, the root cause's code, or 128+N."""
    assert exit_status(Result(exit_codes={0: 0, 1: 0})) == 0
    failed = Result(
        exit_codes={0: 3, 1: -11, 2: -15},
        failures={0: _failure(0, 3, t=2.0), 1: _failure(1, -11, "SIGSEGV", t=1.0)},
        terminated=frozenset({2}),
    )
    assert exit_status(failed) == 128 + 11  # rank 1 failed first
    assert exit_status(failed, signal.SIGINT) == 130
    assert exit_status(Result(exit_codes={0: -15}, terminated=frozenset({0})), 15) == 143
    summary = render_summary(failed, {2: 202})
    # The CLI's summary is Result.describe(), the one renderer (issue 10).
    assert summary == "corral: " + replace(failed, pids={2: 202}).describe()  # no log_dir
    assert summary.splitlines()[0] == (
        "corral: rank 1 failed first (2 of 3 ranks failed): killed by SIGSEGV"
    )
    assert summary.index("rank 1 (pid 101) was killed by SIGSEGV") < summary.index(
        "rank 0 (pid 100)"
    )
    assert "rank 2 (pid 202) was killed by SIGTERM (exitcode -15)" in summary
    assert render_summary(Result(exit_codes={0: 0})) == ""
    stopped = render_summary(Result(exit_codes={0: 0}), signum=signal.SIGINT)
    assert stopped == "corral: stopped by SIGINT"


def test_parse_ranks() -> None:
    """--tee-ranks syntax: single ranks and inclusive ranges, comma-separated."""
    assert parse_ranks("0") == {0}
    assert parse_ranks("0,2-5") == {0, 2, 3, 4, 5}
    assert parse_ranks(" 1 , 3 - 4 ") == {1, 3, 4}
    for bad in ("", "a", "1-", "-1", "3-1", "0,,1"):
        with pytest.raises(ValueError, match="rank"):
            parse_ranks(bad)


def test_demo_runs_under_corral() -> None:
    """The README Quickstart: ``corral run -n 4 -- python -m corral.demo`` succeeds."""
    res = corral("-n", "4", "--", PY, "-m", "corral.demo")
    assert res.returncode == 0, res.stderr
    for r in range(4):
        assert f"[{r}]: hello from rank {r} of 4" in res.stdout
        assert f"[{r}]: rank {r}/4: this is stderr" in res.stderr
        assert re.search(rf"^\[{r}\]: found \d+ primes in \d+ ms; done$", res.stdout, re.M)


def test_console_script() -> None:
    """The ``corral`` script installed with the package runs the same command line."""
    script = Path(sys.executable).parent / "corral"
    if not script.exists():
        pytest.skip("the corral script is not installed next to this interpreter")
    res = subprocess.run(
        [str(script), "run", "-n", "2", "--", *code("print('ok')")],
        capture_output=True,
        text=True,
        env=corral_env(),
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["[0]: ok", "[1]: ok"]
