"""sagellm-comm: awaitable collectives, point-to-point and KV transfer for LLM inference.

    async with sagellm_comm.init_process_group("env://") as comm:
        await comm.all_reduce(x)
"""

from . import testing
from .errors import (
    AuthError,
    CollectiveAborted,
    CollectiveMismatch,
    CommClosed,
    CommError,
    CommTimeout,
    InvalidArgument,
    MessageMismatch,
    PeerLost,
    ProtocolError,
    TransferCancelled,
    UnsupportedBuffer,
)
from .group import Communicator
from .init import init_process_group
from .scheduler import device

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "CollectiveAborted",
    "CollectiveMismatch",
    "CommClosed",
    "CommError",
    "CommTimeout",
    "Communicator",
    "InvalidArgument",
    "MessageMismatch",
    "PeerLost",
    "ProtocolError",
    "TransferCancelled",
    "UnsupportedBuffer",
    "device",
    "init_process_group",
    "testing",
]
