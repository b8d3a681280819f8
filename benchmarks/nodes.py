#!/usr/bin/env python3
"""Multi-node on one machine: corral against torchrun, 2 nodes x 2 ranks on 127.0.0.1.

Usage::

    python benchmarks/nodes.py               # 3 corral runs per case, 1 torchrun run
    python benchmarks/nodes.py --repeat 5 --torchrun-cap 60

Each "node" is its own launcher process (``corral run --nnodes 2 ...`` or
``torchrun --nnodes 2 --rdzv-backend c10d ...``) on a fresh c10d endpoint.
Three cases, wall times from the launchers' start (or the failing rank's
exit) to the moment measured:

* ``all-reduce``: a trivial gloo all-reduce script, start -> both launchers exited 0;
* ``cross-node failure``: global rank 3 exits 7 while every other rank sleeps
  outside any collective; its exit -> both launchers exited (torchrun is stopped
  at ``--torchrun-cap`` seconds: its other node does not notice);
* ``restart``: rank 3 fails once with ``--max-restarts 1``, backoff 0: its exit
  -> every rank of the next attempt running (each rank writes the time it started).

Needs torch (``pip install 'corral[torch]'``); torchrun is the one of that torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
ALLREDUCE = ROOT / "tests" / "children" / "cli_allreduce.py"

#: A rank: write "start <time>" to DIR/start-RANK-ATTEMPT; rank 3 of attempt 0
#: writes DIR/fail-time and exits 7 (always, or once with ONCE); others sleep.
RANK = """
import os, sys, time
d, once = sys.argv[1], sys.argv[2] == "1"
rank, attempt = os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
open(os.path.join(d, f"start-{rank}-{attempt}"), "w").write(repr(time.time()))
if once and attempt != "0":
    sys.exit(0)
if rank == "3":
    time.sleep(1.0)
    open(os.path.join(d, "fail-time"), "w").write(repr(time.time()))
    sys.exit(7)
time.sleep(600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(
    tool: str, script: list[str], extra: list[str], folder: Path
) -> list[subprocess.Popen[bytes]]:
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    for k in range(2):
        if tool == "corral":
            cmd = [PY, "-m", "corral", "run", "-n", "2", "--nnodes", "2"]
            cmd += ["--rdzv-endpoint", endpoint, "--rdzv-id", "bench", "--grace", "3"]
            cmd += ["--log-dir", str(folder / f"node{k}"), *extra, "--", PY, *script]
        else:
            torchrun = shutil.which("torchrun") or str(Path(PY).parent / "torchrun")
            cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
            cmd += ["--rdzv-endpoint", endpoint, "--rdzv-id", "bench", *extra, *script]
        procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=folder,
            )
        )
    return procs


def ended(procs: list[subprocess.Popen[bytes]], cap: float) -> float | None:
    """Wait for every launcher; the time the last one exited, or None past ``cap`` (killed)."""
    deadline = time.time() + cap
    last = 0.0
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
            last = max(last, time.time())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            return None
    return last


def all_reduce(tool: str, cap: float) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        done = ended(launch(tool, [str(ALLREDUCE)], [], Path(tmp)), cap)
        return None if done is None else done - t0


def failure(tool: str, cap: float) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        script = folder / "rank.py"
        script.write_text(RANK)
        done = ended(launch(tool, [str(script), tmp, "0"], [], folder), cap)
        fail = folder / "fail-time"
        if done is None or not fail.exists():
            return None
        return done - float(fail.read_text())


def restart(tool: str, cap: float) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        script = folder / "rank.py"
        script.write_text(RANK)
        extra = ["--max-restarts", "1"] + (["--restart-backoff", "0"] if tool == "corral" else [])
        ended(launch(tool, [str(script), tmp, "1"], extra, folder), cap)
        starts = [folder / f"start-{r}-1" for r in range(4)]
        fail = folder / "fail-time"
        if not fail.exists() or not all(p.exists() for p in starts):
            return None
        return max(float(p.read_text()) for p in starts) - float(fail.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=3, help="corral runs per case (default 3)")
    ap.add_argument(
        "--torchrun-cap", type=float, default=40.0, help="seconds before torchrun is stopped"
    )
    ap.add_argument("--no-torchrun", action="store_true", help="corral only")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: pip install 'corral[torch]'", file=sys.stderr)
        return 2
    cases = (
        ("2x2 gloo all-reduce: start -> done", all_reduce),
        ("cross-node failure: exit -> every node ended", failure),
        ("restart: exit -> next attempt's ranks running", restart),
    )
    print(f"{'case':48} {'corral median [min-max]':>28} {'torchrun':>12} {'ratio':>7}")
    for label, fn in cases:
        ours = [fn("corral", 60.0) for _ in range(args.repeat)]
        seen = [x for x in ours if x is not None]
        med = statistics.median(seen) if seen else None
        theirs = None if args.no_torchrun else fn("torchrun", args.torchrun_cap)
        cell = f"{med:.2f} s [{min(seen):.2f}-{max(seen):.2f}]" if med is not None else "failed"
        other = (
            "-"
            if args.no_torchrun
            else (f"{theirs:.2f} s" if theirs is not None else f">{args.torchrun_cap:.0f} s")
        )
        ratio = (
            f"{med / theirs:.2f}"
            if med is not None and theirs
            else ("<%.2f" % (med / args.torchrun_cap) if med and not args.no_torchrun else "-")
        )
        print(f"{label:48} {cell:>28} {other:>12} {ratio:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
