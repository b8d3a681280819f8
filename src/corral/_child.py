"""Bootstrap of a callable rank, and the error-record format it shares with ``record``.

The supervisor runs ``python -P -c <code> CALL RESULT``, where the one-line
program loads this file from its cached bytecode and calls ``main(sys.argv)``
(running the file by path also works, but recompiles it every time). Either
way the ``corral`` package ``__init__`` (asyncio, subprocess, logging...) is
never imported before the user's code: the bootstrap costs only ``sys``,
``os`` and the C ``_pickle`` module on top of a bare interpreter. Hence this
module imports nothing from corral and only the standard library, lazily on
the error path.

``CALL`` holds two pickles: a header of plain values (the parent's ``sys.path``
and ``sys.argv``, how to import its main module), then ``(fn, args)``. Like
``multiprocessing``'s spawn start method, a reference to ``__main__`` in the
second pickle imports the parent's main script under the name ``__mp_main__``
(so its ``if __name__ == "__main__":`` block does not run again) and aliases it
as ``__main__``; a call that does not mention ``__main__`` never imports it.

A coroutine function (``async def``) is run with ``asyncio.run``. The return
value is pickled to ``RESULT`` (a file: a value of any size never
fills a pipe); ``None`` writes no file. An uncaught exception, or a return value
that cannot be pickled, is written to the rank's error file (``CORRAL_ERROR_FILE``)
as ``{"message", "type", "traceback", "timestamp"}``, its traceback printed to
stderr as Python would, and the process exits 1. ``SystemExit`` and
``KeyboardInterrupt`` are left to Python: ``SystemExit(5)`` exits 5, an
uncaught ``KeyboardInterrupt`` ends the process with SIGINT.
"""

from __future__ import annotations

import _pickle
import os
import sys

# Not ``from typing import TYPE_CHECKING``: typing costs a rank ~5 ms to import.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType, TracebackType
    from typing import Any, Final, NoReturn

__all__ = ("ERROR_FILE_VARS", "error_file_path", "error_record", "write_error_record")

#: Environment variables naming the rank's error file, in order of preference.
ERROR_FILE_VARS: Final = ("CORRAL_ERROR_FILE", "TORCHELASTIC_ERROR_FILE")
#: Attribute set on an exception once it has been recorded, so nested
#: ``record`` wrappers (or the bootstrap around a recorded function) write it once.
RECORDED_ATTR: Final = "__corral_recorded__"
#: Set on ``sys`` while a rank imports the supervisor's main script: a
#: ``corral.spawn`` of a callable then means the script lacks its
#: ``if __name__ == "__main__":`` guard (and would start ranks recursively).
IMPORTING_MAIN_ATTR: Final = "_corral_importing_main"
#: Exit status of a callable rank whose function raised (as Python's own).
EXIT_FAILURE: Final = 1
#: Highest pickle protocol (5: out-of-band-capable, efficient for large buffers).
PROTOCOL: Final = 5


# -- the error-record format (shared with corral.record) --------------------------
def error_file_path() -> str | None:
    """The rank's error file from the environment, or ``None`` when not under a supervisor."""
    for var in ERROR_FILE_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None


def _exc_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}.__str__ failed>"


def error_record(
    exc: BaseException, context: str | None = None, skip_frames: int = 0
) -> dict[str, object]:
    """corral's JSON error record for ``exc``: ``message``, ``type``, ``traceback``, ``timestamp``.

    ``message`` is ``"Type: message"`` (just ``"Type"`` when the message is empty),
    prefixed by ``context`` when given. ``skip_frames`` drops that many frames
    (a wrapper's own) from the top of the recorded traceback.
    """
    import time
    import traceback

    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    name = type(exc).__qualname__
    text = _exc_text(exc)
    message = f"{name}: {text}" if text else name
    if context:
        message = f"{context}: {message}"
    return {
        "message": message,
        "type": f"{type(exc).__module__}.{name}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        "timestamp": time.time(),
    }


def write_error_record(record: dict[str, object], path: str | os.PathLike[str]) -> bool:
    """Write ``record`` as JSON to ``path`` atomically; False if it could not be written."""
    import json

    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, default=str)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def mark_recorded(exc: BaseException) -> None:
    """Remember that ``exc`` is in the error file already (best effort)."""
    try:
        setattr(exc, RECORDED_ATTR, True)
    except Exception:
        pass


def is_recorded(exc: BaseException) -> bool:
    """True when ``exc`` was written to the error file by an inner ``record``."""
    return bool(getattr(exc, RECORDED_ATTR, False))


# -- the bootstrap ------------------------------------------------------------------
#: Main modules replaced by ``__mp_main__``: kept alive so their globals stay valid.
_old_main_modules: list[ModuleType] = []


class _MainLoader:
    """Imports the parent's main module on first reference, as multiprocessing's spawn does."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.name: str | None = header.get("main_name")
        self.path: str | None = header.get("main_path")
        self.module: ModuleType | None = None

    def load(self) -> ModuleType:
        if self.module is not None:
            return self.module
        import runpy
        import types

        setattr(sys, IMPORTING_MAIN_ATTR, True)
        try:
            if self.name:
                content = runpy.run_module(self.name, run_name="__mp_main__", alter_sys=True)
            elif self.path:
                content = runpy.run_path(self.path, run_name="__mp_main__")
            else:
                content = None
        finally:
            delattr(sys, IMPORTING_MAIN_ATTR)
        if content is None:
            raise ImportError(
                "the function refers to __main__, but the supervisor's main module has no "
                "file (an interactive session or python -c): define it in an importable module"
            )
        module = types.ModuleType("__mp_main__")
        module.__dict__.update(content)
        _old_main_modules.append(sys.modules["__main__"])
        sys.modules["__main__"] = sys.modules["__mp_main__"] = module
        self.module = module
        return module


class _CallUnpickler(_pickle.Unpickler):
    """Resolves ``__main__`` (and ``__mp_main__``) to the parent's main script."""

    def __init__(self, file: Any, main: _MainLoader) -> None:
        super().__init__(file)
        self._main = main

    def find_class(self, module_name: str, name: str) -> Any:
        if module_name in ("__main__", "__mp_main__"):
            obj: Any = self._main.load()
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        return super().find_class(module_name, name)


def _user_traceback(exc: BaseException) -> BaseException:
    """Drop the bootstrap's own frames from the top of ``exc``'s traceback."""
    tb: TracebackType | None = exc.__traceback__
    here = os.path.normcase(os.path.abspath(__file__))
    while tb is not None and os.path.normcase(tb.tb_frame.f_code.co_filename) == here:
        tb = tb.tb_next
    if tb is not None:
        exc.__traceback__ = tb
    return exc


def _fail(exc: BaseException, context: str | None = None) -> NoReturn:
    """Record ``exc``, print its traceback as Python would, exit 1."""
    exc = _user_traceback(exc)
    path = error_file_path()
    if path is not None and not is_recorded(exc):
        write_error_record(error_record(exc, context), path)
    if context:
        print(f"corral: {context}", file=sys.stderr)  # noqa: T201 - the rank's own stderr
    sys.excepthook(type(exc), exc, exc.__traceback__)
    raise SystemExit(EXIT_FAILURE)


def _load(call_file: str) -> tuple[Any, tuple[Any, ...]]:
    with open(call_file, "rb") as f:
        header: dict[str, Any] = _pickle.load(f)
        sys.path[:] = header["sys_path"]
        sys.argv[:] = header["sys_argv"]
        fn, args = _CallUnpickler(f, _MainLoader(header)).load()
    return fn, tuple(args)


def _store(value: object, result_file: str, name: str) -> None:
    if value is None:
        return
    try:
        with open(result_file, "wb") as f:
            _pickle.dump(value, f, protocol=PROTOCOL)
    except BaseException as exc:
        try:
            os.unlink(result_file)
        except OSError:
            pass
        if isinstance(exc, KeyboardInterrupt):
            raise
        rank = os.environ.get("CORRAL_RANK", "?")
        what = "saved" if isinstance(exc, OSError) else "pickled"
        _fail(exc, f"the return value of {name} (rank {rank}) cannot be {what}")


def _is_coroutine(value: object) -> bool:
    # Not inspect.iscoroutine: that would import inspect (and more) in every rank.
    return type(value).__name__ == "coroutine" and hasattr(value, "send")


def _register_stack_dump() -> None:
    """Dump every thread's stack to stderr on SIGURG (see ``corral._stacks``).

    SIGURG is ignored by default, so a rank signalled before this ran is
    unaffected; ``chain=True`` still runs a handler the program installs
    first. stderr, not a file of its own: the rank gets no extra descriptor.
    """
    try:
        import _signal  # type: ignore[import-not-found]  # not signal: it imports enum
        import faulthandler

        faulthandler.register(_signal.SIGURG, file=sys.stderr, all_threads=True, chain=True)
    except (AttributeError, ImportError, OSError, RuntimeError, ValueError):
        pass  # no SIGURG here, or stderr is closed: no stack dumps for this rank


def main(argv: list[str]) -> None:
    """Run the call described by ``argv[1]``; leave its return value in ``argv[2]``."""
    call_file, result_file = argv[1], argv[2]
    _register_stack_dump()
    # Prompt logs: line-buffered stdout even into a file or pipe (-u/PYTHONUNBUFFERED win).
    stdout: Any = sys.stdout
    try:
        if not stdout.write_through:
            stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    try:
        fn, args = _load(call_file)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _fail(exc, f"cannot load the function or its arguments from {call_file}")
    name = getattr(fn, "__qualname__", None) or repr(fn)
    try:
        value = fn(*args)
        if _is_coroutine(value):  # an ``async def`` function: run it to completion
            import asyncio

            value = asyncio.run(value)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _fail(exc)
    _store(value, result_file, name)


if __name__ == "__main__":  # pragma: no cover - exercised through real ranks
    main(sys.argv)
