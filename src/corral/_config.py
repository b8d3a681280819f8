"""Turn ``spawn()``'s keywords into a frozen, validated plan.

Everything that can be wrong with the arguments is found here, before the first
process starts, and reported as a ``ConfigError`` naming the rank or token at
fault. The only side effect, creating the log directories, happens last, once
every other check has passed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import string
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias, TypedDict, cast

from . import _callable
from ._errors import ConfigError
from ._rendezvous import Rendezvous
from ._result import RankLogs
from ._std import Std

if TYPE_CHECKING:
    from ._rendezvous import World

__all__ = (
    "MAX_NPROCS",
    "Entrypoint",
    "GroupPlan",
    "RankPlan",
    "SpawnOptions",
    "StdSpec",
    "build_plan",
    "master_env",
)

_log = logging.getLogger("corral")

Entrypoint: TypeAlias = "str | os.PathLike[str] | Sequence[str] | Callable[..., object]"
StdSpec: TypeAlias = "Std | int | str | Mapping[int, Std | int | str]"

#: The environment variable that marks every process of a group, so that
#: descendants which left the rank's session can still be found (see _reap).
GROUP_ENV: Final = "CORRAL_GROUP"
_PREFIX_FIELDS: Final = frozenset({"rank", "stream"})
#: The most ranks one group may have. A rank is a process and up to 5 file
#: descriptors of the supervisor; past a few thousand per machine the kernel's
#: own limits (processes, descriptors, memory) end a start midway, and a
#: mistyped count (10**6) would first create that many log folders. 4096 is
#: more than any single machine has cores; raise it here if yours is larger.
MAX_NPROCS: Final = 4096
#: In each rank folder: the file a rank touches to say it makes progress (``hang_timeout``).
HEARTBEAT_FILE: Final = "heartbeat"
#: The variable naming a rank's readiness descriptor (``ready_fd=True``).
READY_FD_ENV: Final = "CORRAL_READY_FD"
#: In ``log_dir``, replaced by the first run number (1, 2, 3...) whose folder is new.
RUN_FIELD: Final = "{run}"
#: Linux: the longest single argument or ``KEY=VALUE`` that ``execve`` takes
#: (``MAX_ARG_STRLEN``, 32 pages).
_MAX_ARG_STRLEN: Final = 32 * 4096
#: torchrun's role name when none is given.
ROLE_NAME: Final = "default"
#: What torchrun says when it sets OMP_NUM_THREADS for the user.
OMP_NOTE: Final = (
    "Setting OMP_NUM_THREADS=1 for each rank to avoid overloading the machine; "
    "set OMP_NUM_THREADS yourself to tune it."
)


@dataclass(frozen=True, slots=True)
class RankPlan:
    """Everything needed to start one rank."""

    rank: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    dir: Path
    logs: RankLogs
    #: Streams that go to a file (tee implies redirect).
    redirect: Std
    #: Streams read through a pipe and shown on the console (a subset of ``redirect``).
    tee: Std
    #: For callables: where the child leaves its pickled return value.
    result_file: Path | None = None
    #: Streams read through a pipe for ``group.lines()`` only (not shown; logged).
    watch: Std = Std.NONE


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """A validated group: every rank's plan plus the group-wide settings."""

    nprocs: int
    ranks: tuple[RankPlan, ...]
    log_dir: Path
    grace: float
    prefix: str
    cwd: Path | None
    token: str
    is_callable: bool
    #: Contain the group in a PID namespace of its own: ``None`` where the
    #: kernel allows it, ``True`` always (or fail), ``False`` never (walk).
    pid_namespace: bool | None = None
    #: Walk containment only: reap re-parented zombie session leaders that no
    #: scan saw alive (see ``_reap.reap_zombie_children``). The CLI owns its
    #: process and sets it; a library host may have such children of its own.
    reap_orphan_leaders: bool = False
    #: How many times a failed attempt is started again (the whole group).
    max_restarts: int = 0
    #: Seconds before the first restart; each next one waits twice as long, up to the cap.
    restart_backoff: float = 1.0
    restart_backoff_max: float = 30.0
    #: This node's part in a multi-node group (``None``: one machine).
    rendezvous: Rendezvous | None = None
    #: Fail a rank that shows no progress for this long (``None``: never).
    hang_timeout: float | None = None
    #: The text a rank prints on a stdout line to say it is ready (``group.ready()``).
    ready_line: bytes | None = None
    #: Each rank gets a pipe, ``$CORRAL_READY_FD``, to write its readiness to.
    ready_fd: bool = False
    #: Where the run report goes: ``{log_dir}/report.json``, or the first free
    #: ``report-N.json`` when that file is already there (never overwritten).
    report: Path | None = None


class SpawnOptions(TypedDict, total=False):
    """The keywords of :func:`corral.spawn` and :func:`corral.run` (all optional).

    Declared once: ``spawn``, ``run`` and :func:`build_plan` all take exactly these.
    """

    #: Number of ranks (0..nprocs-1); may be omitted when ``args`` or ``envs``
    #: is a per-rank mapping.
    nprocs: int | None
    #: Extra argv (command) or positional arguments (callable): one sequence
    #: for every rank, or rank -> sequence.
    args: Sequence[object] | Mapping[int, Sequence[object]] | None
    #: Variables for every rank (over the parent's and the rank variables).
    env: Mapping[str, str] | None
    #: rank -> variables (over ``env``).
    envs: Mapping[int, Mapping[str, str]] | None
    #: Where ``{rank}/stdout.log`` etc. go; default a fresh temporary folder.
    log_dir: str | os.PathLike[str] | None
    #: Streams that go to log files (``Std``, a spec string, or rank -> Std).
    redirects: StdSpec
    #: Streams that go to the log files and to the console.
    tee: StdSpec
    #: Streams corral reads (and logs) for ``group.lines()`` without showing
    #: them (a teed stream can be subscribed to anyway).
    watch: StdSpec
    #: The ranks whose tee reaches the console (default: all).
    tee_ranks: Collection[int] | None
    #: Format of each teed line's prefix; fields ``{rank}``, ``{stream}``.
    prefix: str
    #: Seconds between SIGTERM and SIGKILL when closing (default 30).
    grace: float
    #: Working directory of the ranks.
    cwd: str | os.PathLike[str] | None
    #: Contain the group in a PID namespace of its own: ``None`` (default)
    #: where the kernel allows it, ``True`` always (else the start fails),
    #: ``False`` never (the ``/proc`` walk). See README "Containment".
    pid_namespace: bool | None
    #: How many times the whole group is started again after a failure
    #: (default 0). Never after ``close()``, a cancellation or a signal.
    max_restarts: int
    #: Seconds before the first restart (default 1); doubled before each
    #: next one, up to ``restart_backoff_max`` (default 30).
    restart_backoff: float
    restart_backoff_max: float
    #: Run as one node of a multi-node group on torch's rendezvous (README,
    #: "Several machines"); ranks get global ``RANK``/``WORLD_SIZE``.
    rendezvous: Rendezvous | None
    #: Seconds a rank may go without progress (output to its log files, or a
    #: touch of ``$CORRAL_HEARTBEAT_FILE``) before it is dumped and failed as hung.
    hang_timeout: float | None
    #: Text that, found in a line of a rank's stdout, says the rank is ready
    #: (``await group.ready()``); stdout is then read through corral (and logged).
    ready_line: str | None
    #: Give each rank a pipe, its descriptor number in ``$CORRAL_READY_FD``: a
    #: rank is ready (``await group.ready()``) once it writes a byte to it.
    ready_fd: bool


_OPTIONS: Final = frozenset(SpawnOptions.__annotations__)


def build_plan(entrypoint: Entrypoint, options: SpawnOptions) -> GroupPlan:
    """Validate ``spawn()``'s arguments and create the log directories.

    Raises:
        ConfigError: anything is wrong; nothing has been created then.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown keyword argument(s): {', '.join(hints)}")
    nprocs = options.get("nprocs")
    args = options.get("args")
    env = options.get("env")
    envs = options.get("envs")
    log_dir = options.get("log_dir")
    redirects = options.get("redirects", Std.NONE)
    tee = options.get("tee", Std.NONE)
    watch = options.get("watch", Std.NONE)
    tee_ranks = options.get("tee_ranks")
    prefix = options.get("prefix", "[{rank}]: ")
    grace = options.get("grace", 30.0)
    cwd = options.get("cwd")
    pid_namespace = options.get("pid_namespace")
    if pid_namespace is not None and not isinstance(pid_namespace, bool):
        raise ConfigError(
            f"pid_namespace must be True, False or None, not {type(pid_namespace).__name__}"
        )
    rendezvous = options.get("rendezvous")
    if rendezvous is not None and not isinstance(rendezvous, Rendezvous):
        raise ConfigError(
            f"rendezvous must be a corral.Rendezvous, not {type(rendezvous).__name__}"
        )
    hang_timeout = options.get("hang_timeout")
    if hang_timeout is not None:
        hang_timeout = _seconds(hang_timeout, "hang_timeout")
        if hang_timeout <= 0:
            raise ConfigError(f"hang_timeout must be > 0 seconds (or None), not {hang_timeout!r}")
    max_restarts = _count(options.get("max_restarts", 0), "max_restarts")
    backoff = _seconds(options.get("restart_backoff", 1.0), "restart_backoff")
    backoff_max = _seconds(options.get("restart_backoff_max", 30.0), "restart_backoff_max")
    is_callable = not isinstance(entrypoint, (str, os.PathLike)) and callable(entrypoint)
    n = _nprocs(nprocs, args, envs)
    per_rank_args = _per_rank_args(args, n, is_callable)
    common_env = _env(env, "env")
    per_rank_env = _per_rank_env(envs, n)
    redirect_map = _std_map(redirects, n, "redirects")
    tee_map = _std_map(tee, n, "tee")
    watch_map = _std_map(watch, n, "watch")
    ready_line = options.get("ready_line")
    if ready_line is not None:
        if not isinstance(ready_line, str) or not ready_line or "\n" in ready_line:
            raise ConfigError(f"ready_line must be a non-empty one-line str, not {ready_line!r}")
        watch_map = {r: s | Std.OUT for r, s in watch_map.items()}
    ready_fd = options.get("ready_fd", False)
    if not isinstance(ready_fd, bool):
        raise ConfigError(f"ready_fd must be True or False, not {ready_fd!r}")
    console_ranks = _tee_ranks(tee_ranks, n)
    _check_prefix(prefix)
    grace = _grace(grace)
    work_dir = _cwd(cwd)
    call: _callable.CallSpec | None = None
    base_argv: tuple[str, ...] = ()
    if is_callable:
        call = _callable.prepare(cast("Callable[..., object]", entrypoint), per_rank_args)
    else:
        base_argv = _command(entrypoint)
    root, made = _log_dir(log_dir, n)
    if max_restarts and not made:
        taken = [f for f in range(1, max_restarts + 1) if (root / attempt_folder(f)).exists()]
        if taken:
            raise ConfigError(
                f"log_dir {str(root)!r} already holds {attempt_folder(taken[0])}: the logs of "
                "an earlier run with restarts; corral never overwrites logs: choose a new log_dir"
            )

    token = os.urandom(8).hex()  # what secrets.token_hex does, without importing hmac
    parent_env = dict(os.environ)
    shared_env = _shared_env(n, token, parent_env, common_env, per_rank_env)
    shared_env["TORCHELASTIC_MAX_RESTARTS"] = str(max_restarts)
    ranks: list[RankPlan] = []
    created: list[Path] = []
    try:
        for rank in range(n):
            rank_dir = root / str(rank)
            rank_dir.mkdir()
            created.append(rank_dir)
            streams_tee = tee_map[rank]
            streams_file = redirect_map[rank] | streams_tee | watch_map[rank]
            if rank not in console_ranks:
                streams_tee = Std.NONE
            logs = RankLogs(
                stdout=rank_dir / "stdout.log" if streams_file & Std.OUT else None,
                stderr=rank_dir / "stderr.log" if streams_file & Std.ERR else None,
                error_file=rank_dir / "error.json",
            )
            child_env = dict(parent_env)
            child_env.update(shared_env)
            child_env.update(
                ROLE_RANK=str(rank),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n),
                CORRAL_RANK=str(rank),
                CORRAL_NPROCS=str(n),
                CORRAL_ERROR_FILE=str(logs.error_file),
                TORCHELASTIC_ERROR_FILE=str(logs.error_file),
                CORRAL_HEARTBEAT_FILE=str(rank_dir / HEARTBEAT_FILE),
            )
            child_env.update(common_env)
            child_env.update(per_rank_env.get(rank, {}))
            # Set last: containment depends on it, so the user cannot unset it.
            # Started from inside another group's rank, keep that group's token
            # too: the outer group must still find (and end) these ranks.
            outer = parent_env.get(GROUP_ENV)
            child_env[GROUP_ENV] = f"{outer}:{token}" if outer else token
            if call is not None:
                argv, result_file = call.rank_argv(rank, per_rank_args[rank], rank_dir)
            else:
                argv = base_argv + tuple(str(a) for a in per_rank_args[rank])
                result_file = None
            ranks.append(
                RankPlan(
                    rank=rank,
                    argv=argv,
                    env=child_env,
                    dir=rank_dir,
                    logs=logs,
                    redirect=streams_file,
                    tee=streams_tee,
                    result_file=result_file,
                    watch=watch_map[rank],
                )
            )
            _check_exec_size(rank, argv, child_env)
    except ConfigError:
        _remove(created + made)
        raise
    except OSError as exc:
        _remove(created + made)
        raise ConfigError(f"cannot create the rank folders in {root}: {exc}") from exc
    return GroupPlan(
        nprocs=n,
        ranks=tuple(ranks),
        log_dir=root,
        grace=grace,
        prefix=prefix,
        cwd=work_dir,
        token=token,
        is_callable=is_callable,
        pid_namespace=pid_namespace,
        max_restarts=max_restarts,
        restart_backoff=backoff,
        restart_backoff_max=max(backoff, backoff_max),
        rendezvous=rendezvous,
        hang_timeout=hang_timeout,
        ready_line=None if ready_line is None else ready_line.encode(),
        ready_fd=ready_fd,
        report=_report_path(root),
    )


def with_world(plan: GroupPlan, world: World) -> GroupPlan:
    """``plan`` for this node of ``world``: global ranks, the round's master, run id."""
    ranks = []
    for rp in plan.ranks:
        env = dict(rp.env)
        env.update(world.env(rp.rank))
        ranks.append(replace(rp, env=env))
    return replace(plan, ranks=tuple(ranks))


#: The run report in ``log_dir`` (see ``_report``): never overwritten.
REPORT_FILE: Final = "report.json"


def _report_path(root: Path) -> Path:
    """``root/report.json``, or the first ``report-N.json`` (N = 2, 3...) not there yet."""
    path = root / REPORT_FILE
    k = 1
    while path.exists():
        k += 1
        path = root / f"report-{k}.json"
    return path


def attempt_folder(attempt: int) -> str:
    """The sub-folder of ``log_dir`` holding a restart's rank folders."""
    return f"attempt-{attempt}"


def next_attempt(plan: GroupPlan, attempt: int) -> GroupPlan:
    """``plan`` for restart number ``attempt``: new log folders, the restart count in the env.

    Attempt 0 writes ``{log_dir}/{rank}/``; attempt K writes
    ``{log_dir}/attempt-K/{rank}/``, so no attempt's logs are overwritten.

    Raises:
        ConfigError: the folders cannot be created (or already exist).
    """
    root = plan.log_dir / attempt_folder(attempt)
    try:
        root.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot create {root} for attempt {attempt}: {exc}") from exc
    ranks = []
    for rp in plan.ranks:
        rank_dir = root / str(rp.rank)
        rank_dir.mkdir()
        logs = RankLogs(
            stdout=rank_dir / "stdout.log" if rp.logs.stdout else None,
            stderr=rank_dir / "stderr.log" if rp.logs.stderr else None,
            error_file=rank_dir / "error.json",
        )
        env = dict(rp.env)
        env.update(
            CORRAL_ERROR_FILE=str(logs.error_file),
            TORCHELASTIC_ERROR_FILE=str(logs.error_file),
            CORRAL_HEARTBEAT_FILE=str(rank_dir / HEARTBEAT_FILE),
            TORCHELASTIC_RESTART_COUNT=str(attempt),
        )
        argv, result_file = rp.argv, rp.result_file
        if result_file is not None:  # a callable: its call file moves with it
            argv, result_file = _callable.moved(argv, rp.dir, rank_dir)
        ranks.append(
            replace(rp, argv=argv, env=env, dir=rank_dir, logs=logs, result_file=result_file)
        )
    return replace(plan, ranks=tuple(ranks))


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a whole number >= 0, not {value!r}")
    return value


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be finite and >= 0, not {value!r}")
    return float(value)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def master_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, each unless a layer sets it.

    The torch-ready rendezvous of ``torchrun --standalone``: the CLI and
    :func:`corral.spawn` both use it, so a ``torch.distributed`` script's
    ``init_process_group()`` works unchanged.
    """
    out: dict[str, str] = {}
    if not any("MASTER_ADDR" in layer for layer in layers):
        out["MASTER_ADDR"] = "127.0.0.1"
    if not any("MASTER_PORT" in layer for layer in layers):
        out["MASTER_PORT"] = str(free_port())
    return out


def _shared_env(
    n: int,
    run_id: str,
    parent_env: Mapping[str, str],
    common_env: Mapping[str, str],
    per_rank_env: Mapping[int, Mapping[str, str]],
) -> dict[str, str]:
    """The variables every rank gets at the rank-variables level (torchrun parity).

    ``env``/``envs`` still override each of them; the ones torchrun only sets
    when the user has not (unbuffered Python, OMP_NUM_THREADS, MASTER_*) are
    left out when the parent's environment has them.
    """
    shared = {
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
        "ROLE_NAME": ROLE_NAME,
        "ROLE_WORLD_SIZE": str(n),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }
    layers = (parent_env, common_env, *per_rank_env.values())
    # Python ranks write to pipes: without this, print() shows nothing until exit.
    if "PYTHONUNBUFFERED" not in parent_env:
        shared["PYTHONUNBUFFERED"] = "1"
    if n > 1 and not any("OMP_NUM_THREADS" in layer for layer in layers):
        shared["OMP_NUM_THREADS"] = "1"
        _log.info("corral: %s", OMP_NOTE)
    shared.update(master_env(*layers))
    return shared


def _remove(created: list[Path]) -> None:
    """Undo the folders made so far, deepest first (they hold nothing of the user's)."""
    for path in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            for child in path.iterdir():
                if child.is_file():
                    child.unlink()
            path.rmdir()


def _check_exec_size(rank: int, argv: Sequence[str], env: Mapping[str, str]) -> None:
    """What ``execve`` would refuse (``E2BIG``) is a ConfigError naming the rank and variable.

    Sizes are counted in characters first: UTF-8 takes at most 4 bytes per
    character, so only a rank within 4x of a limit pays for exact byte counts.
    """
    strings = [*argv, *(f"{k}={v}" for k, v in env.items())]
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = -1
    pointer = 8
    rough = sum(len(x) + 1 + pointer for x in strings)
    longest = max((len(x) for x in strings), default=0)
    if (limit <= 0 or 4 * rough <= limit) and 4 * longest < _MAX_ARG_STRLEN:
        return
    if sys.platform.startswith("linux"):
        for i, arg in enumerate(argv):
            if len(os.fsencode(arg)) + 1 > _MAX_ARG_STRLEN:
                raise ConfigError(
                    f"rank {rank}: argument {i} is {len(arg)} characters long; the kernel "
                    f"takes at most {_MAX_ARG_STRLEN - 1} bytes per argument"
                )
        for key, value in env.items():
            if len(os.fsencode(f"{key}={value}")) + 1 > _MAX_ARG_STRLEN:
                raise ConfigError(
                    f"rank {rank}: environment variable {key} is {len(value)} characters long; "
                    f"the kernel takes at most {_MAX_ARG_STRLEN - 1} bytes per variable"
                )
    size = sum(len(os.fsencode(x)) + 1 + pointer for x in strings)
    if limit > 0 and size > limit:
        largest = sorted(env, key=lambda k: len(env[k]), reverse=True)[:3]
        raise ConfigError(
            f"rank {rank}: its arguments and environment take {size} bytes; the kernel takes "
            f"at most {limit} (ARG_MAX); the largest variables: {', '.join(largest)}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nprocs(
    nprocs: object,
    args: object,
    envs: object,
) -> int:
    if nprocs is None:
        for name, value in (("args", args), ("envs", envs)):
            if isinstance(value, Mapping):
                if not value:
                    raise ConfigError(f"{name} is an empty mapping: there must be at least 1 rank")
                return _nprocs(len(value), None, None)
        raise ConfigError("nprocs is required unless args or envs is a per-rank mapping")
    if not _is_int(nprocs):
        raise ConfigError(f"nprocs must be an int, not {type(nprocs).__name__}")
    assert isinstance(nprocs, int)
    if nprocs < 1:
        raise ConfigError(f"nprocs must be at least 1, got {nprocs}")
    if nprocs > MAX_NPROCS:
        raise ConfigError(
            f"nprocs={nprocs} is more than corral's limit of {MAX_NPROCS} ranks per group "
            "(one process and up to 5 file descriptors each)"
        )
    return nprocs


def _check_ranks(keys: Collection[object], n: int, name: str) -> None:
    """A per-rank mapping must name exactly the ranks 0..n-1."""
    bad = sorted((repr(k) for k in keys if not _is_int(k)), key=str)
    if bad:
        raise ConfigError(f"{name} keys must be int ranks; bad keys: {', '.join(bad)}")
    ints = {k for k in keys if isinstance(k, int)}
    missing = sorted(set(range(n)) - ints)
    extra = sorted(ints - set(range(n)))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing ranks {missing}")
        if extra:
            parts.append(f"ranks outside 0..{n - 1}: {extra}")
        raise ConfigError(f"{name} must name exactly ranks 0..{n - 1} ({'; '.join(parts)})")


def _per_rank_args(args: object, n: int, is_callable: bool) -> dict[int, tuple[object, ...]]:
    def one(value: object, where: str) -> tuple[object, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(
                f"{where} must be a sequence (list or tuple), not {type(value).__name__}"
            )
        items = tuple(value)
        if not is_callable:
            for item in items:
                if not isinstance(item, (str, os.PathLike)):
                    raise ConfigError(
                        f"{where} holds {item!r}: command arguments must be str or path"
                    )
        return items

    if args is None:
        return dict.fromkeys(range(n), ())
    if isinstance(args, Mapping):
        _check_ranks(args.keys(), n, "args")
        return {rank: one(args[rank], f"args[{rank}]") for rank in range(n)}
    common = one(args, "args")
    return dict.fromkeys(range(n), common)


def _env(env: object, where: str) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise ConfigError(f"{where} must be a mapping of str to str, not {type(env).__name__}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"{where} has a bad variable name {key!r}")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"{where}[{key!r}] must be a str without NUL, got {value!r}")
        out[key] = value
    return out


def _per_rank_env(envs: object, n: int) -> dict[int, dict[str, str]]:
    if envs is None:
        return {}
    if not isinstance(envs, Mapping):
        raise ConfigError(f"envs must be a mapping rank -> variables, not {type(envs).__name__}")
    _check_ranks(envs.keys(), n, "envs")
    return {rank: _env(envs[rank], f"envs[{rank}]") for rank in range(n)}


def _std_one(value: object, where: str) -> Std:
    if isinstance(value, Std):
        return value
    if _is_int(value):
        assert isinstance(value, int)
        if 0 <= value <= 3:
            return Std(value)
        raise ConfigError(f"{where}: {value} is not a Std value (0-3)")
    if isinstance(value, str):
        parsed = Std.parse(value)
        if isinstance(parsed, Std):
            return parsed
        raise ConfigError(f"{where}: {value!r} is a per-rank spec where one value was expected")
    raise ConfigError(f"{where} must be a Std, an int 0-3 or a str, not {type(value).__name__}")


def _std_map(spec: object, n: int, name: str) -> dict[int, Std]:
    if isinstance(spec, str):
        spec = Std.parse(spec)
    if isinstance(spec, Mapping):
        bad = [k for k in spec if not _is_int(k) or not 0 <= k < n]
        if bad:
            raise ConfigError(f"{name} names ranks outside 0..{n - 1}: {', '.join(map(repr, bad))}")
        out = dict.fromkeys(range(n), Std.NONE)
        for rank, value in spec.items():
            out[rank] = _std_one(value, f"{name}[{rank}]")
        return out
    return dict.fromkeys(range(n), _std_one(spec, name))


def _tee_ranks(tee_ranks: object, n: int) -> frozenset[int]:
    if tee_ranks is None:
        return frozenset(range(n))
    if isinstance(tee_ranks, (str, bytes)) or not isinstance(tee_ranks, Collection):
        raise ConfigError(
            f"tee_ranks must be None or a collection of ranks, not {type(tee_ranks).__name__}"
        )
    bad = [r for r in tee_ranks if not _is_int(r) or not 0 <= r < n]
    if bad:
        raise ConfigError(f"tee_ranks names ranks outside 0..{n - 1}: {', '.join(map(repr, bad))}")
    return frozenset(tee_ranks)


def _check_prefix(prefix: object) -> None:
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a str, not {type(prefix).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prefix) if f is not None]
        unknown = sorted({f for f in fields if f not in _PREFIX_FIELDS})
        if unknown:
            raise ConfigError(
                f"prefix {prefix!r} uses unknown field(s) {', '.join(unknown)}; "
                "only {rank} and {stream} are available"
            )
        prefix.format(rank=0, stream="out")
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ConfigError(f"bad prefix {prefix!r}: {exc}") from exc


def _grace(grace: object) -> float:
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise ConfigError(f"grace must be a number of seconds, not {type(grace).__name__}")
    value = float(grace)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"grace must be a finite number >= 0, got {grace!r}")
    return value


def _cwd(cwd: object) -> Path | None:
    if cwd is None:
        return None
    if not isinstance(cwd, (str, os.PathLike)):
        raise ConfigError(f"cwd must be a path, not {type(cwd).__name__}")
    path = Path(cwd)
    if not path.is_dir():
        raise ConfigError(f"cwd {str(path)!r} is not an existing directory")
    return path


def _command(entrypoint: object) -> tuple[str, ...]:
    if isinstance(entrypoint, (str, os.PathLike)):
        argv: tuple[object, ...] = (entrypoint,)
    elif isinstance(entrypoint, bytes) or not isinstance(entrypoint, Sequence):
        raise ConfigError(
            "entrypoint must be a command (str, path or argv sequence) or a callable, "
            f"not {type(entrypoint).__name__}"
        )
    else:
        argv = tuple(entrypoint)
    if not argv:
        raise ConfigError("entrypoint is an empty argv: name the program to run")
    for item in argv:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"entrypoint argv holds {item!r}: every item must be a str or path")
    out = tuple(os.fspath(a) for a in argv if isinstance(a, (str, os.PathLike)))
    if not out[0]:
        raise ConfigError("entrypoint names an empty program")
    if any("\0" in a for a in out):
        raise ConfigError("entrypoint argv holds a NUL character")
    return out


def _log_dir(log_dir: object, n: int) -> tuple[Path, list[Path]]:
    """Check ``log_dir`` and create it (last step of validation).

    Returns:
        The folder, and the folders created for it (to remove if a later
        step fails: a failed ``spawn`` changes nothing).
    """
    if log_dir is None:
        try:
            import tempfile  # lazy: only a default log_dir needs it

            root = Path(tempfile.mkdtemp(prefix="corral-"))
        except OSError as exc:
            raise ConfigError(f"cannot create a temporary log_dir: {exc}") from exc
        return root, [root]
    if not isinstance(log_dir, (str, os.PathLike)):
        raise ConfigError(f"log_dir must be a path, not {type(log_dir).__name__}")
    text = os.fspath(log_dir)
    if not text:
        raise ConfigError("log_dir is an empty path: name a folder (or pass None for a fresh one)")
    if "\0" in str(text):
        raise ConfigError(f"log_dir {text!r} holds a NUL character")
    if RUN_FIELD in text:
        return _numbered_log_dir(text)
    root = Path(text)
    try:
        if root.is_dir():
            taken = [str(r) for r in range(n) if (root / str(r)).exists()]
            if taken:
                raise ConfigError(
                    f"log_dir {str(root)!r} already holds rank folder(s) {', '.join(taken)}; "
                    "corral never overwrites logs: choose a new log_dir, or put {run} in it "
                    f"({str(root / 'run-{run}')!r}) to number the runs 1, 2, 3..."
                )
            return root, []
        if root.exists():
            raise ConfigError(f"log_dir {str(root)!r} exists and is not a directory")
        missing = [root, *(p for p in root.parents if not p.exists())]
        root.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"cannot create log_dir {str(root)!r}: {exc.strerror or exc}") from exc
    return root, missing


def _numbered_log_dir(template: str) -> tuple[Path, list[Path]]:
    """The first ``template`` with ``{run}`` = 1, 2, 3... that does not exist yet, created.

    Each candidate is created exclusively, so two runs started at once never
    share a folder.
    """
    for k in itertools.count(1):
        root = Path(template.replace(RUN_FIELD, str(k)))
        missing = [p for p in root.parents if not p.exists()]
        try:
            root.mkdir(parents=True)
        except FileExistsError:  # an earlier run's (or anything else's): the next number
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot create log_dir {str(root)!r}: {exc.strerror or exc}"
            ) from exc
        return root, [root, *missing]
    raise AssertionError("unreachable")  # pragma: no cover


SpawnOptions.__module__ = "corral"
