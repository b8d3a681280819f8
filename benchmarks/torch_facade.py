#!/usr/bin/env python3
"""corral.torch against torch.distributed.elastic.multiprocessing: the same calls, timed.

Usage::

    python benchmarks/torch_facade.py               # 5 runs per case, 4 ranks
    python benchmarks/torch_facade.py --repeat 10 --nprocs 8

Both modules get the same ``start_processes(...)`` call; only the import
differs. Cases (median wall time, ms):

* ``start+wait (binary)``: N ranks of ``python -c pass``: start -> ``wait()`` returns.
* ``start+wait (function)``: N ranks of a module-level function returning a
  small value (corral: a fresh interpreter importing only the function's
  module; torch: ``spawn``, whose ranks import torch for its ``_wrap``).
* ``failure detection``: once started, rank 0 is released (FIFO) just as
  ``wait(period=...)`` begins; it writes ``time.time()`` and exits 3 while
  the others sleep; that moment -> ``wait`` returns the failure. Both close
  the sleeping ranks at the first poll instant after the failure (corral.torch
  keeps PyTorch's result: a peer that ends before then is not a failure), so
  with ``period=1`` (the default) and ``0.1`` (PyTorch's tests) both wait
  about one period: this is the worst case, half a period on average.
  ``period=0`` is where they differ: PyTorch polls in a busy loop, corral.torch
  waits for the exit event. ``(CPU)`` rows give this process's CPU time
  during that wait, not its wall time.
* ``(CPU) 1 s wait, period=0``: N sleeping ranks; ``wait(timeout=1,
  period=0)`` returns ``None``; this process's CPU time meanwhile: the price
  of PyTorch's millisecond detection.
* ``SIGTERM handled by another thread``: N sleeping ranks; 50 ms into
  ``wait()``, a thread of this process sends SIGTERM to itself, so the
  signal's C handler runs there and nothing interrupts the main thread's
  sleep (a signal landing just before that sleep begins is the same case):
  that signal -> ``SignalException``. PyTorch sees it when its
  ``time.sleep(period)`` ends (period=1), corral.torch at once (a wake-up
  descriptor).
* ``close``: N sleeping ranks (started, each has said ``up`` through a FIFO)
  -> ``close()`` returns with every rank reaped.

Needs torch (``pip install 'corral[bench]'``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import corral.torch as ct

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import answer

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

PY = sys.executable
FAIL = (
    "import sys, time; open(sys.argv[2]).read();"
    "open(sys.argv[1], 'w').write(repr(time.time())); sys.exit(3)"
)
SLEEP = "import time; time.sleep(600)"
#: The folder every run's logs go under (removed at the end of ``main``).
LOGS = tempfile.gettempdir()
UP = "import sys, time; open(sys.argv[1], 'w').write('up'); time.sleep(600)"


def start(
    mod: ModuleType, entry: Callable[..., object] | str, args: dict[int, tuple[object, ...]]
) -> Any:
    envs: dict[int, dict[str, str]] = {r: {} for r in args}
    specs = mod.DefaultLogsSpecs(log_dir=tempfile.mkdtemp(dir=LOGS))
    return mod.start_processes("bench", entry, args, envs, specs)


def start_wait_binary(mod: ModuleType, n: int) -> float:
    t0 = time.perf_counter()
    pc = start(mod, PY, dict.fromkeys(range(n), ("-S", "-c", "pass")))
    result = pc.wait(period=0.01)
    assert result is not None
    assert not result.is_failed()
    return (time.perf_counter() - t0) * 1000


def start_wait_function(mod: ModuleType, n: int) -> float:
    t0 = time.perf_counter()
    pc = start(mod, answer, dict.fromkeys(range(n), ()))
    result = pc.wait(period=0.01)
    assert result is not None
    assert not result.is_failed()
    return (time.perf_counter() - t0) * 1000


def failure_detection(mod: ModuleType, n: int, period: float, cpu: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        stamp, go = Path(tmp) / "t", Path(tmp) / "go"
        os.mkfifo(go)
        args: dict[int, tuple[object, ...]] = {0: ("-S", "-c", FAIL, stamp, go)}
        args.update(dict.fromkeys(range(1, n), ("-S", "-c", SLEEP)))
        pc = start(mod, PY, args)
        go.write_text("")  # rank 0 fails now, as wait() begins
        used = time.process_time()
        result = pc.wait(period=period)
        seen, used = time.time(), time.process_time() - used
        assert result is not None
        assert result.is_failed()
        return used * 1000 if cpu else (seen - float(stamp.read_text())) * 1000


def idle_wait_cpu(mod: ModuleType, n: int) -> float:
    pc = start(mod, PY, dict.fromkeys(range(n), ("-S", "-c", SLEEP)))
    try:
        used = time.process_time()
        assert pc.wait(timeout=1, period=0) is None
        return (time.process_time() - used) * 1000
    finally:
        pc.close()


def signal_latency(mod: ModuleType, n: int) -> float:
    signal_exception = importlib.import_module(f"{mod.__name__}.api").SignalException
    sent: list[float] = []

    def killer() -> None:
        time.sleep(0.05)  # the main thread is asleep in wait() by then
        sent.append(time.perf_counter())
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    pc = start(mod, PY, dict.fromkeys(range(n), ("-S", "-c", SLEEP)))
    thread = threading.Thread(target=killer)
    try:
        thread.start()
        pc.wait(timeout=30)
        raise AssertionError("wait() ended without a SignalException")
    except signal_exception as e:
        latency = time.perf_counter() - sent[-1]
        pc.close(e.sigval)
    thread.join()
    return latency * 1000


def close(mod: ModuleType, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        fifos = [Path(tmp) / f"up{r}" for r in range(n)]
        for f in fifos:
            os.mkfifo(f)
        pc = start(mod, PY, {r: ("-S", "-c", UP, fifos[r]) for r in range(n)})
        for f in fifos:  # each rank is running its body
            assert f.read_text() == "up"
        t0 = time.perf_counter()
        pc.close()
        return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--nprocs", type=int, default=4)
    opts = parser.parse_args()
    # Imported here, not at the top: torch's spawn re-imports this script in
    # every function rank, which must not cost torch's import twice.
    import torch.distributed.elastic.multiprocessing as tem

    n = opts.nprocs
    cases: list[tuple[str, Callable[[ModuleType], float]]] = [
        ("start+wait (binary)", lambda m: start_wait_binary(m, n)),
        ("start+wait (function)", lambda m: start_wait_function(m, n)),
        ("failure detection, period=1", lambda m: failure_detection(m, n, 1.0)),
        ("failure detection, period=0.1", lambda m: failure_detection(m, n, 0.1)),
        ("failure detection, period=0", lambda m: failure_detection(m, n, 0.0)),
        ("  (CPU) period=0", lambda m: failure_detection(m, n, 0.0, cpu=True)),
        ("(CPU) 1 s wait, period=0", lambda m: idle_wait_cpu(m, n)),
        ("SIGTERM handled by another thread", lambda m: signal_latency(m, n)),
        ("close", lambda m: close(m, n)),
    ]
    print(f"{n} ranks, median of {opts.repeat} runs (ms); ratio = torch / corral.torch")
    print(f"{'case':36} {'corral.torch':>12} {'torch':>10} {'ratio':>7}")
    global LOGS
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as LOGS:
        for name, case in cases:
            ours = statistics.median(case(ct) for _ in range(opts.repeat))
            theirs = statistics.median(case(tem) for _ in range(opts.repeat))
            print(f"{name:36} {ours:12.1f} {theirs:10.1f} {theirs / ours:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
