"""Error files: ``record`` writes them, the supervisor reads them.

corral's format is a JSON object ``{"message", "type", "traceback",
"timestamp"}``. PyTorch's ``@record`` writes ``{"message": {"message": ...,
"extraInfo": {"py_callstack": ..., "timestamp": ...}}}``; both are read.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

__all__ = ("ErrorInfo", "read_error_file", "record", "write_error_file")

P = ParamSpec("P")
R = TypeVar("R")

ERROR_FILE_VARS = ("CORRAL_ERROR_FILE", "TORCHELASTIC_ERROR_FILE")


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What an error file says."""

    content: Mapping[str, Any]
    message: str
    traceback: str | None
    timestamp: float | None


def write_error_file(exc: BaseException, path: str | os.PathLike[str] | None = None) -> None:
    """Write ``exc`` as corral's JSON error record (to the rank's error file by default)."""
    if path is None:
        path = next((os.environ[v] for v in ERROR_FILE_VARS if os.environ.get(v)), None)
        if path is None:
            return
    record_ = {
        "message": f"{type(exc).__name__}: {exc}",
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "traceback": "".join(traceback.format_exception(exc)),
        "timestamp": time.time(),
    }
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record_, f)
    os.replace(tmp, path)


def record(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a rank's entry function so an uncaught exception is recorded.

    The exception is written as JSON (``message``, ``type``, ``traceback``,
    ``timestamp``) to the file named by ``CORRAL_ERROR_FILE`` (or
    ``TORCHELASTIC_ERROR_FILE``), then re-raised, so the process still exits
    non-zero with Python's usual traceback on stderr. ``SystemExit`` and
    ``KeyboardInterrupt`` pass through unrecorded.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            write_error_file(exc)
            raise

    return wrapper


def read_error_file(path: Path) -> ErrorInfo | None:
    """Parse corral's or PyTorch's error-file format; None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict):
        return None
    message = content.get("message")
    if isinstance(message, dict):  # PyTorch's @record format
        extra = message.get("extraInfo")
        extra = extra if isinstance(extra, dict) else {}
        text = str(message.get("message", "")).strip()
        tb = extra.get("py_callstack")
        ts = extra.get("timestamp")
        first = text.splitlines()[-1] if text else "error recorded (no message)"
        return ErrorInfo(
            content=content,
            message=first,
            traceback=str(tb) if tb else (text or None),
            timestamp=_float(ts),
        )
    tb = content.get("traceback")
    return ErrorInfo(
        content=content,
        message=str(message) if message else "error recorded (no message)",
        traceback=str(tb) if tb else None,
        timestamp=_float(content.get("timestamp")),
    )


def _float(value: object) -> float | None:
    try:
        return float(value) if value is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


record.__module__ = "corral"
