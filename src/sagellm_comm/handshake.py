"""Both sides of the hello handshake, over any `Connection`.

Frames read during the handshake are held to the small pre-auth limits (no
payload at all, tiny headers): an unauthenticated peer cannot make us allocate.
A peer that fails the handshake gets a `Reject` naming the reason (never the
token) and its connection is dropped; the listener goes on serving others.
"""

from __future__ import annotations

from . import wire
from .errors import AuthError, CommError, PeerLost, ProtocolError
from .transports.base import Connection
from .wire import Challenge, Hello, Reject, Welcome

TIMEOUT = 10.0  # seconds an accepted connection has to authenticate before it is dropped


async def read_small_frame(conn: Connection) -> wire.Message:
    prefix = await conn.recv_exactly(wire.PREFIX_SIZE)
    hlen, _ = wire.parse_prefix(prefix, max_header=wire.HANDSHAKE_MAX_HEADER_BYTES, max_payload=0)
    return wire.decode(await conn.recv_exactly(hlen))


async def accept(conn: Connection, *, token: str, world_id: str | None, world_size: int) -> Hello:
    """Challenge a connecting peer and check its Hello; raise (after rejecting it) if bad."""
    nonce = wire.new_nonce()
    try:
        await conn.send_frame(wire.encode(Challenge(wire.VERSION, nonce)))
        hello = wire.check_hello(await read_small_frame(conn), token, nonce,
                                 world_id=world_id, world_size=world_size)
    except (AuthError, ProtocolError) as e:
        await reject(conn, str(e))
        raise
    except PeerLost:
        conn.abort()
        raise
    return hello


async def reject(conn: Connection, reason: str) -> None:
    try:
        await conn.send_frame(wire.encode(Reject(reason)))
    except CommError:
        pass
    conn.abort()


async def connect(conn: Connection, *, token: str, world_id: str, rank: int, world_size: int,
                  address: str = "") -> Welcome:
    """Answer the acceptor's challenge; return its Welcome or raise AuthError with its reason."""
    try:
        challenge = await read_small_frame(conn)
        if not isinstance(challenge, Challenge):
            raise ProtocolError(f"expected a Challenge, got {type(challenge).__name__}")
        if challenge.version != wire.VERSION:
            raise ProtocolError(f"peer speaks protocol version {challenge.version}, this process {wire.VERSION}")
        mine = wire.new_nonce()
        hello = wire.make_hello(token, challenge.nonce, world_id, rank, world_size, address, mine)
        await conn.send_frame(wire.encode(hello))
        answer = await read_small_frame(conn)
    except PeerLost as e:
        conn.abort()
        raise PeerLost(f"handshake with {conn.describe()} failed: {e}") from None
    except ProtocolError:
        conn.abort()
        raise
    if isinstance(answer, Reject):
        conn.abort()
        raise AuthError(f"{conn.describe()} refused rank {rank}: {answer.reason}")
    if not isinstance(answer, Welcome):
        conn.abort()
        raise ProtocolError(f"expected Welcome or Reject, got {type(answer).__name__}")
    try:
        return wire.check_welcome(answer, token, mine)
    except AuthError as e:
        conn.abort()
        raise AuthError(f"{conn.describe()}: {e}") from None
