"""The run report: ``{log_dir}/report.json``, written as the group closes.

One JSON document per group, for CI systems and dashboards: what ran, when,
each rank of each attempt (pid, start and end times, exit code, how it ended,
its log files), the root cause, the multi-node world. Its ``format`` field
is versioned; fields are only ever added.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Final

from ._config import REPORT_FILE

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ._config import GroupPlan
    from ._events import Event
    from ._result import Failure, Result

__all__ = ("REPORT_FILE", "write_report")

FORMAT: Final = "corral-report/1"

_log = logging.getLogger("corral")


def write_report(
    path: Path,
    *,
    plan: GroupPlan,
    result: Result | None,
    history: Sequence[Event],
    world: dict[str, object] | None,
) -> None:
    """Write the report atomically (a reader never sees half of it); never raises."""
    try:
        text = json.dumps(
            _report(plan, result, history, world), indent=2, default=str, sort_keys=False
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as exc:  # a report must never fail a close
        _log.warning("corral: could not write the run report %s: %s", path, exc)


def _report(
    plan: GroupPlan,
    result: Result | None,
    history: Sequence[Event],
    world: dict[str, object] | None,
) -> dict[str, object]:
    started = history[0].time if history else None
    ended = history[-1].time if history else time.time()
    results = [] if result is None else [*result.previous, result]
    root = None if result is None else result.root_cause
    return {
        "format": FORMAT,
        "corral": getattr(sys.modules.get("corral"), "__version__", None),
        "command": list(plan.ranks[0].argv) if plan.ranks else [],
        "nprocs": plan.nprocs,
        "log_dir": str(plan.log_dir),
        "started": started,
        "ended": ended,
        "duration": None if started is None else round(ended - started, 6),
        "ok": result is not None and result.ok,
        "root_cause": None if root is None else _failure(root),
        "attempts": [_attempt(k, r, history) for k, r in enumerate(results)],
        "max_restarts": plan.max_restarts,
        "world": world,
        "error": next(
            (e.detail.get("error") for e in history if e.kind == "closed" and e.detail), None
        ),
    }


def _attempt(k: int, result: Result, history: Sequence[Event]) -> dict[str, object]:
    times: dict[tuple[str, int], float] = {}
    for e in history:
        if e.attempt == k and e.rank is not None and e.kind in ("start", "exit"):
            times[(e.kind, e.rank)] = e.time
    ranks = []
    for rank in sorted(result.exit_codes):
        code = result.exit_codes[rank]
        logs = result.logs.get(rank)
        start, end = times.get(("start", rank)), times.get(("exit", rank))
        ranks.append(
            {
                "rank": rank,
                "pid": result.pids.get(rank),
                "exitcode": code,
                "ended": "failed"
                if rank in result.failures
                else "terminated"
                if rank in result.terminated
                else "ok",
                "started": start,
                "exited": end,
                "duration": None if start is None or end is None else round(end - start, 6),
                "stdout": None if logs is None or logs.stdout is None else str(logs.stdout),
                "stderr": None if logs is None or logs.stderr is None else str(logs.stderr),
                "error_file": None if logs is None else str(logs.error_file),
                "stacks": str(result.stacks[rank]) if rank in result.stacks else None,
            }
        )
    root = result.root_cause
    return {
        "attempt": k,
        "ok": result.ok,
        "root_cause": None if root is None else _failure(root),
        "ranks": ranks,
    }


def _failure(f: Failure) -> dict[str, object]:
    return {
        "rank": f.rank,
        "global_rank": f.global_rank,
        "node": f.node,
        "host": f.host,
        "pid": f.pid,
        "exitcode": f.exitcode,
        "signal": f.signal,
        "timestamp": f.timestamp,
        "message": f.message,
        "waited_on_peer": f.waited_on_peer,
        "error_file": None if f.error_file is None else str(f.error_file),
    }
