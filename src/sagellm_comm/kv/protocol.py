"""What the two ends of a KV transfer say to each other, besides the KV bytes.

Per request the sender makes one `Offer` (layout, block count, codec, chunking,
and where CUDA IPC can be used, the handles of its cache), and the receiver
answers with `Notice`s: accept (with the first credits), more credits, done,
cancel or fail; the sender's own notices are cancel and fail. Messages have
fixed sizes so that a receive for one can be posted before it arrives.

Channel names: offers for request R travel on `kv|<group>|<channel>|<R>`; the
transfer itself (both directions) on that name plus the sender's random nonce,
so a retried request never meets a stale message of an earlier attempt.
"""

from __future__ import annotations

import struct

import msgspec

from ..errors import KVMismatch, ProtocolError

OFFER_BYTES = 1024  # a request id of up to 256 characters and the fields below; IPC details follow apart
NOTICE_BYTES = 1024
MAX_REASON = 400

TAG_OFFER = 0
TAG_TO_SENDER = 1
TAG_TO_RECEIVER = 2
TAG_DATA = 3
TAG_OFFER_IPC = 4
TAG_SUMS = 5


class IpcHandle(msgspec.Struct, array_like=True):
    """One CUDA allocation of the sender's cache, as torch shares it between processes."""

    key: str  # identifies the allocation across offers (opened once per receiver)
    device: int
    handle: bytes
    size: int
    offset: int  # of the tensors below within the allocation, in bytes
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class IpcTensor(msgspec.Struct, array_like=True):
    """A key or value tensor of one layer: which allocation, and its byte offset there."""

    allocation: int  # index into Offer.ipc
    offset: int


class Offer(msgspec.Struct, array_like=True):
    nonce: int
    request: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    n_blocks: int
    codec: str
    chunk_blocks: int
    checksum: bool
    host: str  # host identity: CUDA IPC only between processes of one boot of one host
    device: str  # "cpu" or "cuda"
    ipc_bytes: int = 0  # size of the `OfferIpc` that follows on the transfer's channel (0: none)
    checksum_kind: str = "xxh3"  # per row: "xxh3" (xxh3-64 of its bytes) or "sum32" (sum of its int32 words)


class OfferIpc(msgspec.Struct, array_like=True):
    """What a receiver on the same host needs to copy straight out of the sender's CUDA cache."""

    ipc: list[IpcHandle]
    keys: list[IpcTensor]
    values: list[IpcTensor]
    ready_event: bytes  # IPC event recorded after the sender's queued writes to the cache
    block_ids: list[int]  # the sender's block ids, which the receiver copies from


class Notice(msgspec.Struct, array_like=True):
    kind: str  # accept | credit | done | cancel | fail
    value: int = 0  # accept/credit: chunks the sender may have sent in all
    path: str = ""  # accept: "stream" (chunks over the link) or "ipc" (the receiver copies)
    error: str = ""  # fail: "checksum" | "mismatch" | "internal"
    reason: str = ""
    layer: int = -1
    block: int = -1


_LEN = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_offer_decoder = msgspec.msgpack.Decoder(Offer)
_offer_ipc_decoder = msgspec.msgpack.Decoder(OfferIpc)
_notice_decoder = msgspec.msgpack.Decoder(Notice)


def pack(msg: Offer | OfferIpc | Notice, size: int | None = None) -> bytes:
    """`msg` framed in exactly `size` bytes (None: as few as it takes): length, msgpack body, zero padding."""
    body = _encoder.encode(msg)
    if size is None:
        size = len(body) + _LEN.size
    if len(body) + _LEN.size > size:
        raise KVMismatch(f"{type(msg).__name__} of {len(body)} bytes does not fit in {size} (request id too long?)")
    return _LEN.pack(len(body)) + body + bytes(size - _LEN.size - len(body))


def unpack_offer(raw: memoryview | bytes) -> Offer:
    msg = _unpack(raw, _offer_decoder)
    assert isinstance(msg, Offer)
    return msg


def unpack_offer_ipc(raw: memoryview | bytes) -> OfferIpc:
    msg = _unpack(raw, _offer_ipc_decoder)
    assert isinstance(msg, OfferIpc)
    return msg


def unpack_notice(raw: memoryview | bytes) -> Notice:
    msg = _unpack(raw, _notice_decoder)
    assert isinstance(msg, Notice)
    return msg


def _unpack(raw: memoryview | bytes, decoder: msgspec.msgpack.Decoder) -> object:  # type: ignore[type-arg]
    (n,) = _LEN.unpack_from(raw)
    if n + _LEN.size > len(raw):
        raise ProtocolError(f"KV control message claims {n} bytes in a frame of {len(raw)}")
    try:
        return decoder.decode(bytes(raw[_LEN.size : _LEN.size + n]))
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed KV control message: {e}") from None


def short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
