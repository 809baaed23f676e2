"""Every transport passes the conformance kit in `sagellm_comm.testing.conformance`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from sagellm_comm.testing import conformance
from sagellm_comm.transports.base import Connection
from sagellm_comm.transports.inproc import InprocTransport
from sagellm_comm.transports.shm import ShmTransport, shm_supported
from sagellm_comm.transports.tcp import TcpTransport


@asynccontextmanager
async def _ucx_pair() -> AsyncIterator[tuple[Connection, Connection]]:
    from sagellm_comm.transports import ucx

    async with ucx.ucx_pair() as pair:
        yield pair


def _pair(name: str) -> AbstractAsyncContextManager[tuple[Connection, Connection]]:
    if name == "inproc":
        return conformance.listener_pair(InprocTransport())
    if name == "tcp":
        return conformance.listener_pair(TcpTransport())
    if name == "shm":
        return conformance.listener_pair(ShmTransport())
    return _ucx_pair()


def _skip_reason(name: str) -> str | None:
    if name == "shm":
        ok, why = shm_supported()
        return None if ok else why
    if name == "ucx":
        try:
            from sagellm_comm.transports.ucx import ucx_available
        except ImportError as e:
            return f"ucx transport module missing: {e}"
        ok, why = ucx_available()
        return None if ok else why
    return None


# The checks that inflict a fault, as rows of the reliability report, one per transport.
FAULTS = {
    "cancellation": ("{t} read cancelled while idle; writers cancelled while the reader is not reading",
                     "the stream keeps working: nothing lost, no frame torn"),
    "peer_death": ("{t} connection: one end aborted while the other reads",
                   "PeerLost on the pending read within 10 s, and on writes within 10 s"),
    "oversized_frame": ("{t} frame prefix announcing a 1 TiB payload",
                        "ProtocolError from the prefix; the stream keeps working"),
}
TRANSPORTS = ["inproc", "tcp", "shm", "ucx"]


def _cases() -> list[object]:
    """(transport, check) pairs, the fault checks marked for the report; ids as two parametrizes would give."""
    return [pytest.param(transport, check, id=f"{transport}-{check}",
                         marks=[pytest.mark.fault(FAULTS[check][0].format(t=transport), FAULTS[check][1])]
                         if check in FAULTS else [])
            for transport in TRANSPORTS for check in conformance.CHECKS]


@pytest.mark.anyio
@pytest.mark.parametrize(("transport", "check"), _cases())
async def test_conformance(transport: str, check: str, anyio_backend: str) -> None:
    reason = _skip_reason(transport)
    if reason:
        pytest.skip(reason)
    await conformance.CHECKS[check](lambda: _pair(transport))
