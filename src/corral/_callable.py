"""Prepare a Python callable to run as a rank (``_child`` is the other side).

A callable rank is a fresh interpreter running the bootstrap module ``_child``
(``python -P -c <load corral/_child.py> CALL RESULT``), through the same ``start_rank``
path as a command (same env layering, logs, tee, close). ``CALL`` is written to
the rank's folder: a header (this process's ``sys.path`` and ``sys.argv``, how
to import its main module) and the pickle of ``(fn, args)``. ``RESULT`` is the
file the child leaves its pickled return value in. Files, not pipes, so a
return value of any size can never fill a buffer and deadlock either side.

What can be sent: anything ``pickle`` sends by reference or by value. A
function travels *by reference* (module and qualified name), so it must be
importable by name from a fresh interpreter: a module-level function of an
importable module, or of the main script (imported in the child as
``__mp_main__``, as multiprocessing's spawn does). Lambdas, nested functions
and closures, and arguments that cannot be pickled, are refused here with a
``ConfigError`` naming them, before any process starts.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._child import IMPORTING_MAIN_ATTR
from ._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ("CALL_FILE", "RESULT_FILE", "CallSpec", "load_result", "prepare")

CALL_FILE: Final = "call.pkl"
RESULT_FILE: Final = "result.pkl"
#: The bootstrap module. It is loaded from its cached bytecode by a one-line
#: ``-c`` program (as multiprocessing's spawn does), not with ``-m corral._child``,
#: so the ``corral`` package (asyncio, subprocess, logging: ~65 ms) is not
#: imported before user code, and not by path, which would recompile it (~2 ms).
BOOTSTRAP: Final = str(Path(__file__).with_name("_child.py"))
_BOOT_CODE: Final = (
    "import sys,_frozen_importlib_external as x;n='corral._child';p={path!r};"
    "g={{'__name__':n,'__file__':p}};"
    "exec(x.SourceFileLoader(n,p).get_code(n),g);g['main'](sys.argv)"
)
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_REPR_MAX: Final = 80


@dataclass(frozen=True, slots=True)
class CallSpec:
    """A callable whose per-rank calls have been pickled (so they can be sent)."""

    fn: Callable[..., object]
    name: str
    #: rank -> the pickled ``(header, (fn, args))`` call file content.
    payloads: Mapping[int, bytes]
    #: Interpreter flags of this process (``-X``, ``-W``, ``-O``...), passed on as
    #: multiprocessing does.
    flags: tuple[str, ...]

    def rank_argv(
        self, rank: int, args: Sequence[object], rank_dir: Path
    ) -> tuple[tuple[str, ...], Path]:
        """Write the rank's call file and return its argv and result-file path.

        ``args`` is the rank's arguments, already pickled by :func:`prepare`.
        """
        del args  # pickled by prepare(), before anything was created
        call_file = rank_dir / CALL_FILE
        call_file.write_bytes(self.payloads[rank])
        result_file = rank_dir / RESULT_FILE
        if os.path.isfile(BOOTSTRAP):
            boot: tuple[str, ...] = ("-c", _BOOT_CODE.format(path=BOOTSTRAP))
        else:  # installed in a zip: import it (and the corral package) the slow way
            boot = ("-c", "import sys,corral._child as c;c.main(sys.argv)")
        argv = (sys.executable, *self.flags, "-P", *boot, str(call_file), str(result_file))
        return argv, result_file


def moved(argv: tuple[str, ...], old_dir: Path, new_dir: Path) -> tuple[tuple[str, ...], Path]:
    """A rank's argv from :meth:`CallSpec.rank_argv` for a new folder (its call file copied)."""
    (new_dir / CALL_FILE).write_bytes((old_dir / CALL_FILE).read_bytes())
    result_file = new_dir / RESULT_FILE
    return (*argv[:-2], str(new_dir / CALL_FILE), str(result_file)), result_file


def _short(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _describe_fn(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or _short(fn)
    code = getattr(fn, "__code__", None)
    if code is not None:
        return f"{name!r} ({code.co_filename}:{code.co_firstlineno})"
    return repr(name)


def _main_header() -> dict[str, object]:
    """How the child imports this process's main module, and with which sys.path."""
    cwd = os.getcwd()
    sys_path = [os.path.join(cwd, p) if not os.path.isabs(p) else p for p in sys.path]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    main_name = getattr(spec, "name", None)
    main_path = getattr(main, "__file__", None)
    if main_name is not None and main_name.endswith("__mp_main__"):
        main_name = None
    if isinstance(main_path, str):
        main_path = os.path.normpath(os.path.join(cwd, main_path))
    else:
        main_path = None
    return {
        "sys_path": sys_path,
        "sys_argv": list(sys.argv),
        "main_name": main_name,
        "main_path": main_path,
    }


def _check_fn(fn: Callable[..., object]) -> str:
    name = getattr(fn, "__qualname__", None) or _short(fn)
    where = _describe_fn(fn)
    if "<lambda>" in name:
        raise ConfigError(
            f"cannot run the lambda {where} as a rank: a fresh interpreter imports the "
            "function by name, and a lambda has none; use a module-level def"
        )
    if "<locals>" in name:
        raise ConfigError(
            f"cannot run {where} as a rank: it is defined inside another function "
            "(a nested function or closure), so a fresh interpreter cannot import it; "
            "define it at module level and pass what it captures as args"
        )
    module = getattr(fn, "__module__", None)
    if module in ("__main__", "__mp_main__"):
        header = _main_header()
        if header["main_name"] is None and header["main_path"] is None:
            raise ConfigError(
                f"cannot run {where} as a rank: it is defined in __main__, which has no "
                "file (an interactive session, a notebook or python -c); define it in a "
                "module the ranks can import"
            )
    try:
        pickle.dumps(fn, protocol=_PROTOCOL)
    except Exception as exc:
        raise ConfigError(f"cannot run {where} as a rank: it cannot be pickled ({exc})") from exc
    return name


def _pickle_call(
    header: Mapping[str, object], fn: Callable[..., object], args: tuple[object, ...]
) -> bytes:
    buf = io.BytesIO()
    pickle.dump(dict(header), buf, protocol=_PROTOCOL)
    pickle.dump((fn, args), buf, protocol=_PROTOCOL)
    return buf.getvalue()


def prepare(fn: Callable[..., object], per_rank_args: Mapping[int, Sequence[object]]) -> CallSpec:
    """Check that ``fn`` and every rank's arguments can be sent, and pickle them.

    Raises:
        ConfigError: ``fn`` is a lambda, a nested function or closure, is defined
            in a ``__main__`` without a file, or cannot be pickled; or an
            argument cannot be pickled (the message names the rank and position).
    """
    if getattr(sys, IMPORTING_MAIN_ATTR, False):
        raise ConfigError(
            "corral.spawn() of a callable was called while a rank was importing the main "
            "script: the script starts ranks at import time, so every rank would start ranks "
            "again. Put that code under 'if __name__ == \"__main__\":'"
        )
    name = _check_fn(fn)
    header = _main_header()
    payloads: dict[int, bytes] = {}
    by_args: dict[int, bytes] = {}  # a shared args tuple is pickled once
    for rank, rank_args in per_rank_args.items():
        key = id(rank_args)
        if key in by_args:
            payloads[rank] = by_args[key]
            continue
        args = tuple(rank_args)
        try:
            payload = _pickle_call(header, fn, args)
        except Exception as exc:
            raise ConfigError(_bad_args(name, rank, args, exc)) from exc
        payloads[rank] = by_args[key] = payload
    flags = tuple(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
    return CallSpec(fn=fn, name=name, payloads=payloads, flags=flags)


def _bad_args(name: str, rank: int, args: tuple[object, ...], exc: Exception) -> str:
    """Name the argument that cannot be pickled."""
    for i, arg in enumerate(args):
        try:
            pickle.dumps(arg, protocol=_PROTOCOL)
        except Exception as arg_exc:
            return (
                f"args for rank {rank} of {name}: argument {i} ({_short(arg)}) cannot be "
                f"sent to the rank: {arg_exc}. Arguments are pickled: pass plain data or "
                "module-level functions and classes (no lambdas, closures, locks, open files)"
            )
    return f"args for rank {rank} of {name} cannot be sent to the rank: {exc}"


class _ResultUnpickler(pickle.Unpickler):
    """Maps the child's ``__mp_main__`` (our main script there) back to ``__main__``."""

    def find_class(self, module_name: str, name: str) -> object:
        if module_name == "__mp_main__" and "__mp_main__" not in sys.modules:
            module_name = "__main__"
        return super().find_class(module_name, name)


def load_result(path: Path) -> object:
    """Load a rank's return value; ``None`` when it wrote none (void function).

    Raises:
        Exception: the file exists but cannot be unpickled here.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; FileNotFoundError is the void case
    except FileNotFoundError:
        return None
    with f:
        return _ResultUnpickler(f).load()
