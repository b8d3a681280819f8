"""Error files: ``record`` writes them, the supervisor reads them.

corral's format is a JSON object ``{"message", "type", "traceback",
"timestamp"}`` (``message`` is ``"Type: message"``, ``timestamp`` float
seconds since the epoch). PyTorch's ``@record`` writes ``{"message":
{"message": ..., "extraInfo": {"py_callstack": ..., "timestamp": ...}}}``
(its timestamp a string of whole seconds); both are read, without torch.
The writer lives in ``_child`` so that callable ranks share it without
importing the ``corral`` package.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from ._child import (
    ERROR_FILE_VARS,
    error_file_path,
    error_record,
    is_recorded,
    mark_recorded,
    write_error_record,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

__all__ = ("ERROR_FILE_VARS", "ErrorInfo", "read_error_file", "record", "write_error_file")

P = ParamSpec("P")
R = TypeVar("R")

#: ``Failure.message`` is one line; longer messages are cut (the file keeps all).
MESSAGE_MAX: Final = 500
#: Error files larger than this are not parsed (a runaway writer).
ERROR_FILE_MAX: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What an error file says.

    Attributes:
        content: the parsed JSON object.
        message: one line, ``"Type: message"``.
        traceback: the recorded traceback text, if any.
        timestamp: when the error was recorded (seconds since the epoch), if known.
    """

    content: Mapping[str, Any]
    message: str
    traceback: str | None
    timestamp: float | None


def write_error_file(
    exc: BaseException, path: str | os.PathLike[str] | None = None, *, skip_frames: int = 0
) -> bool:
    """Write ``exc`` as corral's JSON error record.

    Args:
        exc: the exception to record.
        path: where; by default the rank's error file (``CORRAL_ERROR_FILE``,
            else ``TORCHELASTIC_ERROR_FILE``).
        skip_frames: frames to drop from the top of the recorded traceback.

    Returns:
        True when written; False when there is no error file to write or it
        could not be written (recording must never hide the original error).
    """
    target = os.fspath(path) if path is not None else error_file_path()
    if target is None:
        return False
    written = write_error_record(error_record(exc, skip_frames=skip_frames), target)
    if written:
        mark_recorded(exc)
    return written


def _record_exc(exc: BaseException) -> None:
    if not isinstance(exc, (SystemExit, KeyboardInterrupt)) and not is_recorded(exc):
        write_error_file(exc, skip_frames=1)  # not the wrapper's own frame


def record(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a rank's entry function so that an uncaught exception is recorded.

    The exception is written as JSON (``message``, ``type``, ``traceback``,
    ``timestamp``) to the file named by ``CORRAL_ERROR_FILE`` (or
    ``TORCHELASTIC_ERROR_FILE``), which corral sets for every rank, then
    re-raised: the process still prints Python's traceback and exits
    non-zero, and the supervisor's ``Failure`` carries the exception's type,
    message, traceback and time. ``SystemExit`` and ``KeyboardInterrupt``
    pass through unrecorded. Outside corral (no such variable) it does
    nothing. Works on ``async def`` functions too. An exception already
    recorded by an inner ``record`` is not written again.

    Example::

        @corral.record
        def main() -> None:
            ...

        if __name__ == "__main__":
            main()
    """
    if inspect.iscoroutinefunction(fn):
        async_fn = cast("Callable[P, Any]", fn)

        @functools.wraps(fn)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await async_fn(*args, **kwargs)
            except BaseException as exc:
                _record_exc(exc)
                raise

        return cast("Callable[P, R]", async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            _record_exc(exc)
            raise

    return wrapper


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0] if len(lines) == 1 else f"{lines[0]} [...]"
    if len(line) > MESSAGE_MAX:
        line = line[: MESSAGE_MAX - 3] + "..."
    return line


def read_error_file(path: Path) -> ErrorInfo | None:
    """Parse corral's or PyTorch's error-file format; ``None`` if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > ERROR_FILE_MAX:
                return None
            content = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict):
        return None
    message = content.get("message")
    if isinstance(message, dict):  # PyTorch's @record format
        extra = message.get("extraInfo")
        extra = extra if isinstance(extra, dict) else {}
        text = str(message.get("message") or "")
        tb = extra.get("py_callstack")
        return ErrorInfo(
            content=content,
            message=_one_line(text) or "error recorded (no message)",
            traceback=str(tb) if tb else (text or None),
            timestamp=_float(extra.get("timestamp", content.get("timestamp"))),
        )
    tb = content.get("traceback") or content.get("errorTraceback")
    return ErrorInfo(
        content=content,
        message=_one_line(str(message or "")) or "error recorded (no message)",
        traceback=str(tb) if tb else None,
        timestamp=_float(content.get("timestamp")),
    )


def _float(value: object) -> float | None:
    """A timestamp as float seconds: accepts numbers and numeric strings (PyTorch's)."""
    if isinstance(value, bool) or value is None:
        return None
    if not isinstance(value, (int, float, str)):
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) and result > 0 else None


record.__module__ = "corral"
