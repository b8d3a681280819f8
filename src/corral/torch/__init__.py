"""corral.torch: ``torch.distributed.elastic.multiprocessing``'s API on corral.

Change one import and keep the code::

    # from torch.distributed.elastic.multiprocessing import start_processes, DefaultLogsSpecs
    from corral.torch import start_processes, DefaultLogsSpecs

``start_processes`` returns a ``PContext`` whose ``wait``/``close``/``pids``
are synchronous, as PyTorch's; underneath, corral's core runs the ranks on its
private event-loop thread: failures are seen when a rank exits (not at the
next poll), closing reaches every descendant, and the ranks die with the
supervisor. torch itself is not needed (nor imported). The differences from
PyTorch are listed in the README ("Drop-in for
torch.distributed.elastic.multiprocessing").
"""

from ._api import DefaultLogsSpecs as DefaultLogsSpecs
from ._api import LogsDest as LogsDest
from ._api import LogsSpecs as LogsSpecs
from ._api import ProcessFailure as ProcessFailure
from ._api import RunProcsResult as RunProcsResult
from ._api import SignalException as SignalException
from ._api import Std as Std
from ._api import record as record
from ._api import to_map as to_map
from ._api import validate_full_rank as _validate_full_rank  # noqa: F401 - PyTorch's tests import it
from ._api import wrap as _wrap  # noqa: F401 - PyTorch's tests import it
from ._context import MultiprocessContext as MultiprocessContext
from ._context import PContext as PContext
from ._context import SubprocessContext as SubprocessContext
from ._context import start_processes as start_processes

__all__ = (
    "DefaultLogsSpecs",
    "LogsDest",
    "LogsSpecs",
    "MultiprocessContext",
    "PContext",
    "ProcessFailure",
    "RunProcsResult",
    "SignalException",
    "Std",
    "SubprocessContext",
    "record",
    "start_processes",
    "to_map",
)

for _obj in (
    DefaultLogsSpecs,
    LogsDest,
    LogsSpecs,
    MultiprocessContext,
    PContext,
    ProcessFailure,
    RunProcsResult,
    SignalException,
    Std,
    SubprocessContext,
    record,
    start_processes,
    to_map,
):
    _obj.__module__ = "corral.torch"
del _obj
