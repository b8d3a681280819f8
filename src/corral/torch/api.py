"""Mirror of ``torch.distributed.elastic.multiprocessing.api``: ``corral.torch``'s names."""

from . import *  # noqa: F403
from . import __all__ as __all__
from ._api import validate_full_rank as _validate_full_rank  # noqa: F401
from ._api import wrap as _wrap  # noqa: F401
