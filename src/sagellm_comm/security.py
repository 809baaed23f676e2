"""Where a rank may listen, and what that takes.

A rank listens on loopback unless the init URL (or MASTER_ADDR) names another
address: then its sockets are reachable from other hosts, and anyone who can
reach them could join the world or feed it frames. So listening anywhere but
loopback requires a shared token, checked in the handshake before the peer is
given any buffer. The token itself never appears in a log line or an error.
"""

from __future__ import annotations

import ipaddress

from .errors import InvalidArgument

TOKEN_ENV = "SAGELLM_COMM_TOKEN"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only there (`localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, token: str, rank: int) -> None:
    """Refuse to listen on a non-loopback address without a token (InvalidArgument)."""
    if token or is_loopback(host):
        return
    raise InvalidArgument(
        f"rank {rank} would listen on {host}, which other hosts can reach, without an auth token: "
        f"pass token=... to init_process_group or set {TOKEN_ENV} to the same secret on every rank "
        f"(or use a loopback address such as 127.0.0.1 for a single-host world)")
