"""One benchmark case, run in a fresh process: ``_worker.py SPEC_JSON``.

Every (scenario, implementation) pair runs in its own interpreter, so that one
implementation's imports, threads and memory never show up in another's
figures, and torch is imported only by the torch worker. The worker's stdout
is the "console" of the tee (``/dev/null``, or a pipe the orchestrator reads to
time the tee's latency); it writes its samples as JSON to ``spec["out"]``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _workloads as W

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

BENCH_DIR = str(Path(__file__).resolve().parent)
#: Pause between "every peer is up" and the failure (see _trigger_fail).
SETTLE = 0.05
Samples = dict[str, list[float]]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _argvs(spec: dict[str, Any], tmp: Path) -> list[list[str]]:
    """The per-rank argv of a scenario."""
    p = spec["params"]
    n = p.get("n", 1)
    sc = spec["scenario"]
    if sc == "launch":
        argv = [W.TRUE] if p["cmd"] == "true" else [W.PY, "-c", "pass"]
        return [list(argv) for _ in range(n)]
    if sc == "fail":
        ready = tmp / "ready"
        ready.mkdir(exist_ok=True)
        rank0 = [W.PY, "-c", W.FAIL_RANK0, str(tmp / "fifo"), str(tmp / "stamp")]
        peer = [W.SH, "-c", W.IGNORE_TERM if p["ignore_term"] else W.PEER, "sh", str(ready)]
        return [rank0] + [list(peer) for _ in range(n - 1)]
    if sc == "tee":
        return [[W.PY, "-c", W.WRITER, str(p["mib"])]]
    if sc == "latency":
        return [[W.PY, "-c", W.LATENCY, str(p["count"])]]
    if sc == "scale":
        return [[W.SLEEP, "1000"] for _ in range(n)]
    if sc == "callables":
        return [[W.PY, "-c", "import _workloads; _workloads.trivial(1)"] for _ in range(n)]
    raise ValueError(sc)


def _tee_flag(spec: dict[str, Any]) -> bool:
    sc, p = spec["scenario"], spec["params"]
    if sc == "launch":
        return bool(p["tee"])
    if sc == "tee":
        return p["mode"] == "tee"
    return sc in ("latency", "scale")


def _trigger_fail(tmp: Path, n: int) -> None:
    """Release rank 0 (the open blocks until it reads) once the group has settled.

    The peers must all be up ("rank 0 exits while the others sleep"), then
    the harness waits ``SETTLE`` more, the same for every implementation: what
    is measured is the teardown of a running group, not start-up work still
    in flight (corral's watchdog takes ~7 ms of CPU to start; on 2 cores,
    failing before it is done adds up to ~3 ms to corral's teardown).
    """
    ready = tmp / "ready"
    while len(os.listdir(ready)) < n - 1:
        time.sleep(0.001)
    time.sleep(SETTLE)
    with open(tmp / "fifo", "wb") as f:
        f.write(b"go")


def _stamp(tmp: Path) -> float:
    return float((tmp / "stamp").read_text())


# -- corral ------------------------------------------------------------------
def run_corral(spec: dict[str, Any], reps: int) -> Samples:
    if spec["params"].get("backend") == "trio":  # the same calls, awaited from trio
        import anyio

        samples: Samples = anyio.run(_corral, spec, reps, backend="trio")
        return samples
    return asyncio.run(_corral(spec, reps))


async def _corral(spec: dict[str, Any], reps: int) -> Samples:
    import corral

    sc, p = spec["scenario"], spec["params"]
    out: Samples = {}
    env = {"PYTHONPATH": BENCH_DIR}
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="corral-bench-") as d:
            tmp = Path(d)
            argvs = _argvs(spec, tmp)
            std = corral.Std.ALL
            tee = std if _tee_flag(spec) else corral.Std.NONE
            logs = tmp / "logs"
            if sc == "launch":
                t0 = time.perf_counter()
                res = await corral.run(
                    argvs[0], nprocs=len(argvs), log_dir=logs, redirects=std, tee=tee
                )
                _add(out, "seconds", time.perf_counter() - t0)
                assert res.ok, res
            elif sc == "fail":
                os.mkfifo(tmp / "fifo")
                grace = p["grace"]
                group = _fail_group(corral, argvs, logs, grace)
                async with group:
                    _trigger_fail(tmp, len(argvs))
                    res = await group.wait()
                    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
                assert 0 in res.failures, res
                _add(out, "seconds", t1 - _stamp(tmp))
            elif sc in ("tee", "latency"):
                c0, t0 = _cpu(), time.perf_counter()
                redirect = std if sc == "latency" or p["mode"] == "tee" else corral.Std.OUT
                res = await corral.run(
                    argvs[0], nprocs=1, log_dir=logs, redirects=redirect, tee=tee
                )
                _tput(out, spec, time.perf_counter() - t0, _cpu() - c0)
                assert res.ok, res
            elif sc == "scale":
                async with corral.spawn(
                    argvs[0], nprocs=len(argvs), log_dir=logs, tee=tee, grace=5
                ) as g:
                    await asyncio.sleep(0.3)
                    c0, t0 = _cpu(), time.perf_counter()
                    await asyncio.sleep(1.0)
                    _idle(out, time.perf_counter() - t0, _cpu() - c0)
                    t0 = time.perf_counter()
                    await g.close()
                    _add(out, "close_s", time.perf_counter() - t0)
            elif sc == "callables":
                t0 = time.perf_counter()
                res = await corral.run(
                    W.trivial, nprocs=len(argvs), args=(1,), env=env, log_dir=logs, redirects=std
                )
                _add(out, "seconds", time.perf_counter() - t0)
                _check(res.ok and res.return_values == dict.fromkeys(range(len(argvs)), 2), res)
    return out


def _fail_group(corral: Any, argvs: list[list[str]], logs: Path, grace: float) -> Any:
    """Rank 0 and the peers run different programs: one argv per rank via a tiny dispatcher."""
    # corral takes one entrypoint plus per-rank args: use /bin/sh as a common
    # entrypoint only for the argv shape; exec replaces it at once.
    args = {i: ["-c", 'exec "$@"', "sh", *a] for i, a in enumerate(argvs)}
    return corral.spawn(W.SH, args=args, log_dir=logs, redirects=corral.Std.ALL, grace=grace)


# -- torch --------------------------------------------------------------------
def run_torch(spec: dict[str, Any], reps: int) -> Samples:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes

    sc, p = spec["scenario"], spec["params"]
    out: Samples = {}
    for rep in range(reps):
        with tempfile.TemporaryDirectory(prefix="torch-bench-") as d:
            tmp = Path(d)
            argvs = _argvs(spec, tmp)
            n = len(argvs)
            redirect = Std.ALL
            if sc == "tee" and p["mode"] == "redirect":
                redirect = Std.OUT
            tee = Std.ALL if _tee_flag(spec) else Std.NONE
            if sc == "tee" and p["mode"] == "tee":
                tee = Std.OUT
            specs = DefaultLogsSpecs(log_dir=str(tmp / "logs"), redirects=redirect, tee=tee)
            envs = {i: {"RANK": str(i), "PYTHONPATH": BENCH_DIR} for i in range(n)}

            def start(
                entry: Any,
                args: dict[int, tuple[Any, ...]],
                rep: int = rep,
                envs: dict[int, dict[str, str]] = envs,
                specs: Any = specs,
            ) -> Any:
                return start_processes(
                    name=f"bench{rep}", entrypoint=entry, args=args, envs=envs, logs_specs=specs
                )

            cmd_args = {i: tuple(a[1:]) for i, a in enumerate(argvs)}
            if sc in ("launch", "tee", "latency"):
                c0, t0 = _cpu(), time.perf_counter()
                pc = start(argvs[0][0], cmd_args)
                res = pc.wait(period=0.1)
                pc.close()
                dt, dc = time.perf_counter() - t0, _cpu() - c0
                _check(res is not None and not res.is_failed(), res)
                if sc == "launch":
                    _add(out, "seconds", dt)
                else:
                    _tput(out, spec, dt, dc)
            elif sc == "fail":
                os.mkfifo(tmp / "fifo")
                # torch's entrypoint is one program: the same sh dispatcher as corral's.
                args = {i: ("-c", 'exec "$@"', "sh", *a) for i, a in enumerate(argvs)}
                pc = start(W.SH, args)
                grace = p["grace"]
                close = pc.close
                # PContext.wait closes the others with close()'s default 30 s
                # grace; give it the scenario's grace instead.
                pc.close = functools.partial(close, timeout=grace)
                _trigger_fail(tmp, n)
                res = pc.wait(period=0.1)
                t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
                _check(res is not None and 0 in res.failures, res)
                _add(out, "seconds", t1 - _stamp(tmp))
            elif sc == "scale":
                pc = start(argvs[0][0], cmd_args)
                time.sleep(0.3)
                c0, t0 = _cpu(), time.perf_counter()
                time.sleep(1.0)
                _idle(out, time.perf_counter() - t0, _cpu() - c0)
                t0 = time.perf_counter()
                pc.close(timeout=5)
                _add(out, "close_s", time.perf_counter() - t0)
            elif sc == "callables":
                t0 = time.perf_counter()
                pc = start(W.trivial, dict.fromkeys(range(n), (1,)))
                res = pc.wait(period=0.1)
                pc.close()
                _add(out, "seconds", time.perf_counter() - t0)
                _check(res is not None and res.return_values == dict.fromkeys(range(n), 2), res)
    return out


# -- raw ------------------------------------------------------------------------
def run_raw(spec: dict[str, Any], reps: int) -> Samples:
    from _raw import RawGroup

    sc, p = spec["scenario"], spec["params"]
    out: Samples = {}
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="raw-bench-") as d:
            tmp = Path(d)
            argvs = _argvs(spec, tmp)
            n = len(argvs)
            envs = [{**os.environ, "RANK": str(i), "PYTHONPATH": BENCH_DIR} for i in range(n)]
            g = RawGroup(argvs, envs, tmp / "logs", tee=_tee_flag(spec))
            if sc in ("launch", "callables"):
                t0 = time.perf_counter()
                g.start()
                codes = g.wait()
                _add(out, "seconds", time.perf_counter() - t0)
                assert not any(codes.values()), codes
            elif sc == "fail":
                os.mkfifo(tmp / "fifo")
                g.start()
                _trigger_fail(tmp, n)
                codes = g.wait(grace=p["grace"])
                t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
                assert codes[0] == 1, codes
                _add(out, "seconds", t1 - _stamp(tmp))
            elif sc in ("tee", "latency"):
                c0, t0 = _cpu(), time.perf_counter()
                g.start()
                codes = g.wait()
                _tput(out, spec, time.perf_counter() - t0, _cpu() - c0)
                assert not any(codes.values()), codes
            elif sc == "scale":
                g.start()
                time.sleep(0.3)
                c0, t0 = _cpu(), time.perf_counter()
                end = t0 + 1.0
                while (left := end - time.perf_counter()) > 0:
                    g._pump(left)
                _idle(out, time.perf_counter() - t0, _cpu() - c0)
                t0 = time.perf_counter()
                g.close(5.0)
                _add(out, "close_s", time.perf_counter() - t0)
    return out


# -- helpers ----------------------------------------------------------------------
def _check(ok: object, result: object) -> None:
    if not ok:
        raise AssertionError(f"unexpected result: {result!r}")


def _add(out: Samples, key: str, value: float) -> None:
    out.setdefault(key, []).append(value)


def _tput(out: Samples, spec: dict[str, Any], wall: float, cpu: float) -> None:
    if spec["scenario"] != "tee":
        return
    mib = spec["params"]["mib"] * 1048600 / 1048576
    _add(out, "mib_s", mib / wall)
    _add(out, "cpu_s_per_gib", cpu / (mib / 1024))


def _idle(out: Samples, wall: float, cpu: float) -> None:
    _add(out, "rss_mib", _status("VmRSS") / 1024)
    _add(out, "threads", float(_status("Threads")))
    _add(out, "fds", float(len(os.listdir("/proc/self/fd"))))
    _add(out, "idle_cpu_pct", 100 * cpu / wall)


RUNNERS: dict[str, Callable[[dict[str, Any], int], Samples]] = {
    "corral": run_corral,
    "torch": run_torch,
    "raw": run_raw,
}


def main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[1])
    _raise_nofile()
    result: dict[str, Any] = {}
    try:
        result["samples"] = RUNNERS[spec["impl"]](spec, spec["reps"])
    except Exception:
        result["error"] = traceback.format_exc()
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
