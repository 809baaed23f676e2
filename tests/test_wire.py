"""Unit tests of sagellm_comm.wire: framing, header decoding and the handshake checks."""

from __future__ import annotations

import struct

import msgspec
import pytest

import sagellm_comm as sc
from sagellm_comm import wire
from sagellm_comm.wire import (
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    Abort,
    Bye,
    Cancel,
    Challenge,
    Data,
    Fingerprint,
    Heartbeat,
    Hello,
    Reject,
    Welcome,
    check_hello,
    decode,
    encode,
    make_hello,
    new_nonce,
    parse_prefix,
)

MAX_PAYLOAD = 1 << 20
TOKEN = "tok-7f3a9c1e-SECRET"

FP = Fingerprint(3, "all_reduce", "float32", (4, 5), -1, "sum")

MESSAGES = [
    Data(0, 0, 100, "world", 3, 7, FP),
    Data(12, 4096, 8192, "world/0,1#0", -1, 42, None),
    Data(1, 0, 0, "", 0, 0, Fingerprint(0, "barrier", "", ())),
    Data(2, 0, 16, "g", 9, 1, Fingerprint(9, "broadcast", "bfloat16", (2, 2, 2), 1)),
    Cancel(5, "sender cancelled"),
    Abort("world", 4, "rank 2 timed out", "aborted", -1),
    Abort("world/1,2#0", 0, "mismatch: shape", "mismatch"),
    Abort("world", 1, "gone", "peer_lost", 3),
    Heartbeat(),
    Bye(),
    Bye("closing"),
    Challenge(VERSION, b"\x00\x01" * 8),
    Hello(VERSION, "w-1", 2, 4, b"m" * 32, "tcp://127.0.0.1:1234"),
    Hello(VERSION, "w-1", 0, 1, b""),
    Welcome(3),
    Welcome(0, "w-1", ["tcp://a:1", "tcp://b:2"]),
    Reject("wrong token"),
]


def _split(frame: bytes) -> tuple[bytes, bytes]:
    return frame[:PREFIX_SIZE], frame[PREFIX_SIZE:]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("payload", [0, 1, 4096, MAX_PAYLOAD])
def test_round_trip(msg: wire.Message, payload: int) -> None:
    frame = encode(msg, payload)
    prefix, header = _split(frame)
    assert len(prefix) == PREFIX_SIZE == 16
    hlen, plen = parse_prefix(prefix, max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)
    assert hlen == len(header) > 0
    assert plen == payload
    back = decode(header)
    assert type(back) is type(msg)
    assert back == msg
    # memoryview input works the same
    assert parse_prefix(memoryview(prefix), max_header=MAX_HEADER_BYTES,
                        max_payload=MAX_PAYLOAD) == (hlen, plen)
    assert decode(memoryview(header)) == msg


def test_prefix_layout() -> None:
    frame = encode(Heartbeat(), 77)
    magic, version, hlen, plen = struct.unpack("<HHIQ", frame[:16])
    assert (magic, version, plen) == (MAGIC, VERSION, 77)
    assert hlen == len(frame) - 16


def test_fingerprint_survives_round_trip_with_tuple_shape() -> None:
    msg = decode(_split(encode(Data(0, 0, 8, "g", 1, 0, FP)))[1])
    assert isinstance(msg, Data)
    assert msg.fp == FP
    assert msg.fp is not None and msg.fp.shape == (4, 5)
    assert msg.fp.diff(FP) == []
    other = Fingerprint(3, "all_reduce", "int32", (4, 6), -1, "max")
    assert FP.diff(other) == ["dtype", "shape", "op"]
    assert "shape=(4, 5)" in FP.describe() and "op=sum" in FP.describe()


# -- malformed prefixes ---------------------------------------------------------------------------


def _prefix(magic: int = MAGIC, version: int = VERSION, hlen: int = 10, plen: int = 0) -> bytes:
    return PREFIX.pack(magic, version, hlen, plen)


@pytest.mark.fault("frame prefix with a wrong magic number",
                   "ProtocolError naming the magic")
@pytest.mark.parametrize("magic", [0, 0x4353, 0xFFFF, MAGIC + 1])
def test_bad_magic(magic: int) -> None:
    with pytest.raises(sc.ProtocolError, match="magic"):
        parse_prefix(_prefix(magic=magic), max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)


@pytest.mark.fault("an HTTP request where a frame prefix is expected",
                   "ProtocolError")
def test_http_request_is_not_a_frame() -> None:
    with pytest.raises(sc.ProtocolError):
        parse_prefix(b"GET / HTTP/1.1\r\n", max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)


@pytest.mark.fault("frame prefix of another protocol version",
                   "ProtocolError naming the version")
@pytest.mark.parametrize("version", [0, VERSION + 1, 0xFFFF])
def test_wrong_version(version: int) -> None:
    with pytest.raises(sc.ProtocolError, match="version"):
        parse_prefix(_prefix(version=version), max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)


@pytest.mark.fault("frame prefix announcing a header of 0 bytes or over the limit (up to 2^32-1)",
                   "ProtocolError naming the header")
@pytest.mark.parametrize("hlen", [0, MAX_HEADER_BYTES + 1, 2**32 - 1])
def test_header_length_out_of_range(hlen: int) -> None:
    with pytest.raises(sc.ProtocolError, match="header"):
        parse_prefix(_prefix(hlen=hlen), max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)


@pytest.mark.fault("frame header one byte over the handshake's header limit",
                   "ProtocolError; a header of exactly the limit is accepted")
def test_header_length_limit_is_inclusive() -> None:
    assert parse_prefix(_prefix(hlen=MAX_HEADER_BYTES), max_header=MAX_HEADER_BYTES,
                        max_payload=0) == (MAX_HEADER_BYTES, 0)
    with pytest.raises(sc.ProtocolError):
        parse_prefix(_prefix(hlen=wire.HANDSHAKE_MAX_HEADER_BYTES + 1),
                     max_header=wire.HANDSHAKE_MAX_HEADER_BYTES, max_payload=0)


@pytest.mark.fault("frame prefix announcing a payload over the limit (up to 2^64-1 bytes)",
                   "ProtocolError naming the payload, from the prefix alone; exactly the limit is accepted")
@pytest.mark.parametrize("plen", [MAX_PAYLOAD + 1, 2**63, 2**64 - 1])
def test_payload_too_large(plen: int) -> None:
    with pytest.raises(sc.ProtocolError, match="payload"):
        parse_prefix(_prefix(plen=plen), max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)
    assert parse_prefix(_prefix(plen=MAX_PAYLOAD), max_header=MAX_HEADER_BYTES,
                        max_payload=MAX_PAYLOAD) == (10, MAX_PAYLOAD)


@pytest.mark.fault("frame encoded with a payload one byte over the receiver's limit",
                   "ProtocolError from its prefix")
def test_encoded_oversized_payload_is_refused() -> None:
    prefix, _ = _split(encode(Data(0, 0, 10, "g", 0, 0), MAX_PAYLOAD + 1))
    with pytest.raises(sc.ProtocolError):
        parse_prefix(prefix, max_header=MAX_HEADER_BYTES, max_payload=MAX_PAYLOAD)


# -- malformed headers ----------------------------------------------------------------------------


@pytest.mark.fault("undecodable frame header (invalid or truncated msgpack, unknown tag, wrong field types, "
                   "missing fields, not an array, empty)",
                   "ProtocolError 'undecodable'")
@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",  # never-used msgpack byte
        b"\xff\xff\xff\xff",
        b"\x93\x01",  # truncated array
        b"not msgpack at all",
        msgspec.msgpack.encode({"hello": 1}),
        msgspec.msgpack.encode(["zz", 1, 2]),  # unknown tag
        msgspec.msgpack.encode(["d", "x", 0, 0, "g", 0, 0]),  # wrong field type
        msgspec.msgpack.encode(["d", 1]),  # missing fields
        msgspec.msgpack.encode(["C", 1]),  # challenge without nonce
        msgspec.msgpack.encode(42),
        b"",
    ],
)
def test_garbage_headers(header: bytes) -> None:
    with pytest.raises(sc.ProtocolError, match="undecodable"):
        decode(header)


@pytest.mark.fault("Hello header cut short (1 byte, half, all but one byte)",
                   "ProtocolError")
def test_truncated_frame_header() -> None:
    _, header = _split(encode(Hello(VERSION, "w", 1, 2, b"x" * 32)))
    for cut in (1, len(header) // 2, len(header) - 1):
        with pytest.raises(sc.ProtocolError):
            decode(header[:cut])


def test_protocol_error_is_a_comm_error() -> None:
    assert issubclass(sc.ProtocolError, sc.CommError)
    assert issubclass(sc.AuthError, sc.CommError)


# -- handshake ----------------------------------------------------------------------------------


def _wire_trip(h: Hello) -> wire.Message:
    return decode(_split(encode(h))[1])


def test_nonce_is_random() -> None:
    a, b = new_nonce(), new_nonce()
    assert len(a) == 16 and isinstance(a, bytes)
    assert a != b


@pytest.mark.parametrize("world_id", ["w-1", None])
def test_correct_token_accepted(world_id: str | None) -> None:
    nonce = new_nonce()
    h = make_hello(TOKEN, nonce, "w-1", 2, 4, "tcp://10.0.0.1:9")
    assert TOKEN.encode() not in msgspec.msgpack.encode(h)  # the token never travels
    got = check_hello(_wire_trip(h), TOKEN, nonce, world_id=world_id, world_size=4)
    assert isinstance(got, Hello)
    assert (got.rank, got.world_size, got.world_id, got.address) == (2, 4, "w-1", "tcp://10.0.0.1:9")


def _auth_fails(h: object, *, token: str = TOKEN, nonce: bytes, world_id: str | None = "w-1",
                world_size: int = 4, match: str | None = None) -> sc.AuthError:
    with pytest.raises(sc.AuthError, match=match) as info:
        check_hello(h, token, nonce, world_id=world_id, world_size=world_size)
    msg = str(info.value)
    assert TOKEN not in msg
    assert "wrong-token" not in msg
    assert "SECRET" not in msg
    return info.value


@pytest.mark.fault("Hello signed with the wrong token (or checked with the wrong one)",
                   "AuthError naming neither token")
def test_wrong_token_rejected() -> None:
    nonce = new_nonce()
    h = make_hello("wrong-token", nonce, "w-1", 1, 4)
    _auth_fails(_wire_trip(h), nonce=nonce, match="token")
    # and the other way round: the acceptor has the wrong token
    good = make_hello(TOKEN, nonce, "w-1", 1, 4)
    with pytest.raises(sc.AuthError) as info:
        check_hello(good, "wrong-token", nonce, world_id="w-1", world_size=4)
    assert TOKEN not in str(info.value) and "wrong-token" not in str(info.value)


@pytest.mark.fault("Hello signed with an empty token, a prefix of the token, or the token plus a character",
                   "AuthError naming no token")
def test_empty_token_and_token_prefix_rejected() -> None:
    nonce = new_nonce()
    _auth_fails(make_hello("", nonce, "w-1", 1, 4), nonce=nonce)
    _auth_fails(make_hello(TOKEN[:-1], nonce, "w-1", 1, 4), nonce=nonce)
    _auth_fails(make_hello(TOKEN + "x", nonce, "w-1", 1, 4), nonce=nonce)


@pytest.mark.fault("Hello replayed against another nonce",
                   "AuthError (token check) naming no token")
def test_replayed_hello_with_other_nonce_rejected() -> None:
    h = make_hello(TOKEN, new_nonce(), "w-1", 1, 4)
    _auth_fails(h, nonce=new_nonce(), match="token")


@pytest.mark.fault("Hello with a tampered rank or world id, or a zeroed or empty MAC",
                   "AuthError naming no token")
def test_tampered_fields_break_the_mac() -> None:
    nonce = new_nonce()
    h = make_hello(TOKEN, nonce, "w-1", 1, 4)
    _auth_fails(msgspec.structs.replace(h, rank=2), nonce=nonce)
    _auth_fails(msgspec.structs.replace(h, world_id="w-2"), nonce=nonce, world_id=None)
    _auth_fails(msgspec.structs.replace(h, mac=b"\x00" * 32), nonce=nonce)
    _auth_fails(msgspec.structs.replace(h, mac=b""), nonce=nonce)


@pytest.mark.fault("Hello from another group (other world id)",
                   "AuthError 'another group' naming both world ids")
def test_wrong_world_id_rejected() -> None:
    nonce = new_nonce()
    h = make_hello(TOKEN, nonce, "other-world", 1, 4)
    err = _auth_fails(h, nonce=nonce, world_id="w-1", match="another group")
    assert "other-world" in str(err) and "w-1" in str(err)


@pytest.mark.fault("Hello with another world_size",
                   "AuthError naming the world_size it sent")
@pytest.mark.parametrize("theirs", [1, 3, 5, 8])
def test_wrong_world_size_rejected(theirs: int) -> None:
    nonce = new_nonce()
    h = make_hello(TOKEN, nonce, "w-1", 0, theirs)
    err = _auth_fails(h, nonce=nonce, world_size=4, match="world_size")
    assert str(theirs) in str(err)


@pytest.mark.fault("Hello with a rank out of range (-1, world_size, 100)",
                   "AuthError naming the rank")
@pytest.mark.parametrize("rank", [-1, 4, 100])
def test_rank_out_of_range_rejected(rank: int) -> None:
    nonce = new_nonce()
    h = make_hello(TOKEN, nonce, "w-1", rank, 4)
    _auth_fails(h, nonce=nonce, world_size=4, match="rank")


@pytest.mark.fault("another message (or None, or raw bytes) where a Hello is expected; a Hello of another version",
                   "ProtocolError (naming the version for the latter)")
def test_non_hello_and_wrong_version_are_protocol_errors() -> None:
    nonce = new_nonce()
    for msg in (Welcome(0), Heartbeat(), Reject("x"), Challenge(VERSION, nonce), None, b"hello"):
        with pytest.raises(sc.ProtocolError):
            check_hello(msg, TOKEN, nonce, world_id="w-1", world_size=4)
    h = make_hello(TOKEN, nonce, "w-1", 1, 4)
    with pytest.raises(sc.ProtocolError, match="version"):
        check_hello(msgspec.structs.replace(h, version=VERSION + 1), TOKEN, nonce,
                    world_id="w-1", world_size=4)


def test_every_rank_in_range_accepted() -> None:
    nonce = new_nonce()
    for rank in range(4):
        h = make_hello(TOKEN, nonce, "w-1", rank, 4)
        assert check_hello(h, TOKEN, nonce, world_id="w-1", world_size=4).rank == rank
