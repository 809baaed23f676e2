"""Which transport reaches which peer.

Every rank advertises an address set (`tcp://…,shm://…`): one address per
transport it listens on. The dialing side of each link picks from the acceptor's
set, so the two ends never need to agree beforehand. With the default `auto`,
a peer on the same host (same boot and network namespace, see `shm.host_key`) is
reached through shared memory and any other through TCP; UCX is used only when
asked for, since it is an optional install with its own tuning.
"""

from __future__ import annotations

import os

from ..errors import InvalidArgument
from .shm import host_key, parse_address, shm_supported

SETTINGS = ("auto", "tcp", "shm", "ucx")
ENV = "SAGELLM_COMM_TRANSPORT"


def setting(requested: str | None) -> str:
    """The transport setting in force: the argument, else SAGELLM_COMM_TRANSPORT, else auto."""
    value = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if value not in SETTINGS:
        source = "transport=" if requested else f"{ENV}="
        raise InvalidArgument(f"{source}{value!r} is not a transport setting; use one of {', '.join(SETTINGS)}")
    return value


def listen_schemes(value: str) -> list[str]:
    """The transports a rank with this setting listens on (what it advertises)."""
    if value == "auto":
        return ["tcp", "shm"] if shm_supported()[0] else ["tcp"]
    if value == "shm":
        ok, why = shm_supported()
        if not ok:
            raise InvalidArgument(f"transport 'shm' was asked for, but {why}")
    return [value]


def parse_address_set(addresses: str) -> dict[str, str]:
    """'tcp://h:p,shm://k/n' -> {'tcp': 'tcp://h:p', 'shm': 'shm://k/n'}."""
    out: dict[str, str] = {}
    for addr in filter(None, (a.strip() for a in addresses.split(","))):
        scheme, sep, _ = addr.partition("://")
        if not sep:
            raise InvalidArgument(f"address {addr!r} has no scheme")
        out.setdefault(scheme, addr)
    return out


def same_host(address: str) -> bool:
    try:
        return parse_address(address)[0] == host_key()
    except InvalidArgument:
        return False


def choose(value: str, theirs: dict[str, str], peer: int) -> tuple[str, str, str]:
    """(scheme, address, reason) for dialing a peer that advertises `theirs`."""
    if value == "auto":
        shm = theirs.get("shm")
        if shm is not None and same_host(shm) and shm_supported()[0]:
            return "shm", shm, "same host"
        if "tcp" in theirs:
            return "tcp", theirs["tcp"], "other host" if shm is not None else "peer offers no shm"
        for scheme in ("shm", "ucx"):
            if scheme in theirs and (scheme != "shm" or same_host(theirs[scheme])):
                return scheme, theirs[scheme], "the only transport the peer offers"
    elif value in theirs:
        if value == "shm" and not same_host(theirs["shm"]):
            raise InvalidArgument(f"transport 'shm' was asked for, but rank {peer} is on another host "
                                  f"(or network namespace); use 'auto' or 'tcp'")
        return value, theirs[value], f"asked for ({ENV} or transport=)"
    offered = ", ".join(sorted(theirs)) or "nothing"
    raise InvalidArgument(f"this rank uses transport {value!r} but rank {peer} offers {offered}; "
                          f"give every rank the same {ENV} (or transport=)")
