"""The ``corral`` command line's options: the parser, each option's type, ``Options``.

Parsing and checking only (bad usage is a ``_UsageError``: one line, exit 2,
before anything starts); running the group is ``_cli``'s. ``corral torchrun``
(``_torchrun``) builds on the same option types and rendezvous options.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn

from ._config import MAX_NPROCS
from ._errors import ConfigError
from ._rendezvous import Rendezvous
from ._std import Std

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("Options", "build_parser", "parse_args", "parse_ranks")

PROG: Final = "corral"
#: Exit status for bad usage (argparse's convention).
USAGE_ERROR: Final = 2


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
