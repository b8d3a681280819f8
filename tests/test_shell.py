"""A person at a shell: live Python output, signal forwarding, torchrun parity, re-runs."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import corral
from corral._torchrun import parse_torchrun

from .cli_helpers import PY, Lines, OnPty, code, corral_env, screen
from .helpers import fifos

CHILDREN = Path(__file__).parent / "children"


def buffered_env(**extra: str) -> dict[str, str]:
    """A user's environment: no PYTHONUNBUFFERED (this machine sets it globally)."""
    env = corral_env(**extra)
    env.pop("PYTHONUNBUFFERED", None)
    # Absolute: some tests run corral from another folder.
    paths = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(Path(corral.__file__).parents[1])])
    return env


def start(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Lines:
    proc = subprocess.Popen(
        [PY, "-m", "corral", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else buffered_env(),
        cwd=cwd,
    )
    return Lines(proc)


def go(path: Path) -> None:
    """Release a rank blocked on the FIFO ``path``."""
    with open(path, "wb") as fifo:
        fifo.write(b"go")


@pytest.mark.parametrize("sub", ["run", "torchrun"])
def test_python_ranks_stream_live_without_pythonunbuffered(tmp_path: Path, sub: str) -> None:
    """A print() without flush reaches the console while the rank still runs."""
    fifos(tmp_path, "go-0", "go-1")
    script = str(CHILDREN / "shell_live.py")
    if sub == "run":
        lines = start("run", "-n", "2", "--", PY, script, str(tmp_path))
    else:
        lines = start("torchrun", "--nproc-per-node", "2", script, str(tmp_path))
    lines.wait_for(lambda: {"[0]: before go 0\n", "[1]: before go 1\n"} <= set(lines.out))
    go(tmp_path / "go-0")
    go(tmp_path / "go-1")
    assert lines.finish() == 0, lines.err
    assert "[0]: after go 0\n" in lines.out
    assert "[1]: after go 1\n" in lines.out


@pytest.mark.parametrize("sub", ["run", "torchrun"])
def test_torch_gloo_script_streams_live(tmp_path: Path, sub: str) -> None:
    """A real 2-rank gloo all-reduce: its unflushed prints arrive before it ends."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    fifos(tmp_path, "go-0", "go-1")
    script = str(CHILDREN / "shell_ddp.py")
    if sub == "run":
        lines = start("run", "-n", "2", "--", PY, script, str(tmp_path))
    else:
        lines = start("torchrun", "--standalone", "--nproc_per_node=2", script, str(tmp_path))
    lines.wait_for(
        lambda: {"[0]: joined 0/2\n", "[1]: joined 1/2\n"} <= set(lines.out), timeout=120
    )
    go(tmp_path / "go-0")
    go(tmp_path / "go-1")
    assert lines.finish(timeout=120) == 0, lines.err
    assert {"[0]: rank 0/2 sum=3\n", "[1]: rank 1/2 sum=3\n"} <= set(lines.out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_the_received_signal_is_forwarded(sig: signal.Signals) -> None:
    """Ctrl-C reaches a rank's `except KeyboardInterrupt:`; other signals arrive as themselves."""
    lines = start("run", "-n", "2", "--", PY, str(CHILDREN / "shell_signal.py"))
    lines.wait_for(lambda: sum(x.startswith("[") and "ready" in x for x in lines.out) == 2)
    lines.proc.send_signal(sig)
    assert lines.finish() == 128 + sig, lines.err
    want = "KeyboardInterrupt" if sig == signal.SIGINT else sig.name
    for r in range(2):
        assert f"[{r}]: checkpoint on {want}\n" in lines.out, lines.out


async def test_group_close_with_a_chosen_first_signal(tmp_path: Path) -> None:
    """Group.close(sig=SIGINT): the ranks get KeyboardInterrupt; a bad sig is a ConfigError."""
    fifos(tmp_path, "ready-0", "ready-1")
    async with asyncio.timeout(30):
        async with corral.spawn(
            [sys.executable, str(CHILDREN / "shell_signal.py"), str(tmp_path)],
            nprocs=2,
            redirects="out",
            log_dir=tmp_path / "logs",
        ) as group:
            for r in range(2):
                assert await asyncio.to_thread((tmp_path / f"ready-{r}").read_bytes) == b"ready"
            with pytest.raises(corral.ConfigError):
                await group.close(sig=99999)
            result = await group.close(sig=signal.SIGINT)
    assert result.terminated == {0, 1}
    for r in range(2):
        log = (tmp_path / "logs" / str(r) / "stdout.log").read_text()
        assert "checkpoint on KeyboardInterrupt" in log


async def test_torchrun_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank gets torchrun's variables; the user's own settings win."""
    for name in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = [sys.executable, str(CHILDREN / "shell_env.py")]
    async with asyncio.timeout(30):
        result = await corral.run(
            argv,
            nprocs=2,
            redirects="out",
            log_dir=tmp_path / "a",
        )
    assert result.ok
    seen = [json.loads((tmp_path / "a" / str(r) / "stdout.log").read_text()) for r in range(2)]
    for r, env in enumerate(seen):
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0
        assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("0", "1")
        assert (env["ROLE_RANK"], env["ROLE_WORLD_SIZE"], env["ROLE_NAME"]) == (
            str(r),
            "2",
            "default",
        )
        assert (env["TORCHELASTIC_RESTART_COUNT"], env["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "0")
        assert env["TORCHELASTIC_RUN_ID"]
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]
    monkeypatch.setenv("PYTHONUNBUFFERED", "")
    async with asyncio.timeout(30):
        result = await corral.run(
            argv,
            nprocs=1,
            env={"OMP_NUM_THREADS": "4", "MASTER_PORT": "1234"},
            redirects="out",
            log_dir=tmp_path / "b",
        )
    env = json.loads((tmp_path / "b" / "0" / "stdout.log").read_text())
    assert (env["PYTHONUNBUFFERED"], env["OMP_NUM_THREADS"], env["MASTER_PORT"]) == (
        "",
        "4",
        "1234",
    )


def test_running_a_script_says_what_to_type(tmp_path: Path) -> None:
    """`corral run -n 2 train.py`: exit 127 and a hint naming python and corral torchrun."""
    (tmp_path / "train.py").write_text("print('hi')\n")
    lines = start("run", "-n", "2", "train.py", "--lr", "1", cwd=tmp_path)
    assert lines.finish() == 127
    err = "".join(lines.err)
    assert "corral run -n 2 -- python train.py --lr 1" in err
    assert "corral torchrun --nproc-per-node 2 train.py --lr 1" in err


def test_torchrun_options(tmp_path: Path) -> None:
    """torchrun's names and meanings; python -u SCRIPT; unsupported options exit 2 by name."""
    opts = parse_torchrun(["--nproc_per_node=3", "--nnodes", "1:1", "-t", "2", "s.py", "-x"])
    assert (opts.nprocs, opts.command) == (3, (sys.executable, "-u", "s.py", "-x"))
    assert opts.tee == corral.Std.ERR
    assert parse_torchrun(["-m", "pkg.mod"]).command == (sys.executable, "-u", "-m", "pkg.mod")
    assert parse_torchrun(["--no-python", "./prog", "a"]).command == ("./prog", "a")
    assert parse_torchrun(["--nproc-per-node", "cpu", "s.py"]).nprocs >= 1
    for bad, name in (
        (["--nnodes", "2"], "--nnodes"),
        (["--max-restarts", "x"], "--max-restarts"),
        (["--logs-specs", "x"], "--logs-specs"),
        (["--run-path"], "--run-path"),
        (["--nproc-per-node", "gpu"], "--nproc-per-node"),
    ):
        lines = start("torchrun", *bad, "s.py")
        assert lines.finish() == 2
        err = "".join(lines.err)
        assert name in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_the_same_command_again_gets_the_next_run_folder(tmp_path: Path) -> None:
    """`--log-dir exp1/run-{run}` run three times: run-1, run-2, run-3, nothing overwritten.

    `corral torchrun --log-dir exp2`, like torchrun, puts every run in a new sub-folder.
    """
    template = str(tmp_path / "exp1" / "run-{run}")
    for k in (1, 2, 3):
        lines = start("run", "-n", "2", "--log-dir", template, "--", PY, "-c", f"print({k})")
        assert lines.finish() == 0, lines.err
        where = tmp_path / "exp1" / f"run-{k}"
        assert f"corral: logs in {where}\n" in lines.err
        assert (where / "0" / "stdout.log").read_text() == f"{k}\n"
    assert sorted(p.name for p in (tmp_path / "exp1").iterdir()) == ["run-1", "run-2", "run-3"]
    script = tmp_path / "hi.py"
    script.write_text("print('hi')\n")
    for k in (1, 2):
        lines = start(
            "torchrun", "--nproc-per-node", "1", "--log-dir", str(tmp_path / "exp2"), str(script)
        )
        assert lines.finish() == 0, lines.err
        assert (tmp_path / "exp2" / f"run-{k}" / "0" / "stdout.log").read_text() == "hi\n"


def test_progress_bars_on_a_terminal(tmp_path: Path) -> None:
    """`\\r` progress shows live and prefixed; another rank's line is never glued onto it.

    The log file keeps the rank's bytes exactly; a console that is not a
    terminal gets the whole line, `\\r` included.
    """
    fifos(tmp_path, "go-1", "go-0-2", "go-0-3")
    argv = ["-n", "2", "--log-dir", str(tmp_path / "logs"), "--"]
    argv += [PY, str(CHILDREN / "shell_progress.py"), str(tmp_path)]
    term = OnPty("run", argv, buffered_env())
    term.wait_for(b"step 1/3 |#  |")  # no newline yet: drawn live
    go(tmp_path / "go-0-2")
    term.wait_for(b"step 2/3 |## |")
    go(tmp_path / "go-1")
    term.wait_for(b"hello from rank 1")
    go(tmp_path / "go-0-3")
    assert term.finish() == 0, term.seen
    shown = [line for line in screen(term.seen) if not line.startswith("corral: ")]
    assert shown == ["[1]: hello from rank 1", "[0]: step 3/3 |###|"], term.seen
    bar = b"\rstep 1/3 |#  |\rstep 2/3 |## |\rstep 3/3 |###|\n"
    assert (tmp_path / "logs" / "0" / "stderr.log").read_bytes() == bar
    rank = code("import sys; sys.stderr.write('\\ra\\rb\\n')")
    piped = subprocess.run(
        [PY, "-m", "corral", "run", "--", *rank],
        capture_output=True,
        env=buffered_env(),
        timeout=30,
    )
    assert piped.returncode == 0
    assert b"[0]: \ra\rb\n" in piped.stderr
