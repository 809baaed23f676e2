"""Typed errors: every failure a caller can see is a `CommError` subclass.

Messages name the rank, the op and, where there is one, the fix. Low-level
errors (socket resets, decode failures) are mapped into these types at the
transport and wire boundaries so that no `OSError` or `msgspec` error leaks out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CommError(Exception):
    """Base class of every error sagellm-comm raises on purpose."""


class PeerLost(CommError):
    """A peer process died, closed its communicator, or stopped answering heartbeats.

    `peer` is the lost process's world rank (its rank in the `init_process_group`
    world, whatever sub-group the op ran in), or None where it is not known.
    """

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class CommTimeout(CommError, TimeoutError):
    """A `timeout=` given to init or to an op expired before it completed."""


class CollectiveMismatch(CommError):
    """Ranks disagree on a collective's kind, dtype, shape, root or op.

    Raised on every rank of the group; the message names both sides. The group is
    broken afterwards (some ranks may have moved data already): rebuild it.
    """


class CollectiveAborted(CommError):
    """A collective was cancelled or failed on some rank; the group must be rebuilt."""


class TransferCancelled(CommError):
    """The other side cancelled a point-to-point message before all of it was sent."""


class KVChecksumError(CommError):
    """KV bytes arrived that do not match the sender's checksum; names request, layer and block.

    The layer is not reported complete; the transfer ends on both sides.
    """

    def __init__(self, message: str, *, request_id: object = None, layer: int | None = None,
                 block: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.layer = layer
        self.block = block


class KVMismatch(CommError):
    """The two ends of a KV transfer disagree: cache layout, number of blocks or codec."""


class ProtocolError(CommError):
    """A peer sent bytes that are not a valid frame (bad magic, oversized, undecodable)."""


class AuthError(CommError):
    """A handshake failed: wrong or missing token, or a peer from another group."""


class CommClosed(CommError):
    """The communicator was closed (or aborted) and cannot run new ops."""


class InvalidArgument(CommError, ValueError):
    """A caller passed a bad argument: rank out of range, unknown op, bad shape."""


class UnsupportedBuffer(CommError, TypeError):
    """A buffer's type, dtype, device or layout is not supported for this op."""


class BackendUnavailable(CommError):
    """A device backend (NCCL, RCCL, HCCL, CNCL) cannot be used here; the message says what to install.

    Raised for a backend asked for by name whose vendor package is missing, and for
    tensors of a device whose lane cannot open (naming the device and the backend).
    """


class MessageMismatch(CommError, ValueError):
    """A point-to-point message does not fit the buffer posted to receive it.

    The message is kept: a later `recv` with a buffer of the right size gets it.
    """


def restate(error: CommError, message: str) -> CommError:
    """A new error of the same type and fields as `error`, with `message`."""
    if isinstance(error, PeerLost):
        return PeerLost(message, peer=error.peer)
    return type(error)(message)


@contextmanager
def unwrap_group_errors() -> Iterator[None]:
    """Re-raise the first CommError of an ExceptionGroup from an internal task group.

    Our own task groups are implementation details: callers should see the typed
    error (PeerLost, AuthError, ...) rather than a group wrapping it.
    """
    try:
        yield
    except BaseExceptionGroup as eg:
        flat: list[BaseException] = []

        def walk(e: BaseException) -> None:
            if isinstance(e, BaseExceptionGroup):
                for sub in e.exceptions:
                    walk(sub)
            else:
                flat.append(e)

        walk(eg)
        for e in flat:
            if isinstance(e, CommError):
                raise e from eg
        if len(flat) == 1:
            raise flat[0] from eg
        raise


__all__ = [
    "BackendUnavailable",
    "CollectiveAborted",
    "CollectiveMismatch",
    "CommClosed",
    "CommError",
    "CommTimeout",
    "InvalidArgument",
    "KVChecksumError",
    "KVMismatch",
    "MessageMismatch",
    "PeerLost",
    "ProtocolError",
    "TransferCancelled",
    "UnsupportedBuffer",
]
