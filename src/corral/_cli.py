"""The ``corral`` command line: ``corral run [options] -- COMMAND [ARG...]``.

This module is the only place in corral that prints and the only place that
handles signals. It is a thin layer over :func:`corral.spawn`: parse and check
the options (``_cli_args``, or ``_torchrun`` for ``corral torchrun``; bad usage
exits 2 before anything starts), build one
:class:`~corral._tee.Console`, start the group, wait for it, and turn the
:class:`~corral.Result` into an exit status and, on failure, one summary on
stderr.

Signals: the first SIGINT, SIGTERM, SIGHUP or SIGQUIT closes the group
gracefully (that same signal to every rank, as torchrun forwards it, then
``--grace`` seconds, then SIGKILL) and the exit status is 128+N. A second one
skips what is left of the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._cli_args import PROG, USAGE_ERROR, Options, _UsageError, parse_args
from ._config import OMP_NOTE, SpawnOptions, master_env
from ._errors import ConfigError, CorralError
from ._group import Group, _spawn
from ._result import signal_name
from ._tee import Console
from ._torchrun import parse_torchrun

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._result import Result

__all__ = ("exit_status", "main", "render_summary")

#: The signals that make corral close its group (torchrun's default list).
HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
RANK_FIELD: Final = "{rank}"


# -- what the ranks get -------------------------------------------------------------


def _for_rank(text: str, rank: int) -> str:
    """Replace ``{rank}`` (only that: other braces are the program's business)."""
    return text.replace(RANK_FIELD, str(rank))


@dataclass(frozen=True, slots=True)
class _Launch:
    """The keywords for :func:`corral.spawn` derived from the options."""

    entrypoint: str
    args: dict[int, list[str]]
    env: dict[str, str]
    envs: dict[int, dict[str, str]] | None


def plan_launch(opts: Options, environ: Mapping[str, str]) -> _Launch:
    """Per-rank argv and environment: ``{rank}`` replaced, MASTER_ADDR/PORT defaulted."""
    n = opts.nprocs
    program, *rest = opts.command
    if not opts.expand_rank:
        env = dict(opts.env)
        env.update(master_env(environ, env))
        return _Launch(entrypoint=program, args=dict.fromkeys(range(n), rest), env=env, envs=None)
    if RANK_FIELD in program:
        # spawn() takes one program for every rank: let env(1) pick each rank's
        # own (it execs it; a missing one still ends the rank with 127).
        entrypoint = _env_program()
        args = {
            r: ["--", _for_rank(program, r), *(_for_rank(a, r) for a in rest)] for r in range(n)
        }
    else:
        entrypoint = program
        args = {r: [_for_rank(a, r) for a in rest] for r in range(n)}
    env = dict(opts.env)  # later --env of the same KEY wins
    envs: dict[int, dict[str, str]] | None = None
    env.update(master_env(environ, env))
    if any(RANK_FIELD in v for v in env.values()):
        envs = {
            r: {k: _for_rank(v, r) for k, v in env.items() if RANK_FIELD in v} for r in range(n)
        }
    return _Launch(entrypoint=entrypoint, args=args, env=env, envs=envs)


def _env_program() -> str:
    for path in ("/usr/bin/env", "/bin/env"):
        if os.access(path, os.X_OK):
            return path
    return "env"


def _wants_color(mode: str, environ: Mapping[str, str]) -> bool:
    if mode != "auto":
        return mode == "always"
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is None or not stream.isatty():
                return False
        except (OSError, ValueError):
            return False
    return True


# -- outcome ------------------------------------------------------------------------


def exit_status(result: Result, signum: int | None = None) -> int:
    """The process exit status for a run.

    Args:
        result: the group's final result.
        signum: the signal corral received and closed the group for, if any.

    Returns:
        128+``signum`` when corral was signalled; else 0 when no rank failed;
        else the root cause's exit code, or 128+N when it was killed by
        signal N (1 when a rank failed although it exited 0).
    """
    if signum is not None:
        return 128 + signum
    root = result.root_cause
    if root is None:
        return 0 if not result.terminated else 1
    code = root.exitcode
    if code < 0:
        return 128 + (-code)
    if code == 0:
        return 1
    return code if code <= 255 else 1


def render_summary(
    result: Result,
    pids: Mapping[int, int] | None = None,
    *,
    signum: int | None = None,
) -> str:
    """The summary for stderr: ``Result.describe()`` (the one renderer), as corral's words.

    Args:
        result: the group's final result.
        pids: rank -> pid (``Group.pids``), when ``result`` has none.
        signum: the signal corral received, if that is why the group closed.

    Returns:
        Lines for stderr (no trailing newline); empty when there is nothing to report.
    """
    if result.ok and signum is None:
        return ""
    if pids and not result.pids:
        result = dataclasses.replace(result, pids=dict(pids))
    lines: list[str] = []
    if signum is not None:
        lines.append(f"corral: stopped by {signal_name(signum)}")
    if not result.ok:
        # The CLI says where the logs are on a line of its own ("corral: logs in ...").
        logs = f"logs: {result.log_dir}"
        text = "\n".join(x for x in result.describe().splitlines() if x != logs)
        lines.append(f"corral: {text}")
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------


def _say(text: str) -> None:
    """Write corral's own words to stderr; a closed stderr never fails the run."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Signals:
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT: first closes gracefully, second hurries."""

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self._loop = loop
        self._grace = grace
        self._installed: list[int] = []
        self._group: Group | None = None
        self._tasks: list[asyncio.Task[Result]] = []
        self.received: list[int] = []

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError):
                continue  # not the main thread, or no such signal here
            self._installed.append(sig)

    def uninstall(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    def attach(self, group: Group) -> None:
        """The group has started: act on a signal that already arrived."""
        self._group = group
        if self.received:
            self._close(hurry=len(self.received) > 1)

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def _on_signal(self, sig: int) -> None:
        self.received.append(sig)
        name = signal_name(sig)
        if len(self.received) == 1:
            _say(
                f"corral: received {name}: forwarding it to the ranks (SIGKILL "
                f"after {self._grace:g}s; send it again to kill them now)"
            )
        elif len(self.received) == 2:
            _say(f"corral: received {name} again: killing the ranks now")
        if self._group is not None:
            self._close(hurry=len(self.received) > 1)

    def _close(self, *, hurry: bool) -> None:
        group = self._group
        assert group is not None
        sig = self.received[0]
        coro = group.close(grace=0.0, sig=sig) if hurry else group.close(sig=sig)
        self._tasks.append(self._loop.create_task(coro))

    async def settle(self) -> None:
        """Collect the close tasks started from signal handlers."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _run(opts: Options) -> int:
    loop = asyncio.get_running_loop()
    signals = _Signals(loop, opts.grace)
    signals.install()
    try:
        return await _run_group(opts, signals)
    finally:
        signals.uninstall()
        await signals.settle()


async def _run_group(opts: Options, signals: _Signals) -> int:
    launch = plan_launch(opts, os.environ)
    console = Console.create(color=_wants_color(opts.color, os.environ))
    try:
        return await _supervise(opts, signals, launch, console)
    finally:
        console.close()


async def _supervise(opts: Options, signals: _Signals, launch: _Launch, console: Console) -> int:
    options = SpawnOptions(
        nprocs=opts.nprocs,
        args=launch.args,
        env=launch.env,
        envs=launch.envs,
        log_dir=opts.log_dir,
        redirects=opts.redirects,
        tee=opts.tee,
        tee_ranks=opts.tee_ranks,
        prefix=opts.prefix,
        grace=opts.grace,
        max_restarts=opts.max_restarts,
        restart_backoff=opts.restart_backoff,
        rendezvous=opts.rendezvous,
    )
    # corral owns this process: every child is its own, so orphans re-parented
    # to it can be reaped without the library's caution about a host's children.
    group = _spawn(launch.entrypoint, console, options, owns_process=True)
    omp = "OMP_NUM_THREADS"  # torchrun's note, once the input is known to be good
    if opts.nprocs > 1 and omp not in os.environ and omp not in launch.env:
        _say(f"corral: {OMP_NOTE}")
    # On a failure or a signal, the summary shows what each live rank was doing.
    group.stacks_on_close = True
    async with group:
        signals.attach(group)
        result = await group.wait()
    signum = signals.first
    summary = render_summary(result, group.pids, signum=signum)
    failed = signum is not None or not result.ok
    if summary and failed:
        _say(summary)
    hint = _script_hint(opts, result)
    if hint:
        _say(hint)
    status = exit_status(result, signum)
    _say(f"corral: logs in {group.log_dir}")
    if status != 0:
        _say(f"corral: exit status {status}")
    return status


def _script_hint(opts: Options, result: Result) -> str | None:
    """What to type when COMMAND is a script that cannot be executed (``train.py``)."""
    root = result.root_cause
    if opts.subcommand != "run" or root is None or root.pid is not None:
        return None
    if root.exitcode not in (126, 127):
        return None
    program = opts.command[0]
    is_script = program.endswith(".py") or (
        os.path.isfile(program) and not os.access(program, os.X_OK)
    )
    if not is_script:
        return None
    rest = "".join(f" {a}" for a in opts.command[1:])
    n = opts.nprocs
    if not program.endswith(".py"):
        return (
            f"corral: hint: {program!r} is not executable: run 'chmod +x {program}', or name "
            f"its interpreter: corral run -n {n} -- INTERPRETER {program}{rest}"
        )
    lines = [
        f"corral: hint: {program!r} is a Python script, not a program: type",
        f"  corral run -n {n} -- python {program}{rest}",
        f"  or, as with torchrun: corral torchrun --nproc-per-node {n} {program}{rest}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``corral`` command line and return its exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 when every rank succeeded; the root cause's exit code (128+N for
        signal N) when one failed; 128+N when corral received signal N; 2 for
        bad usage (nothing was started then).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_torchrun(args[1:]) if args[:1] == ["torchrun"] else parse_args(args)
    except _UsageError as exc:
        _say(str(exc))
        return USAGE_ERROR
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("corral")
    logger.addHandler(handler)
    try:
        return asyncio.run(_run(opts))
    except ConfigError as exc:
        _say(f"{PROG} {opts.subcommand}: error: {exc}")
        return USAGE_ERROR
    except CorralError as exc:
        _say(f"{PROG}: error: {exc}")
        return 1
    except KeyboardInterrupt:  # SIGINT before the handlers were installed: nothing started
        _say(f"{PROG}: interrupted")
        return 128 + signal.SIGINT
    finally:
        logger.removeHandler(handler)
        _quiet_stdout()


def _quiet_stdout() -> None:
    """Flush stdout; if its reader went away (``| head``), stop Python complaining at exit."""
    if sys.stdout is None:  # started with stdout closed
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
