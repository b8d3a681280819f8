"""Python callables as ranks: arguments, return values, exceptions, exit codes, __main__."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
from typing import TYPE_CHECKING

import pytest

import corral
from corral._tee import Console

from .children import callable_fns as fns
from .conftest import run_on, spawn_on, watched_console

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1024 * 1024


async def test_return_values_per_rank_args_and_env(tmp_path: Path) -> None:
    """Each rank calls fn(*args[rank]) with the layered env; return values land per rank."""
    async with asyncio.timeout(20):
        result = await corral.run(
            fns.add,
            args={0: (1, 2), 1: (10, 20), 2: (100, 200)},
            env={"EXTRA": "common"},
            envs={0: {"PER_RANK": "a"}, 1: {"PER_RANK": "b"}, 2: {"PER_RANK": "c"}},
            log_dir=tmp_path,
        )
    assert result.ok
    assert result.exit_codes == {0: 0, 1: 0, 2: 0}
    assert result.return_values == {
        0: {"sum": 3, "rank": 0, "world": 3, "extra": "common", "per_rank": "a"},
        1: {"sum": 30, "rank": 1, "world": 3, "extra": "common", "per_rank": "b"},
        2: {"sum": 300, "rank": 2, "world": 3, "extra": "common", "per_rank": "c"},
    }


async def test_partial_and_async_functions(tmp_path: Path) -> None:
    """A functools.partial is sent by value; an ``async def`` runs under asyncio.run."""
    async with asyncio.timeout(20):
        partial = await corral.run(
            functools.partial(fns.add, 5), nprocs=2, args=(6,), log_dir=tmp_path / "p"
        )
        coro = await corral.run(fns.async_add, args={0: (1, 1), 1: (2, 2)}, log_dir=tmp_path / "c")
        failed = await corral.run(fns.async_fail, nprocs=1, log_dir=tmp_path / "f")
    assert [v["sum"] for v in partial.return_values.values()] == [11, 11]  # type: ignore[index]
    assert coro.return_values == {0: 2, 1: 4}
    assert failed.failures[0].message == "LookupError: nothing here"
    assert failed.failures[0].exitcode == 1


async def test_void_function_output_in_its_logs(tmp_path: Path) -> None:
    """A void function returns None, and what it prints is in its rank's log files."""
    async with asyncio.timeout(20):
        result = await corral.run(
            fns.void, nprocs=2, args=("hello",), redirects=corral.Std.ALL, log_dir=tmp_path
        )
    assert result.ok
    assert result.return_values == {0: None, 1: None}
    for rank in (0, 1):
        logs = result.logs[rank]
        assert logs.stdout is not None
        assert logs.stderr is not None
        assert logs.stdout.read_text() == "out: hello\n"
        assert logs.stderr.read_text() == "err: hello\n"
        assert not logs.error_file.exists()


async def test_callable_output_is_teed_with_prefix(tmp_path: Path) -> None:
    """Callable ranks go through the same tee as commands: prefixed whole lines."""
    out, err = io.BytesIO(), io.BytesIO()
    console = Console.create(stdout=out, stderr=err, color=False)
    async with asyncio.timeout(20):
        result = await run_on(
            fns.void, nprocs=2, args=("tee",), tee="all", log_dir=tmp_path, console=console
        )
    assert result.ok
    assert sorted(out.getvalue().decode().splitlines()) == ["[0]: out: tee", "[1]: out: tee"]
    assert sorted(err.getvalue().decode().splitlines()) == ["[0]: err: tee", "[1]: err: tee"]


async def test_32_mib_return_values_from_two_ranks(tmp_path: Path) -> None:
    """Return values of 32 MiB per rank arrive intact (through files, no pipe to fill)."""
    async with asyncio.timeout(30):
        result = await corral.run(
            fns.big, args={0: (32 * MIB, 0xAB), 1: (32 * MIB, 0xCD)}, log_dir=tmp_path
        )
    assert result.ok
    for rank, fill in ((0, 0xAB), (1, 0xCD)):
        value = result.return_values[rank]
        assert isinstance(value, bytes)
        assert len(value) == 32 * MIB
        assert value == bytes([fill]) * (32 * MIB)


async def test_exception_recorded_with_type_message_traceback(tmp_path: Path) -> None:
    """An uncaught exception: error.json, exit 1, Failure.error/message/traceback from it."""
    async with asyncio.timeout(20):
        result = await corral.run(
            fns.fail, nprocs=1, args=("x7",), redirects="all", log_dir=tmp_path
        )
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.signal is None
    assert failure.message == "BadInput: bad input: x7"
    assert failure.error_file == tmp_path / "0" / "error.json"
    assert failure.error is not None
    on_disk = json.loads((tmp_path / "0" / "error.json").read_text())
    assert dict(failure.error) == on_disk
    assert set(on_disk) >= {"message", "type", "traceback", "timestamp"}
    assert on_disk["type"] == "tests.children.callable_fns.BadInput"
    assert isinstance(on_disk["timestamp"], float)
    assert failure.timestamp == on_disk["timestamp"]
    assert failure.traceback is not None
    assert "in _inner" in failure.traceback
    assert "BadInput: bad input: x7" in failure.traceback
    # The bootstrap's own frames are not part of the user's traceback.
    assert "_child.py" not in failure.traceback
    # Python's usual traceback still reaches the rank's stderr.
    stderr = (tmp_path / "0" / "stderr.log").read_text()
    assert "Traceback (most recent call last)" in stderr
    assert "in _inner" in stderr


async def test_system_exit_code_is_the_exit_code(tmp_path: Path) -> None:
    """SystemExit(5) exits 5, as in a normal program, and writes no error file."""
    async with asyncio.timeout(20):
        result = await corral.run(fns.exit_with, nprocs=1, args=(5,), log_dir=tmp_path)
    failure = result.failures[0]
    assert result.exit_codes == {0: 5}
    assert failure.exitcode == 5
    assert failure.message == "exited with code 5"
    assert failure.error is None
    assert not (tmp_path / "0" / "error.json").exists()
    # SystemExit(0) is a success with no return value.
    async with asyncio.timeout(20):
        ok = await corral.run(fns.exit_with, nprocs=1, args=(0,), log_dir=tmp_path / "zero")
    assert ok.ok
    assert ok.return_values == {0: None}


async def test_keyboard_interrupt_ends_like_python(tmp_path: Path) -> None:
    """An uncaught KeyboardInterrupt ends the rank by SIGINT, unrecorded, as Python does."""
    async with asyncio.timeout(20):
        result = await corral.run(fns.interrupt, nprocs=1, log_dir=tmp_path)
    failure = result.failures[0]
    assert failure.exitcode == -signal.SIGINT
    assert failure.signal == "SIGINT"
    assert failure.error is None


async def test_close_terminates_callable_ranks(tmp_path: Path) -> None:
    """Closing a group of running callables ends them by SIGTERM: terminated, not failed."""
    console, out, _ = watched_console()
    async with asyncio.timeout(20):
        async with spawn_on(
            fns.block, nprocs=2, tee="out", log_dir=tmp_path / "logs", console=console
        ) as group:
            await out.wait_for(b"ready", 2)  # handshake: both ranks are inside fn
            result = await group.close(grace=5)
    assert result.failures == {}
    assert result.terminated == frozenset({0, 1})
    assert result.exit_codes == {0: -signal.SIGTERM, 1: -signal.SIGTERM}
    assert result.return_values == {}
    assert not (tmp_path / "logs" / "0" / "error.json").exists()


async def test_unpicklable_return_value_is_a_failure(tmp_path: Path) -> None:
    """A return value pickle refuses fails that rank with a clear message; others succeed."""
    async with asyncio.timeout(20):
        result = await corral.run(
            fns.return_lock, nprocs=1, redirects="all", log_dir=tmp_path / "lock"
        )
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.message.startswith("the return value of return_lock (rank 0) cannot be pickled")
    assert "_thread.lock" in failure.message
    assert result.return_values == {}
    assert not (tmp_path / "lock" / "0" / "result.pkl").exists()


async def test_return_value_the_supervisor_cannot_load(tmp_path: Path) -> None:
    """A return value that pickles in the rank but cannot be loaded here is that rank's Failure."""
    async with asyncio.timeout(20):
        result = await corral.run(fns.return_unloadable, nprocs=1, log_dir=tmp_path)
    failure = result.failures[0]
    assert result.exit_codes == {0: 0}
    assert failure.exitcode == 0
    assert failure.message.startswith("its return value was pickled but cannot be loaded")
    assert "RuntimeError: this value only loads in a rank" in failure.message


async def test_rank_imports_no_corral_before_user_code(tmp_path: Path) -> None:
    """The bootstrap imports neither corral nor asyncio/typing/pickle.py before the function."""
    async with asyncio.timeout(20):
        result = await corral.run(fns.modules, nprocs=1, log_dir=tmp_path)
    loaded = result.return_values[0]
    assert isinstance(loaded, list)
    for heavy in ("corral", "asyncio", "typing", "pickle", "subprocess", "json", "logging"):
        assert heavy not in loaded, f"the bootstrap imported {heavy}"


async def test_lambda_closure_and_bad_args_refused_before_start(tmp_path: Path) -> None:
    """Lambdas, closures and unpicklable args raise ConfigError naming them; nothing starts."""
    captured = 3

    def closure() -> int:
        return captured

    with pytest.raises(corral.ConfigError, match=r"lambda '.*<lambda>' \(.*test_callable.py:\d+\)"):
        corral.spawn(lambda: 1, nprocs=2, log_dir=tmp_path / "a")
    with pytest.raises(corral.ConfigError, match=r"closure.*define it at module level"):
        corral.spawn(closure, nprocs=2, log_dir=tmp_path / "b")
    lock = threading.Lock()
    with pytest.raises(
        corral.ConfigError, match=r"rank 1 of add: argument 1 \(<unlocked _thread.lock"
    ):
        corral.spawn(fns.add, args={0: (1, 2), 1: (1, lock)}, log_dir=tmp_path / "c")
    with pytest.raises(corral.ConfigError, match=r"argument 0 \(<function .*<lambda>"):
        corral.spawn(fns.add, nprocs=1, args=(lambda: 0, 1), log_dir=tmp_path / "d")
    # Refused before anything was created: not even the log folder exists.
    for name in "abcd":
        assert not (tmp_path / name).exists()


async def test_function_that_cannot_be_imported_in_the_rank(tmp_path: Path) -> None:
    """A function whose module the rank cannot import fails that rank, saying so."""
    module = types.ModuleType("corral_test_dynamic_module")
    exec("def f():\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        async with asyncio.timeout(20):
            result = await corral.run(module.f, nprocs=1, log_dir=tmp_path)
    finally:
        del sys.modules[module.__name__]
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.message.startswith("cannot load the function or its arguments from")
    assert "ModuleNotFoundError: No module named 'corral_test_dynamic_module'" in failure.message


MAIN_SCRIPT = """
import asyncio
import json
import sys

import corral
import helper_mod  # a sibling module: the rank needs this script's sys.path

print("top level ran as", __name__, file=sys.stderr)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def worker(x: int) -> Point:
    return Point(helper_mod.double(x))


if __name__ == "__main__":
    result = asyncio.run(corral.run(worker, args={0: (1,), 1: (2,)}, redirects="all"))
    result.raise_for_failure()
    values = {rank: (type(p).__qualname__, p.x) for rank, p in result.return_values.items()}
    stderr = result.logs[0].stderr.read_text()
    print(json.dumps({"values": values, "isinstance": all(
        isinstance(p, Point) for p in result.return_values.values()), "rank_stderr": stderr}))
"""


def test_function_in_main_script(tmp_path: Path) -> None:
    """A function of ``python script.py`` runs in ranks: the script is imported as __mp_main__."""
    (tmp_path / "train.py").write_text(textwrap.dedent(MAIN_SCRIPT))
    (tmp_path / "helper_mod.py").write_text("def double(x):\n    return 2 * x\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "train.py")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["values"] == {"0": ["Point", 2], "1": ["Point", 4]}
    assert report["isinstance"] is True
    # The main block ran once (in the supervisor); each rank ran only the top level.
    assert report["rank_stderr"] == "top level ran as __mp_main__\n"


UNGUARDED_SCRIPT = """
import asyncio

import corral


def worker() -> int:
    return 1


# No 'if __name__ == "__main__":' guard: each rank, importing this script to
# find worker, would start ranks again. corral refuses, in the rank.
result = asyncio.run(corral.run(worker, nprocs=1))
print(result.failures[0].message)
"""


def test_unguarded_main_script_fails_clearly(tmp_path: Path) -> None:
    """A main script that starts ranks at import time fails its ranks, naming the guard."""
    (tmp_path / "unguarded.py").write_text(textwrap.dedent(UNGUARDED_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "unguarded.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cannot load the function or its arguments from ")
    assert "ConfigError: corral.spawn() of a callable was called while a rank" in proc.stdout


def test_function_in_interactive_main_refused() -> None:
    """A function of a ``python -c`` __main__ (no file to import) is a ConfigError."""
    code = textwrap.dedent(
        """
        import corral
        def f():
            return 1
        try:
            corral.spawn(f, nprocs=1)
        except corral.ConfigError as exc:
            print(exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "it is defined in __main__, which has no file" in proc.stdout
