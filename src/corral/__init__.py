"""corral: an asyncio-native process supervisor.

Start N ranks (commands or Python callables), stream their output to per-rank
log files and a prefixed console tee, report the first failure's root cause,
and close with SIGTERM, a grace period and SIGKILL, leaving no process behind.
"""

from ._config import SpawnOptions as SpawnOptions
from ._errors import ConfigError as ConfigError
from ._errors import CorralError as CorralError
from ._events import Event as Event
from ._group import Group as Group
from ._group import run as run
from ._group import spawn as spawn
from ._lines import Line as Line
from ._lines import Lines as Lines
from ._record import record as record
from ._rendezvous import Rendezvous as Rendezvous
from ._result import Failure as Failure
from ._result import GroupFailedError as GroupFailedError
from ._result import RankLogs as RankLogs
from ._result import Result as Result
from ._stats import RankStats as RankStats
from ._std import Std as Std

__version__ = "0.1.0"

__all__ = (
    "ConfigError",
    "CorralError",
    "Event",
    "Failure",
    "Group",
    "GroupFailedError",
    "Line",
    "Lines",
    "RankLogs",
    "RankStats",
    "Rendezvous",
    "Result",
    "SpawnOptions",
    "Std",
    "record",
    "run",
    "spawn",
)

for _exc in (ConfigError, CorralError, GroupFailedError):
    _exc.__module__ = "corral"
del _exc
Rendezvous.__module__ = "corral"
Event.__module__ = "corral"
Line.__module__ = "corral"
Lines.__module__ = "corral"
RankStats.__module__ = "corral"
