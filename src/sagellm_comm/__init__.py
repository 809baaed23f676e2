"""sagellm-comm: awaitable collectives, point-to-point and KV transfer for LLM inference.

    async with sagellm_comm.init_process_group("env://") as comm:
        await comm.all_reduce(x)
"""

from typing import Any

from . import testing
from .errors import (
    AuthError,
    BackendUnavailable,
    CollectiveAborted,
    CollectiveMismatch,
    CommClosed,
    CommError,
    CommTimeout,
    InvalidArgument,
    KVChecksumError,
    KVMismatch,
    MessageMismatch,
    PeerLost,
    ProtocolError,
    TransferCancelled,
    UnsupportedBuffer,
)
from .group import Communicator
from .init import init_process_group
from .scheduler import device
from .transports.vendor import backend_for

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "kv":  # imported on first use: KV transfer needs torch, the rest does not
        import importlib

        return importlib.import_module(".kv", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuthError",
    "BackendUnavailable",
    "CollectiveAborted",
    "CollectiveMismatch",
    "CommClosed",
    "CommError",
    "CommTimeout",
    "Communicator",
    "InvalidArgument",
    "KVChecksumError",
    "KVMismatch",
    "MessageMismatch",
    "PeerLost",
    "ProtocolError",
    "TransferCancelled",
    "UnsupportedBuffer",
    "backend_for",
    "device",
    "init_process_group",
    "kv",
    "testing",
]
