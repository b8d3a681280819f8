"""``corral torchrun [torchrun's options] SCRIPT [ARGS]``: torchrun's command line on corral.

Replacing ``torchrun`` by ``corral torchrun`` in a launch script is the whole
migration for a single machine: the options keep torchrun's names (both the
``--dash-form`` and the ``--underscore_form``) and meanings, Python is started
as torchrun starts it (``sys.executable -u SCRIPT ARGS``, or ``-m MODULE``), and
an option corral does not support is a one-line error naming it (exit 2),
never silently ignored when it would change the run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Final

from ._cli_args import (
    Options,
    _Parser,
    _std,
    _UsageError,
    add_rendezvous_options,
    parse_ranks,
    rendezvous_from,
)
from ._config import RUN_FIELD
from ._std import Std

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("build_torchrun_parser", "parse_torchrun")

PROG: Final = "corral torchrun"

_DESCRIPTION: Final = """\
torchrun's command line for one machine: start --nproc-per-node ranks of a
Python SCRIPT (as 'python -u SCRIPT ARGS', like torchrun) with torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/MASTER_PORT,
TORCHELASTIC_*, GROUP_*, ROLE_*). Every line is shown with a rank prefix
(torchrun's -t/--tee and --local-ranks-filter narrow it) and kept in
LOG_DIR/RANK/{stdout,stderr}.log. Ctrl-C is forwarded to the ranks as SIGINT.
"""

_EPILOG: Final = """\
examples:
  corral torchrun --standalone --nproc-per-node 4 train.py --lr 0.1
  corral torchrun --nproc_per_node=2 -m mypkg.train
  corral torchrun --nproc-per-node 2 --no-python ./worker.sh

not supported (a one-line error): --run-path and torchrun's logging plug-ins.
"""


class _Unsupported(argparse.Action):
    """An option torchrun has and corral does not: a one-line error naming it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"option {option_string} is not supported by corral torchrun")


def _nproc(text: str) -> int:
    value = text.strip().lower()
    if value in ("auto", "cpu"):
        # torch's "auto" is the GPU count when CUDA is available; corral starts
        # CPU ranks, so both mean the CPUs this process may run on.
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if value in ("gpu", "xpu"):
        raise argparse.ArgumentTypeError(f"{text!r}: no {value.upper()} is available to corral")
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or auto/cpu/gpu, got {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_torchrun_parser() -> argparse.ArgumentParser:
    """The ``corral torchrun`` parser (torchrun's option names)."""
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] SCRIPT [ARG...]",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--nproc-per-node",
        "--nproc_per_node",
        dest="nproc",
        type=_nproc,
        default=1,
        metavar="N",
        help="ranks to start: a number, auto or cpu (the CPU count) (default: 1)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="single machine, local rendezvous: always the case with corral",
    )
    add_rendezvous_options(p)
    p.add_argument(
        "--max-restarts",
        "--max_restarts",
        default="0",
        help="only 0 is supported (restarts are not implemented yet)",
    )
    p.add_argument("--master-addr", "--master_addr", help="sets MASTER_ADDR (default: 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", help="sets MASTER_PORT (default: a free port)")
    p.add_argument("--role", default="default", help="ROLE_NAME of every rank (default: default)")
    p.add_argument(
        "--monitor-interval", "--monitor_interval", help="accepted; corral is event-driven"
    )
    p.add_argument("--start-method", "--start_method", help="accepted; scripts are always exec'd")
    p.add_argument(
        "-m",
        "--module",
        action="store_true",
        help="SCRIPT is a module: run 'python -u -m SCRIPT ARGS'",
    )
    p.add_argument(
        "--no-python",
        "--no_python",
        action="store_true",
        help="SCRIPT is a program: run it directly, without python",
    )
    p.add_argument("--log-dir", "--log_dir", metavar="DIR", help="as 'corral run --log-dir'")
    p.add_argument(
        "-r",
        "--redirects",
        type=_std,
        default=Std.NONE,
        metavar="SPEC",
        help="streams to files only",
    )
    p.add_argument(
        "-t",
        "--tee",
        type=_std,
        default=None,
        metavar="SPEC",
        help="streams to files and the console (default: all)",
    )
    p.add_argument(
        "--local-ranks-filter",
        "--local_ranks_filter",
        default="",
        metavar="RANKS",
        help="only these ranks reach the console, e.g. 0 or 0,2",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="corral's: seconds between the forwarded signal and SIGKILL (default: 30)",
    )
    for names, nargs in (
        (("--run-path", "--run_path"), 0),
        (("--event-log-handler", "--event_log_handler"), None),
        (("--duplicate-stdout-filters", "--duplicate_stdout_filters"), None),
        (("--duplicate-stderr-filters", "--duplicate_stderr_filters"), None),
        (("--logs-specs", "--logs_specs"), None),
        (("--numa-binding", "--numa_binding"), None),
        (("--signals-to-handle", "--signals_to_handle"), None),
        (("--shutdown-timeout", "--shutdown_timeout"), None),
        (("--virtual-local-rank", "--virtual_local_rank"), 0),
    ):
        p.add_argument(*names, action=_Unsupported, nargs=nargs, help=argparse.SUPPRESS)
    p.add_argument("script", metavar="SCRIPT", help="the training script (or module, or program)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARG")
    return p


def parse_torchrun(argv: Sequence[str]) -> Options:
    """Parse ``corral torchrun``'s arguments into ``corral run``'s options.

    Raises:
        _UsageError: bad or unsupported usage; its text is the one-line message.
        SystemExit: ``--help`` was printed.
    """
    ns = build_torchrun_parser().parse_args(list(argv))
    fail = f"{PROG}: error:"
    rendezvous = None if ns.standalone else rendezvous_from(ns, fail)
    try:
        max_restarts = int(ns.max_restarts)
    except ValueError:
        max_restarts = -1
    if max_restarts < 0:
        raise _UsageError(f"{fail} --max-restarts {ns.max_restarts}: expected a whole number >= 0")
    if ns.module and ns.no_python:
        raise _UsageError(f"{fail} --module and --no-python cannot be used together")
    if not (ns.grace >= 0 and ns.grace != float("inf")):
        raise _UsageError(f"{fail} --grace: must be a finite number of seconds >= 0")
    n: int = ns.nproc
    tee = Std.ALL if ns.tee is None else ns.tee
    tee_ranks: frozenset[int] | None = None
    if ns.local_ranks_filter.strip():
        try:
            tee_ranks = parse_ranks(ns.local_ranks_filter)
        except ValueError as exc:
            raise _UsageError(f"{fail} --local-ranks-filter: {exc}") from None
        tee_ranks = frozenset(r for r in tee_ranks if r < n)  # torchrun ignores the others
    for name, spec in (("--redirects", ns.redirects), ("--tee", tee)):
        if isinstance(spec, dict) and any(r >= n for r in spec):
            raise _UsageError(f"{fail} {name}: rank(s) beyond --nproc-per-node {n}")
    if ns.no_python:
        command = (ns.script, *ns.script_args)
    elif ns.module:
        command = (sys.executable, "-u", "-m", ns.script, *ns.script_args)
    else:
        command = (sys.executable, "-u", ns.script, *ns.script_args)
    env: list[tuple[str, str]] = []
    if ns.master_addr is not None:
        env.append(("MASTER_ADDR", ns.master_addr))
    if ns.master_port is not None:
        env.append(("MASTER_PORT", ns.master_port))
    if ns.role != "default":
        env.append(("ROLE_NAME", ns.role))
    return Options(
        nprocs=n,
        command=command,
        # torchrun never refuses a used --log-dir (each run gets a new sub-folder): nor does this.
        log_dir=_numbered(ns.log_dir),
        redirects=ns.redirects,
        tee=tee,
        tee_ranks=tee_ranks,
        prefix="[{rank}]: ",
        grace=ns.grace,
        env=tuple(env),
        color="auto",
        max_restarts=max_restarts,
        rendezvous=rendezvous,
        expand_rank=False,
        subcommand="torchrun",
    )


def _numbered(log_dir: str | None) -> str | None:
    """``LOG_DIR/run-{run}``: every run in a sub-folder of its own (see ``RUN_FIELD``)."""
    if log_dir is None or RUN_FIELD in log_dir:
        return log_dir
    return os.path.join(log_dir, f"run-{RUN_FIELD}")
