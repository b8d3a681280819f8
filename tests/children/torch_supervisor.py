"""A supervisor using corral.torch as PyTorch's agent does: SIGTERM -> SignalException -> close.

Prints ``pids <supervisor> <rank pids...>`` once its ranks run, then waits;
on ``SignalException`` it closes with that signal and prints
``closed <signal name> <exit codes>``. With the argument ``exit`` it instead
reads one line from stdin, then exits 3 leaving the context running. With
``fork``, it reads one line, forks a child that exits at once (running the
atexit hooks), then prints ``forked <child's exit status> <wait(0)>`` and
closes its context. With ``thread-signal``, it reads one line, then the SIGTERM
comes from a thread of its own, once the main thread is blocked in ``wait()``: the signal's C
handler runs in that thread, and nothing interrupts the main thread's wait
but corral.torch's wake-up descriptor.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from tests.children.blocked import until_sleeps_in

from corral.torch import DefaultLogsSpecs, PContext, SignalException, start_processes


def signal_from_this_thread() -> None:
    """After a line on stdin: SIGTERM to this very thread once the main thread blocks in wait()."""
    sys.stdin.readline()
    until_sleeps_in(PContext.wait.__code__)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def main() -> None:
    code = "import os, signal; os.write(1, b'up\\n'); signal.pause()"  # one atomic write
    pc = start_processes(
        name="trainer",
        entrypoint=sys.executable,
        args={0: ("-c", code), 1: ("-c", code)},
        envs={0: {}, 1: {}},
        logs_specs=DefaultLogsSpecs(log_dir="logs"),  # in its cwd: the test's tmp_path
    )
    try:  # from here on: the test's SIGTERM may come right after the pids are out
        # One write: the ranks write to the same pipe, and an unbuffered print() (these
        # machines set PYTHONUNBUFFERED) writes piece by piece, letting "up" in between.
        pids = ["pids", os.getpid(), *pc.pids().values()]
        os.write(1, " ".join(map(str, pids)).encode() + b"\n")
        if sys.argv[1:] == ["exit"]:
            sys.stdin.readline()
            sys.exit(3)  # no close(): corral.torch closes the context at exit
        if sys.argv[1:] == ["fork"]:
            sys.stdin.readline()
            if (child := os.fork()) == 0:
                sys.exit(0)  # the context is the parent's: the hook leaves it alone
            _, status = os.waitpid(child, 0)
            print("forked", status, pc.wait(0), flush=True)
            pc.close()
            return
        if sys.argv[1:] == ["thread-signal"]:
            threading.Thread(target=signal_from_this_thread, daemon=True).start()
        pc.wait(timeout=60)
    except SignalException as e:
        pc.close(e.sigval, timeout=5)
        result = pc.wait(0)
        assert result is not None
        codes = sorted(f.exitcode for f in result.failures.values())
        print("closed", e.sigval.name, *codes, flush=True)


if __name__ == "__main__":
    main()
