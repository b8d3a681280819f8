#!/usr/bin/env python3
"""corral's benchmark suite: corral against torch.distributed.elastic and a raw floor.

Usage::

    python benchmarks/run.py            # the full suite (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run (CI), well under a minute
    python benchmarks/run.py --only fail,tee --json out.json

Every (scenario, implementation) runs in a fresh interpreter (``_worker.py``),
so imports, threads and memory of one never leak into another's figures. The
three implementations:

* ``corral``: this library, from the spawn/run call to the ``Result``;
* ``torch``: ``torch.distributed.elastic.multiprocessing.start_processes``
  polled with ``wait(period=0.1)`` (torchrun's default monitor interval) and
  ``close()``; shown as "not installed" when torch does not import;
* ``raw``: ``os.posix_spawn(setsid=True)`` + ``os.pidfd_open`` + ``select.epoll``
  with no library (``_raw.py``): what the machine allows.

Each row prints the median, min and max over repetitions and the ratios
corral/torch and corral/raw of the medians. The machine may be shared: medians
are the figure to read; min/max show the noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
IMPLS = ("corral", "torch", "raw")


# -- what to run ----------------------------------------------------------------
Target = Callable[[float, float | None, float | None], tuple[str, bool | None]]


@dataclass
class Row:
    """One metric of one case, as printed in the table."""

    label: str
    metric: str
    unit: str
    scale: float = 1.0  # multiply raw samples by this for display
    higher_is_better: bool = False
    target: Target | None = None
    offset: float = 0.0  # subtracted from every sample before scaling (e.g. grace)
    values: dict[str, list[float] | str] = field(default_factory=dict)


@dataclass
class Case:
    scenario: str
    params: dict[str, Any]
    reps: int
    rows: list[Row]
    rounds: int = 1  # interleaved rounds: each runs reps/rounds repetitions per implementation
    impls: tuple[str, ...] = IMPLS
    timeout: float = 300.0


def le_x_raw(factor: float) -> Target:
    def t(c: float, _t: float | None, r: float | None) -> tuple[str, bool | None]:
        return f"<= {factor:g}x raw", (None if r is None else c <= factor * r)

    return t


def ge_x_raw(factor: float) -> Target:
    def t(c: float, _t: float | None, r: float | None) -> tuple[str, bool | None]:
        return f">= {factor:g}x raw", (None if r is None else c >= factor * r)

    return t


def le_x_torch(factor: float) -> Target:
    def t(c: float, tt: float | None, _r: float | None) -> tuple[str, bool | None]:
        return f"<= {factor:g}x torch", (None if tt is None else c <= factor * tt)

    return t


def le(limit: float, unit: str) -> Target:
    def t(c: float, _t: float | None, _r: float | None) -> tuple[str, bool | None]:
        return f"<= {limit:g} {unit}", c <= limit

    return t


def ge(limit: float, unit: str) -> Target:
    def t(c: float, _t: float | None, _r: float | None) -> tuple[str, bool | None]:
        return f">= {limit:g} {unit}", c >= limit

    return t


def build_cases(quick: bool) -> list[Case]:
    cases: list[Case] = []
    # 1. launch -> result
    if quick:
        launch = [("true", 8, False, 2), ("true", 8, True, 2), ("python", 8, True, 1)]
    else:
        reps = {
            "true": {1: 9, 8: 9, 64: 5, 256: 3},
            "python": {1: 5, 8: 5, 64: 3, 256: 2},
        }
        launch = [
            (cmd, n, tee, reps[cmd][n])
            for cmd in ("true", "python")
            for n in (1, 8, 64, 256)
            for tee in (False, True)
        ]
    for cmd, n, tee, r in launch:
        prog = "/bin/true" if cmd == "true" else "python -c pass"
        target = le_x_raw(2) if (cmd == "true" and n == 8) else None
        label = f"launch->result {prog} N={n} tee={'on' if tee else 'off'}"
        cases.append(
            Case(
                "launch",
                {"cmd": cmd, "n": n, "tee": tee},
                r,
                [Row(label, "seconds", "ms", 1e3, target=target)],
                rounds=3 if (target is not None and not quick) else 1,
            )
        )
    # 2. failure -> group torn down; and the overshoot beyond grace
    cases.extend(
        Case(
            "fail",
            {"n": n, "ignore_term": False, "grace": 5.0},
            2 if quick else 9,
            [Row(f"failure->torn down N={n}", "seconds", "ms", 1e3, target=le_x_raw(2))],
            rounds=1 if quick else 3,
        )
        for n in ((8,) if quick else (8, 64))
    )
    for n in (8,) if quick else (8, 64):
        grace = 0.2
        cases.append(
            Case(
                "fail",
                {"n": n, "ignore_term": True, "grace": grace},
                2 if quick else 6,
                [
                    Row(
                        f"failure, peers ignore SIGTERM N={n}: overshoot beyond grace {grace:g}s",
                        "seconds",
                        "ms",
                        1e3,
                        offset=grace,
                        target=le(10, "ms"),
                    )
                ],
                rounds=1 if quick else 3,
            )
        )
    # 2b. the same failure awaited from trio (corral's asyncio core on its loop thread)
    cases.append(
        Case(
            "fail",
            {"n": 8, "ignore_term": False, "grace": 5.0, "backend": "trio"},
            2 if quick else 9,
            [Row("under trio: failure->torn down N=8", "seconds", "ms", 1e3, target=le_x_raw(2))],
            rounds=1 if quick else 3,
            impls=("corral", "raw"),
        )
    )
    # 3. tee throughput, redirect, latency
    mib = 20 if quick else 200
    cases.append(
        Case(
            "tee",
            {"mib": mib, "mode": "tee"},
            1 if quick else 3,
            [
                Row(
                    f"tee {mib} MiB of 100-byte lines: throughput",
                    "mib_s",
                    "MiB/s",
                    higher_is_better=True,
                    target=ge(700, "MiB/s"),
                ),
                Row(
                    f"tee {mib} MiB of 100-byte lines: supervisor CPU",
                    "cpu_s_per_gib",
                    "CPU-s/GiB",
                    target=le(1.5, "CPU-s/GiB"),
                ),
            ],
            rounds=1 if quick else 3,
        )
    )
    cases.append(
        Case(
            "tee",
            {"mib": mib, "mode": "tee", "backend": "trio"},
            1 if quick else 3,
            [
                Row(
                    f"under trio: tee {mib} MiB: throughput",
                    "mib_s",
                    "MiB/s",
                    higher_is_better=True,
                    target=ge(350, "MiB/s"),  # half the asyncio path's target
                ),
            ],
            rounds=1 if quick else 3,
            impls=("corral",),
        )
    )
    cases.append(
        Case(
            "tee",
            {"mib": mib, "mode": "redirect"},
            1 if quick else 3,
            [
                Row(
                    f"redirect only {mib} MiB: throughput",
                    "mib_s",
                    "MiB/s",
                    higher_is_better=True,
                    target=ge_x_raw(0.9),
                ),
            ],
            rounds=1 if quick else 3,
        )
    )
    cases.append(
        Case(
            "latency",
            {"count": 20 if quick else 100},
            1,
            [
                Row(
                    "tee latency (rank write -> console)", "latency", "ms", 1e3, target=le(1, "ms")
                ),
            ],
        )
    )
    # 4. scale: idle ranks with tee on
    n = 32 if quick else 256
    cases.append(
        Case(
            "scale",
            {"n": n},
            1 if quick else 2,
            [
                Row(
                    f"{n} idle ranks tee on: supervisor RSS", "rss_mib", "MiB", target=le(40, "MiB")
                ),
                Row(f"{n} idle ranks tee on: threads", "threads", "", target=le(2, "")),
                Row(f"{n} idle ranks tee on: open fds", "fds", ""),
                Row(f"{n} idle ranks tee on: idle CPU", "idle_cpu_pct", "%", target=le(1, "%")),
                Row(f"{n} idle ranks tee on: close all", "close_s", "ms", 1e3),
            ],
        )
    )
    # 5. cold start (run here, not in a worker)
    cases.append(
        Case(
            "import",
            {},
            3 if quick else 10,
            [
                Row(
                    "cold start: python -c 'import <supervisor>'",
                    "seconds",
                    "ms",
                    1e3,
                    target=le(80, "ms"),
                ),
            ],
        )
    )
    # 6. callables
    n = 2 if quick else 8
    cases.append(
        Case(
            "callables",
            {"n": n},
            1 if quick else 3,
            [
                Row(
                    f"{n} trivial callables: call -> result",
                    "seconds",
                    "ms",
                    1e3,
                    target=le_x_torch(0.5),
                ),
            ],
        )
    )
    return cases


# -- running --------------------------------------------------------------------
def run_worker(
    case: Case, impl: str, tmp: Path, reps: int
) -> tuple[dict[str, list[float]] | None, str]:
    out = tmp / f"{impl}.json"
    spec = {
        "scenario": case.scenario,
        "params": case.params,
        "impl": impl,
        "reps": reps,
        "out": str(out),
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    latencies: list[float] = []
    err_path = tmp / f"{impl}.err"
    with open(err_path, "wb") as err:
        if case.scenario == "latency":
            proc = subprocess.Popen(
                [PY, str(HERE / "_worker.py"), json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
            assert proc.stdout is not None
            reader = threading.Thread(target=_read_latency, args=(proc.stdout, latencies))
            reader.start()
        else:
            proc = subprocess.Popen(
                [PY, str(HERE / "_worker.py"), json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
            reader = None
        try:
            proc.wait(case.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None, f"timed out after {case.timeout:g}s"
        finally:
            if reader is not None:
                reader.join()
    if not out.exists():
        return None, f"worker exited {proc.returncode}: {err_path.read_text()[-2000:]}"
    data = json.loads(out.read_text())
    if "error" in data:
        return None, data["error"].strip().splitlines()[-1]
    samples: dict[str, list[float]] = data["samples"]
    if case.scenario == "latency":
        samples["latency"] = latencies
    return samples, ""


def _read_latency(stream: Any, sink: list[float]) -> None:
    for line in stream:
        now = time.clock_gettime(time.CLOCK_MONOTONIC)
        i = line.find(b"LAT ")
        if i >= 0:
            try:
                sink.append(now - float(line[i + 4 :].split()[0]))
            except ValueError:
                pass


def run_import(case: Case) -> dict[str, dict[str, list[float]] | str]:
    """Whole-process time of ``python -c 'import X'`` (raw: ``python -c pass``)."""
    codes = {
        "corral": "import corral",
        "torch": "import torch.distributed.elastic.multiprocessing",
        "raw": "pass",
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    # A user's install has bytecode caches (pip compiles at install time). Machines
    # that set PYTHONDONTWRITEBYTECODE (these do) would otherwise time the
    # compiler on every run: build the caches once, as an install would.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(
        [PY, "-m", "compileall", "-q", str(ROOT / "src" / "corral")],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, dict[str, list[float]] | str] = {}
    impls = [i for i in case.impls if i != "torch" or HAVE_TORCH]
    if not HAVE_TORCH:
        results["torch"] = "not installed"
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for rep in range(case.reps + 1):  # interleaved; the first round only warms the page cache
        for impl in impls:
            t0 = time.perf_counter()
            subprocess.run(
                [PY, "-c", codes[impl]],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if rep:
                samples[impl].append(time.perf_counter() - t0)
    for impl in impls:
        results[impl] = {"seconds": samples[impl]}
    return results


HAVE_TORCH = importlib.util.find_spec("torch") is not None


def run_case(case: Case) -> None:
    """Run every implementation; in ``case.rounds`` interleaved rounds (noise hits all alike)."""
    if case.scenario == "import":
        per_impl = run_import(case)
    else:
        per_impl = {}
        per_round = -(-case.reps // case.rounds)
        with tempfile.TemporaryDirectory(prefix="corral-bench-run-") as d:
            for k in range(case.rounds):
                order = case.impls[k % len(case.impls) :] + case.impls[: k % len(case.impls)]
                for impl in order:
                    if impl == "torch" and not HAVE_TORCH:
                        per_impl[impl] = "not installed"
                        continue
                    if isinstance(per_impl.get(impl), str):
                        continue  # it failed in an earlier round
                    samples, error = run_worker(case, impl, Path(d), per_round)
                    if samples is None:
                        per_impl[impl] = f"error: {error}"
                        continue
                    merged = per_impl.setdefault(impl, {})
                    assert isinstance(merged, dict)
                    for key, values in samples.items():
                        merged.setdefault(key, []).extend(values)
    for row in case.rows:
        for impl, got in per_impl.items():
            if isinstance(got, str):
                row.values[impl] = got
            else:
                row.values[impl] = [(v - row.offset) * row.scale for v in got.get(row.metric, [])]


# -- reporting --------------------------------------------------------------------
def stats(values: list[float] | str | None) -> dict[str, float] | None:
    if not isinstance(values, list) or not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def evaluate(row: Row) -> dict[str, Any]:
    s = {impl: stats(row.values.get(impl)) for impl in IMPLS}
    c = s["corral"]
    t = s["torch"]
    r = s["raw"]
    out: dict[str, Any] = {"label": row.label, "unit": row.unit, "stats": s, "samples": row.values}
    if c is not None:
        out["corral/torch"] = c["median"] / t["median"] if t and t["median"] else None
        out["corral/raw"] = c["median"] / r["median"] if r and r["median"] else None
        if row.target is not None:
            text, met = row.target(
                c["median"], t["median"] if t else None, r["median"] if r else None
            )
            out["target"], out["met"] = text, met
    return out


def cell(row: Row, impl: str, st: dict[str, float] | None, spread: bool) -> str:
    if st is None:
        v = row.values.get(impl)
        if isinstance(v, str):
            return "torch: not installed" if v == "not installed" else v[:40]
        return "-"
    text = fmt(st["median"])
    if spread:
        text += f" [{fmt(st['min'])}-{fmt(st['max'])}]"
    return text


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(evals: list[tuple[Row, dict[str, Any]]]) -> None:
    head = (
        "scenario",
        "unit",
        "corral median [min-max]",
        "torch median [min-max]",
        "raw median [min-max]",
        "c/torch",
        "c/raw",
        "target",
        "met",
    )
    lines = [head]
    for row, ev in evals:
        st = ev["stats"]
        met = ev.get("met")
        lines.append(
            (
                row.label,
                row.unit,
                cell(row, "corral", st["corral"], True),
                cell(row, "torch", st["torch"], True),
                cell(row, "raw", st["raw"], True),
                ratio(ev.get("corral/torch")),
                ratio(ev.get("corral/raw")),
                ev.get("target", ""),
                "" if "target" not in ev else ("yes" if met else ("NO" if met is False else "?")),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def render_markdown(path: Path) -> str:
    """A Markdown table (for the README) from a JSON report written by this script."""
    report = json.loads(path.read_text())

    def one(st: dict[str, float] | None, samples: object) -> str:
        if st is None:
            return "not installed" if samples == "not installed" else "-"
        return f"{fmt(st['median'])} ({fmt(st['min'])}-{fmt(st['max'])})"

    out = [
        "| scenario | unit | corral median (min-max) | torch | raw | corral/torch | corral/raw "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        st, smp = row["stats"], row["samples"]
        met = row.get("met")
        out.append(
            "| "
            + " | ".join(
                (
                    row["label"],
                    row["unit"],
                    one(st["corral"], smp.get("corral")),
                    one(st["torch"], smp.get("torch")),
                    one(st["raw"], smp.get("raw")),
                    ratio(row.get("corral/torch")),
                    ratio(row.get("corral/raw")),
                    row.get("target", ""),
                    "" if "target" not in row else ("yes" if met else "**no**"),
                )
            )
            + " |"
        )
    m = report["machine"]
    out.append("")
    out.append(
        f"{report['date']}, {report['mode']} run, {m['cpu']} ({m['cores']} cores), "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch'] or 'not installed'}; "
        f"load average {m['loadavg_at_start'][0]:.1f} at start, "
        f"{report['loadavg_at_end'][0]:.1f} at end; {report['seconds']:.0f} s."
    )
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch_version = None
    if HAVE_TORCH:
        try:
            torch_version = subprocess.run(
                [PY, "-c", "import torch; print(torch.__version__)"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except subprocess.CalledProcessError:
            torch_version = "import failed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_version,
        "loadavg_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: few cases, one or two repetitions"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: launch,fail,tee,latency,scale,import,callables",
    )
    ap.add_argument(
        "--json", default=str(HERE / "results" / "latest.json"), help="where to write the JSON"
    )
    ap.add_argument(
        "--render", metavar="JSON", help="print a Markdown table of an earlier run and exit"
    )
    args = ap.parse_args(argv)
    if args.render:
        print(render_markdown(Path(args.render)))
        return 0
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    cases = [c for c in build_cases(args.quick) if not only or c.scenario in only]
    started = time.perf_counter()
    info = machine()
    print(
        f"corral benchmarks {'(quick) ' if args.quick else ''}on {info['cpu']}, "
        f"{info['cores']} cores, Python {info['python']}, "
        f"torch {info['torch'] or 'not installed'}",
        file=sys.stderr,
    )
    for case in cases:
        t0 = time.perf_counter()
        run_case(case)
        print(
            f"  {case.scenario} {case.params} x{case.reps}: {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    evals = [(row, evaluate(row)) for case in cases for row in case.rows]
    print_table(evals)
    total = time.perf_counter() - started
    print(
        f"\n{len(evals)} rows in {total:.0f}s; medians over repetitions; "
        f"the load average at the end was {os.getloadavg()[0]:.2f} (other work shares the machine)"
    )
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "loadavg_at_end": os.getloadavg(),
        "seconds": total,
        "rows": [
            dict(ev) | {"params": case.params, "scenario": case.scenario}
            for case in cases
            for ev in (evaluate(r) for r in case.rows)
        ],
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"JSON: {path}")
    errors = [
        ev
        for _, ev in evals
        for impl in ("corral", "raw")
        if isinstance(ev["samples"].get(impl), str)
    ]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
