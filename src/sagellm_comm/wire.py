"""The wire format, sans-io: frame prefix, typed headers, handshake.

A frame is a 16-byte prefix (magic, protocol version, header length, payload
length), a msgpack header that decodes to one of the `msgspec.Struct` types below,
and an optional raw payload. Lengths are checked against hard limits before a
single byte of header or payload is read, so a hostile or corrupt peer cannot
make us allocate. Nothing in this module touches a socket.

Handshake (acceptor speaks first):
    acceptor  -> Challenge(nonce)
    connector -> Hello(version, world_id, rank, world_size, mac=HMAC(token, nonce|world|rank))
    acceptor  -> Welcome(rank) | Reject(reason)
The token never travels; MACs are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any

import msgspec

from .errors import AuthError, ProtocolError

MAGIC = 0x5343  # "SC"
VERSION = 1
PREFIX = struct.Struct("<HHIQ")  # magic, version, header length, payload length
PREFIX_SIZE = PREFIX.size
MAX_HEADER_BYTES = 64 * 1024
HANDSHAKE_MAX_HEADER_BYTES = 4096
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024


class Fingerprint(msgspec.Struct, array_like=True, frozen=True):
    """What every rank must agree on for one collective."""

    seq: int
    kind: str
    dtype: str
    shape: tuple[int, ...]
    root: int = -1
    op: str = ""

    def describe(self) -> str:
        parts = [f"{self.kind} #{self.seq}", f"dtype={self.dtype}", f"shape={self.shape}"]
        if self.root >= 0:
            parts.append(f"root={self.root}")
        if self.op:
            parts.append(f"op={self.op}")
        return " ".join(parts)

    def diff(self, other: Fingerprint) -> list[str]:
        """Names of the fields on which two fingerprints disagree."""
        return [f for f in ("seq", "kind", "dtype", "shape", "root", "op")
                if getattr(self, f) != getattr(other, f)]


class Data(msgspec.Struct, tag="d", array_like=True):
    """One frame of a message. A message may span frames; `offset` places this one.

    `group`, `seq`, `tag` name the channel the receiver matches on (seq is -1 for
    point-to-point); `fp` is the collective's fingerprint (None for p2p);
    `dtype`/`shape` describe what the sender sent.
    """

    mid: int
    offset: int
    total: int
    group: str
    seq: int
    tag: int
    fp: Fingerprint | None = None


class Cancel(msgspec.Struct, tag="x", array_like=True):
    """The sender gave up on message `mid` after sending part of it."""

    mid: int
    reason: str


class Abort(msgspec.Struct, tag="a", array_like=True):
    """A rank failed or cancelled collective `seq` of `group`; the group is broken.

    `cause` tells receivers which error to raise: "aborted" (CollectiveAborted),
    "mismatch" (CollectiveMismatch) or "peer_lost" (PeerLost, `peer` says who).
    """

    group: str
    seq: int
    reason: str
    cause: str = "aborted"
    peer: int = -1


class Heartbeat(msgspec.Struct, tag="h", array_like=True):
    pass


class Bye(msgspec.Struct, tag="b", array_like=True):
    """The peer is closing its communicator on purpose."""

    reason: str = ""


class Challenge(msgspec.Struct, tag="C", array_like=True):
    version: int
    nonce: bytes


class Hello(msgspec.Struct, tag="H", array_like=True):
    version: int
    world_id: str
    rank: int
    world_size: int
    mac: bytes
    address: str = ""  # where this rank accepts data connections (rendezvous only)
    nonce: bytes = b""  # the connector's own challenge: the Welcome must answer it


class Welcome(msgspec.Struct, tag="W", array_like=True):
    rank: int
    world_id: str = ""
    addresses: list[str] = []  # rendezvous only: every rank's data address, by rank
    mac: bytes = b""  # proves the acceptor knows the token too (answers Hello.nonce)


class Reject(msgspec.Struct, tag="R", array_like=True):
    reason: str


Message = Data | Cancel | Abort | Heartbeat | Bye | Challenge | Hello | Welcome | Reject

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(header: Message, payload_nbytes: int = 0) -> bytes:
    """Prefix and header of a frame; the payload (if any) follows on the wire."""
    body = _encoder.encode(header)
    return PREFIX.pack(MAGIC, VERSION, len(body), payload_nbytes) + body


def parse_prefix(prefix: bytes | memoryview, *, max_header: int, max_payload: int) -> tuple[int, int]:
    """(header length, payload length) of a frame, checked against the limits."""
    magic, version, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic 0x{magic:04x} (expected 0x{MAGIC:04x}): not a sagellm-comm peer")
    if version != VERSION:
        raise ProtocolError(f"peer speaks protocol version {version}, this process speaks {VERSION}")
    if hlen == 0 or hlen > max_header:
        raise ProtocolError(f"frame header of {hlen} bytes is outside 1..{max_header}")
    if plen > max_payload:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {max_payload}")
    return hlen, plen


def decode(header: bytes | memoryview) -> Message:
    try:
        msg: Message = _decoder.decode(header)
        return msg
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        # msgspec raises UnicodeDecodeError (not DecodeError) for a str that is not UTF-8
        raise ProtocolError(f"undecodable frame header: {e}") from None


def new_nonce() -> bytes:
    return os.urandom(16)


def _mac(token: str, nonce: bytes, world_id: str, rank: int) -> bytes:
    msg = nonce + world_id.encode() + rank.to_bytes(4, "little", signed=True)
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def make_hello(token: str, nonce: bytes, world_id: str, rank: int, world_size: int, address: str = "",
               own_nonce: bytes = b"") -> Hello:
    return Hello(VERSION, world_id, rank, world_size, _mac(token, nonce, world_id, rank), address, own_nonce)


def _welcome_mac(token: str, nonce: bytes, rank: int, world_id: str, addresses: list[str]) -> bytes:
    msg = b"welcome\0" + nonce + msgspec.msgpack.encode([rank, world_id, addresses])
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def make_welcome(token: str, hello: Hello, rank: int, world_id: str = "", addresses: list[str] | None = None
                 ) -> Welcome:
    """The acceptor's answer to `hello`, signed over the connector's nonce (and the address table)."""
    table = list(addresses or [])
    return Welcome(rank, world_id, table, _welcome_mac(token, hello.nonce, rank, world_id, table))


def check_welcome(welcome: Welcome, token: str, nonce: bytes) -> Welcome:
    """The connector's side of mutual authentication: only a holder of the token can sign `nonce`.

    Without it, a process squatting on the master's port could hand out an address
    table of its own choosing, or pose as a peer and be sent our data.
    """
    expected = _welcome_mac(token, nonce, welcome.rank, welcome.world_id, welcome.addresses)
    if not hmac.compare_digest(expected, welcome.mac):
        raise AuthError("the listener answered without proving it knows the auth token: "
                        "it is not a rank of this world (or has another token)")
    return welcome


def check_hello(hello: Any, token: str, nonce: bytes, *, world_id: str | None, world_size: int) -> Hello:
    """Validate a Hello against our token and world; raise AuthError naming the problem.

    `world_id` None accepts any world id (the rendezvous learns it from rank 0).
    """
    if not isinstance(hello, Hello):
        raise ProtocolError(f"expected a Hello frame, got {type(hello).__name__}")
    if hello.version != VERSION:
        raise ProtocolError(f"peer speaks protocol version {hello.version}, this process {VERSION}")
    if not -(2**31) <= hello.rank < 2**31:  # the MAC covers the rank as 32 bits: _mac would raise OverflowError
        raise ProtocolError(f"peer claims rank {hello.rank}, which does not fit the protocol's 32 bits")
    expected = _mac(token, nonce, hello.world_id, hello.rank)
    if not hmac.compare_digest(expected, hello.mac):
        raise AuthError(f"rank {hello.rank} presented a wrong auth token")
    if world_id is not None and hello.world_id != world_id:
        raise AuthError(f"rank {hello.rank} belongs to another group ({hello.world_id!r}, not {world_id!r})")
    if hello.world_size != world_size:
        raise AuthError(f"rank {hello.rank} was started with world_size={hello.world_size}, "
                        f"this process with world_size={world_size}")
    if not 0 <= hello.rank < world_size:
        raise AuthError(f"peer claims rank {hello.rank}, outside 0..{world_size - 1}")
    return hello
