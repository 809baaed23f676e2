"""Transports by URL scheme: `inproc://`, `tcp://`, `shm://`, `ucx://`; more register through `register`.

Third-party transports can also be exposed through the `sagellm_comm.transports`
entry-point group; they are loaded the first time an unknown scheme is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from ..errors import InvalidArgument
from .base import Connection, Listener, Transport
from .inproc import InprocTransport
from .shm import ShmTransport
from .tcp import TcpTransport


def _ucx() -> Transport:
    from .ucx import UcxTransport  # imports ucxx only when asked for

    return UcxTransport()


_REGISTRY: dict[str, Callable[[], Transport]] = {
    "tcp": TcpTransport,
    "inproc": InprocTransport,
    "shm": ShmTransport,
    "ucx": _ucx,
}


def register(scheme: str, factory: Callable[[], Transport]) -> None:
    """Make `scheme://` addresses use transports built by `factory`."""
    _REGISTRY[scheme] = factory


def get_transport(scheme: str) -> Transport:
    if scheme not in _REGISTRY:
        for ep in entry_points(group="sagellm_comm.transports"):
            if ep.name == scheme:
                _REGISTRY[scheme] = ep.load()
    try:
        return _REGISTRY[scheme]()
    except KeyError:
        raise InvalidArgument(
            f"unknown transport {scheme!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["Connection", "Listener", "Transport", "available", "get_transport", "register"]
