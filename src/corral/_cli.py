"""The ``corral`` command line: ``corral run [options] -- COMMAND [ARG...]``.

This module is the only place in corral that prints and the only place that
handles signals. It is a thin layer over :func:`corral.spawn`: parse and check
the options (bad usage exits 2 before anything starts), build one
:class:`~corral._tee.Console`, start the group, wait for it, and turn the
:class:`~corral.Result` into an exit status and, on failure, one summary on
stderr.

Signals: the first SIGINT, SIGTERM, SIGHUP or SIGQUIT closes the group
gracefully (that same signal to every rank, as torchrun forwards it, then
``--grace`` seconds, then SIGKILL) and the exit status is 128+N. A second one
skips what is left of the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn

from ._config import MAX_NPROCS, OMP_NOTE, SpawnOptions, master_env
from ._errors import ConfigError, CorralError
from ._group import Group, _spawn
from ._rendezvous import Rendezvous
from ._result import signal_name
from ._std import Std
from ._tee import Console

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._result import Result

__all__ = ("exit_status", "main", "render_summary")

PROG: Final = "corral"
#: Exit status for bad usage (argparse's convention).
USAGE_ERROR: Final = 2
#: The signals that make corral close its group (torchrun's default list).
HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
RANK_FIELD: Final = "{rank}"


class _UsageError(Exception):
    """Bad command-line usage: one line for stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and never exit the process."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# -- option types (each raises ArgumentTypeError with a one-line reason) ---------


def _whole(text: str, what: str, low: int) -> int:
    """``text`` as a whole number >= ``low``, or a one-line reason."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _nprocs(text: str) -> int:
    value = _whole(text, "a number of ranks", 1)
    if value > MAX_NPROCS:
        raise argparse.ArgumentTypeError(
            f"{value} is more than corral's limit of {MAX_NPROCS} ranks per group"
        )
    return value


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def add_rendezvous_options(p: argparse.ArgumentParser) -> None:
    """torchrun's multi-node options (shared by ``corral run`` and ``corral torchrun``)."""
    p.add_argument(
        "--nnodes",
        default="1",
        metavar="N|MIN:MAX",
        help="nodes of the job, each running its own corral (default: 1); more than 1 needs "
        "--rdzv-endpoint and torch. e.g. --nnodes 2",
    )
    p.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        metavar="HOST:PORT",
        help="torch's rendezvous store every node reaches (c10d: the node that can bind it "
        "hosts it). e.g. --rdzv-endpoint node0:29400",
    )
    p.add_argument(
        "--rdzv-id",
        "--rdzv_id",
        default="none",
        metavar="ID",
        help="the job's id, the same on every node. e.g. --rdzv-id exp1",
    )
    p.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        default="c10d",
        metavar="NAME",
        help="c10d (default) or static (needs --node-rank)",
    )
    p.add_argument(
        "--node-rank",
        "--node_rank",
        type=int,
        default=None,
        metavar="K",
        help="this node's rank with --rdzv-backend static (c10d assigns ranks itself)",
    )
    p.add_argument(
        "--rdzv-conf",
        "--rdzv_conf",
        default="",
        metavar="KEY=VALUE,...",
        help="torch rendezvous settings, e.g. --rdzv-conf join_timeout=60",
    )
    p.add_argument(
        "--local-addr",
        "--local_addr",
        metavar="ADDR",
        help="this node's address as the others reach it (default: torch's choice)",
    )


def rendezvous_from(ns: argparse.Namespace, fail: str) -> Rendezvous | None:
    """The ``Rendezvous`` the multi-node options ask for; ``None`` for one machine.

    Raises:
        _UsageError: the options do not make a rendezvous.
    """
    nnodes = str(ns.nnodes).strip()
    if ns.rdzv_endpoint is None:
        if nnodes not in ("1", "1:1"):
            raise _UsageError(f"{fail} --nnodes {nnodes} needs --rdzv-endpoint HOST:PORT")
        return None
    config: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in ns.rdzv_conf.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"{fail} --rdzv-conf {item!r}: expected KEY=VALUE")
        config[key.strip()] = value.strip()
    try:
        join_timeout = float(config.pop("join_timeout", "600"))
        return Rendezvous(
            endpoint=ns.rdzv_endpoint,
            run_id=ns.rdzv_id,
            nnodes=nnodes,
            backend=ns.rdzv_backend,
            node_rank=ns.node_rank if ns.rdzv_backend == "static" else None,
            join_timeout=join_timeout,
            local_addr=ns.local_addr,
            config=config,
        )
    except (ConfigError, ValueError) as exc:
        raise _UsageError(f"{fail} {exc}") from None


def _count(text: str) -> int:
    return _whole(text, "a whole number", 0)


def _std(text: str) -> Std | dict[int, Std]:
    try:
        return Std.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_ranks(text: str) -> frozenset[int]:
    """Parse a rank list such as ``0``, ``0,2-5`` or ``1, 3`` into a set of ranks.

    Raises:
        ValueError: an empty item, a non-number, a negative rank or a
            decreasing range, with a message naming the bad token.
    """
    ranks: set[int] = set()
    if not text.strip():
        raise ValueError("empty rank list: use e.g. 0 or 0,2-5")
    for item in text.split(","):
        token = item.strip()
        if not token:
            raise ValueError(f"empty item in rank list {text!r}")
        low, sep, high = token.partition("-")
        bounds = [low.strip(), high.strip()] if sep else [low.strip()]
        if not all(b.isdigit() and b.isascii() for b in bounds):
            raise ValueError(f"bad rank or range {token!r} in {text!r}: use e.g. 0,2-5")
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise ValueError(f"rank range {token!r} in {text!r} goes backwards")
        if last >= MAX_NPROCS:  # checked before the range is expanded
            raise ValueError(
                f"rank {last} in {text!r} is beyond corral's limit of {MAX_NPROCS} ranks"
            )
        ranks.update(range(first, last + 1))
    return frozenset(ranks)


def _rank_list(text: str) -> frozenset[int]:
    try:
        return parse_ranks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if not key or "\0" in key or "\0" in value:
        raise argparse.ArgumentTypeError(f"bad variable {text!r}: expected KEY=VALUE")
    return key, value


# -- the parser -------------------------------------------------------------------

_RUN_DESCRIPTION: Final = """\
Start N ranks of COMMAND, each with RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT in its
environment (so torch.distributed's init_process_group() works unchanged).
Every line a rank writes is shown with a rank prefix and kept in
LOG_DIR/RANK/{stdout,stderr}.log. When a rank fails, the others are stopped
(SIGTERM, --grace seconds, SIGKILL), a summary explains the root cause, and
corral exits with that rank's exit code (128+N for signal N).

COMMAND is run directly, never through a shell. Put '--' before it so that
its own options are not taken for corral's. '{rank}' anywhere in COMMAND, its
ARGs or an --env value is replaced by the rank number.
"""

_RUN_EPILOG: Final = """\
examples:
  corral run -n 4 -- python train.py --lr 0.1
  corral run -n 8 --tee-ranks 0 --log-dir runs/exp1 -- python train.py
  corral run -n 2 --env CUDA_VISIBLE_DEVICES={rank} -- python worker.py --id {rank}

exit status:
  0 when every rank succeeded; otherwise the root cause's exit code, or
  128+N when it was killed by signal N; 128+N when corral itself received
  signal N (SIGINT, SIGTERM, SIGHUP, SIGQUIT: the ranks are closed
  gracefully; a second signal skips the grace period); 2 for bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``corral`` argument parser (``run`` is its one subcommand)."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="corral: run N ranks of a command, explain failures, leave nothing behind.",
        epilog="Run 'corral run --help' for the options of 'run'.",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="start N ranks of COMMAND and supervise them",
        usage="corral run [options] -- COMMAND [ARG...]",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-n",
        "--nprocs",
        type=_nprocs,
        default=1,
        metavar="N",
        help="number of ranks, numbered 0..N-1 (default: 1). e.g. -n 8",
    )
    run.add_argument(
        "--log-dir",
        metavar="DIR",
        help=(
            "where DIR/RANK/stdout.log, stderr.log and error.json go; created if missing. "
            "An existing rank folder is refused, never overwritten. Default: a fresh "
            "temporary folder, printed at the end. e.g. --log-dir runs/exp1"
        ),
    )
    run.add_argument(
        "--redirects",
        type=_std,
        default=Std.NONE,
        metavar="SPEC",
        help=(
            "streams written to log files without being shown: none, out, err, all "
            "(or 0-3), for every rank or per rank. Adds files only; it does not hide "
            "what --tee shows. e.g. --redirects all, --redirects 0:out,1:err"
        ),
    )
    run.add_argument(
        "--tee",
        type=_std,
        default=None,
        metavar="SPEC",
        help=(
            "streams written to log files and shown with a rank prefix (default: all). "
            "Same syntax as --redirects. e.g. --tee err, --tee 0:3,1:2"
        ),
    )
    run.add_argument(
        "--tee-ranks",
        type=_rank_list,
        default=None,
        metavar="RANKS",
        help=(
            "only these ranks are shown on the console; the others still write their "
            "log files (default: all ranks). e.g. --tee-ranks 0, --tee-ranks 0,2-5"
        ),
    )
    run.add_argument(
        "--prefix",
        default="[{rank}]: ",
        metavar="TEMPLATE",
        help=(
            "prefix of every shown line, with fields {rank} and {stream} (out or err); "
            "coloured per rank on a terminal unless NO_COLOR is set. "
            "Default: '[{rank}]: '. e.g. --prefix '{rank}/{stream}| '"
        ),
    )
    add_rendezvous_options(run)
    run.add_argument(
        "--max-restarts",
        type=_count,
        default=0,
        metavar="N",
        help=(
            "after a rank fails, stop every rank and start the whole group again, up to N "
            "times (default: 0); each attempt logs to LOG_DIR/attempt-K. e.g. --max-restarts 3"
        ),
    )
    run.add_argument(
        "--restart-backoff",
        type=_grace,
        default=1.0,
        metavar="SECONDS",
        help="wait before the first restart, doubled before each next one up to 30 s "
        "(default: 1). e.g. --restart-backoff 0.5",
    )
    run.add_argument(
        "--grace",
        type=_grace,
        default=30.0,
        metavar="SECONDS",
        help=(
            "when closing the ranks (a rank failed, or corral got SIGINT/SIGTERM): "
            "seconds between SIGTERM and SIGKILL (default: 30). e.g. --grace 5"
        ),
    )
    run.add_argument(
        "--env",
        type=_env_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "set a variable in every rank's environment; repeatable; {rank} in VALUE "
            "is replaced by the rank. Overrides RANK, MASTER_PORT etc. "
            "e.g. --env OMP_NUM_THREADS=1 --env SEED=4{rank}"
        ),
    )
    run.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help=(
            "colour each rank's prefix: auto means when stdout and stderr are "
            "terminals and NO_COLOR is not set (default: auto). e.g. --color never"
        ),
    )
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARG...]",
        help="the program to run in every rank and its arguments. e.g. -- python train.py",
    )
    return parser


@dataclass(frozen=True, slots=True)
class Options:
    """The checked options of ``corral run``."""

    nprocs: int
    command: tuple[str, ...]
    log_dir: str | None
    redirects: Std | dict[int, Std]
    tee: Std | dict[int, Std]
    tee_ranks: frozenset[int] | None
    prefix: str
    grace: float
    env: tuple[tuple[str, str], ...]
    color: str
    #: Replace ``{rank}`` in the command and ``--env`` values (not under ``corral torchrun``).
    expand_rank: bool = True
    #: The subcommand, for messages.
    subcommand: str = "run"
    max_restarts: int = 0
    restart_backoff: float = 1.0
    rendezvous: Rendezvous | None = None


def parse_args(argv: Sequence[str]) -> Options:
    """Parse and check ``corral run``'s arguments.

    Raises:
        _UsageError: bad usage; its text is the one-line message.
        SystemExit: ``--help`` or ``--version`` was printed.
    """
    argv = list(argv)
    command: list[str] | None = None
    # Everything after the first '--' that follows 'run' is the command, verbatim.
    if "run" in argv and "--" in argv[argv.index("run") :]:
        cut = argv.index("--", argv.index("run"))
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.subcommand != "run":
        raise _UsageError(
            f"{PROG}: error: missing subcommand: use 'corral run [options] -- COMMAND [ARG...]'"
        )
    if command is None:
        command = list(ns.command)
    elif ns.command:
        raise _UsageError(
            f"{PROG} run: error: unexpected argument(s) before '--': {' '.join(ns.command)}"
        )
    if not command:
        raise _UsageError(
            f"{PROG} run: error: no command given: use 'corral run [options] -- COMMAND [ARG...]'"
        )
    if not command[0]:
        raise _UsageError(f"{PROG} run: error: the command's program name is empty")
    n: int = ns.nprocs
    tee = Std.ALL if ns.tee is None else ns.tee
    for name, spec in (("--redirects", ns.redirects), ("--tee", tee)):
        if isinstance(spec, dict):
            bad = sorted(r for r in spec if r >= n)
            if bad:
                raise _UsageError(
                    f"{PROG} run: error: argument {name}: rank(s) {_join(bad)} "
                    f"do not exist with -n {n} (ranks are 0..{n - 1})"
                )
    if ns.tee_ranks is not None:
        bad = sorted(r for r in ns.tee_ranks if r >= n)
        if bad:
            raise _UsageError(
                f"{PROG} run: error: argument --tee-ranks: rank(s) {_join(bad)} "
                f"do not exist with -n {n} (ranks are 0..{n - 1})"
            )
    return Options(
        nprocs=n,
        command=tuple(command),
        log_dir=ns.log_dir,
        redirects=ns.redirects,
        tee=tee,
        tee_ranks=ns.tee_ranks,
        prefix=ns.prefix,
        grace=ns.grace,
        env=tuple(ns.env),
        color=ns.color,
        max_restarts=ns.max_restarts,
        restart_backoff=ns.restart_backoff,
        rendezvous=rendezvous_from(ns, f"{PROG} run: error:"),
    )


def _join(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks))


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
        if args[:1] == ["torchrun"]:
            from ._torchrun import parse_torchrun

            opts = parse_torchrun(args[1:])
        else:
            opts = parse_args(args)
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
