"""`KVChannel`: a request's KV cache moves from a prefill rank to a decode rank as awaitable tasks.

The sender offers the request; nothing of it moves until the receiver has posted
a receive for it and granted credits, one per chunk whose memory is ready. So a
slow receiver slows the sender, and chunks always land in memory that was waiting
for them (in a CPU cache without a codec, the cache blocks themselves), never in
scratch that grows. Layers travel in order, and a layer is reported only once
all of its blocks are written and their checksums match.

Either side may give up at any moment (cancelled, timed out, bad bytes): it
tells the other side, which raises `TransferCancelled` (or the error that ended
it), and only that request ends: every transfer has its own channel names, and
frames of an ended transfer still in flight are dropped on arrival.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ..device_ops import priority_level
from ..errors import (
    CommError,
    CommTimeout,
    InvalidArgument,
    KVChecksumError,
    KVMismatch,
    PeerLost,
    TransferCancelled,
)
from ..scheduler.engine import CONTROL_PRIORITY, Engine
from ..scheduler.matching import Recv
from . import ipc as cuda_ipc
from .chunks import ChannelMemory, Chunk, ChunkSink, ChunkSource, chunk_blocks_for, plan
from .codecs import get_codec
from .layout import KVCache
from .protocol import (
    NOTICE_BYTES,
    OFFER_BYTES,
    TAG_DATA,
    TAG_OFFER,
    TAG_OFFER_IPC,
    TAG_SUMS,
    TAG_TO_RECEIVER,
    TAG_TO_SENDER,
    Notice,
    Offer,
    pack,
    short,
    unpack_notice,
    unpack_offer,
    unpack_offer_ipc,
)

if TYPE_CHECKING:
    from ..group import Communicator

MAX_REQUEST_ID = 256
CPU_CHUNK_BYTES = 8 << 20
CUDA_CHUNK_BYTES = 64 << 20  # one DMA frame (scheduler.engine.DEVICE_FRAME_BYTES)
_DEFAULT: Any = object()


@dataclass
class TransferStats:
    """What one transfer moved and how long it took (as seen by the side that returns it)."""

    request_id: str | int
    nbytes: int  # bytes on the wire (after the codec; checksums included)
    raw_bytes: int  # bytes of the KV blocks moved
    seconds: float
    first_layer_seconds: float  # receiver: until layer 0 was complete; sender: until its chunks were sent
    codec: str
    path: str  # "stream" (chunks over the link) or "ipc" (the receiver copied through CUDA IPC)
    chunks: int

    @property
    def gbps(self) -> float:
        return self.raw_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class _Ended(Exception):
    """Internal: the other side ended the transfer (its notice says why); nothing to tell it."""

    def __init__(self, error: CommError) -> None:
        super().__init__(str(error))
        self.error = error


class _Clock:
    """One deadline for a whole transfer, applied to each wait (never across a `yield`)."""

    def __init__(self, seconds: float | None, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = None if seconds is None else anyio.current_time() + seconds

    @contextmanager
    def limit(self) -> Iterator[None]:
        if self.at is None:
            yield
            return
        try:
            with anyio.fail_after(max(0.0, self.at - anyio.current_time())):
                yield
        except CommTimeout:
            raise
        except TimeoutError:
            raise CommTimeout(f"{self.what} did not complete within {self.seconds:g} s") from None

    async def wait(self, *recvs: Recv) -> None:
        """Until one of `recvs` has finished."""
        if any(r.finished for r in recvs):
            return
        ev = anyio.Event()
        for r in recvs:
            r.notify(ev)
        with self.limit():
            await ev.wait()


class _Inbox:
    """Notices from the other side of one transfer, in order: always one receive posted."""

    def __init__(self, engine: Engine, src: int, channel: tuple[str, int, int]) -> None:
        self.engine = engine
        self.src = src
        self.channel = channel
        self.recv = self._post()

    def _post(self) -> Recv:
        return self.engine.post(self.src, self.channel, memoryview(bytearray(NOTICE_BYTES)), None)

    def take(self) -> Notice | None:
        """The next notice if it has arrived; raises what failed its receive (a lost peer)."""
        r = self.recv
        if not r.finished:
            return None
        if r.error is not None:
            raise r.error
        self.recv = self._post()
        return unpack_notice(r.dest)

    def close(self) -> None:
        self.engine.cancel(self.recv)


def _request_key(request_id: object) -> str:
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise InvalidArgument(f"request_id must be a str or an int, got {type(request_id).__name__}")
    key = f"i:{request_id}" if isinstance(request_id, int) else f"s:{request_id}"
    if len(key) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id is too long ({len(key)} > {MAX_REQUEST_ID} characters)")
    return key


def _remote_error(n: Notice, peer: int, request_id: object) -> CommError:
    """The error a notice from rank `peer` stands for, on this side."""
    if n.kind == "cancel":
        return TransferCancelled(f"rank {peer} ended the transfer of request {request_id!r}: {n.reason}")
    msg = f"rank {peer} failed the transfer of request {request_id!r}: {n.reason}"
    if n.error == "checksum":
        return KVChecksumError(msg, request_id=request_id, layer=n.layer if n.layer >= 0 else None,
                               block=n.block if n.block >= 0 else None)
    if n.error == "mismatch":
        return KVMismatch(msg)
    return TransferCancelled(msg)


def _failure_notice(e: BaseException) -> Notice:
    """What to tell the other side about our own failure `e`."""
    if isinstance(e, KVChecksumError):
        return Notice("fail", error="checksum", reason=short(str(e)), layer=e.layer if e.layer is not None else -1,
                      block=e.block if e.block is not None else -1)
    if isinstance(e, KVMismatch):
        return Notice("fail", error="mismatch", reason=short(str(e)))
    if isinstance(e, CommTimeout):
        return Notice("cancel", reason=short(f"it timed out: {e}"))
    if isinstance(e, CommError):
        return Notice("cancel", reason=short(f"{type(e).__name__}: {e}"))
    if isinstance(e, Exception):
        return Notice("fail", error="internal", reason=short(f"{type(e).__name__}: {e}"))
    return Notice("cancel", reason="it was cancelled")


class KVChannel:
    """KV transfers of one cache over a communicator; both ends create one with the same `name`.

    codec: the sender's default codec (None, "fp8", "int8"); the receiver decodes
    whatever the sender chose. window: chunks in flight per transfer (the
    receiver's memory bound with a codec or a CUDA cache: window x chunk_bytes).
    chunk_bytes: about how many wire bytes one chunk carries (at most one layer); default
    8 MiB for a CPU cache, 64 MiB for a CUDA cache.
    checksum: an xxh3-64 checksum per block row of every chunk, checked on arrival
    (on the CUDA IPC path: a sum per block of source and copy, compared on the device).
    ipc: as a receiver, copy straight out of a sender's CUDA cache on this host
    through CUDA IPC where possible (False: always stream the chunks).
    """

    def __init__(self, comm: Communicator, cache: KVCache, *, name: str = "kv", codec: str | None = None,
                 window: int = 4, chunk_bytes: int | None = None, checksum: bool = True, ipc: bool = True) -> None:
        if not isinstance(cache, KVCache):
            raise InvalidArgument(f"cache must be a sagellm_comm.kv.KVCache, got {type(cache).__name__}")
        if not isinstance(window, int) or window < 1:
            raise InvalidArgument(f"window must be a positive int, got {window!r}")
        if chunk_bytes is None:  # a CUDA chunk costs a few device waits and DMA setups: make them count
            chunk_bytes = CUDA_CHUNK_BYTES if cache.is_cuda else CPU_CHUNK_BYTES
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise InvalidArgument(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if "|" in name:
            raise InvalidArgument(f"channel name {name!r} must not contain '|'")
        self.comm = comm
        self.cache = cache
        self.name = name
        self.codec = get_codec(codec).name
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.checksum = bool(checksum)
        self.ipc = bool(ipc)
        self._busy: set[tuple[str, int, str]] = set()
        self.counters = dict.fromkeys(("transfers_sent", "transfers_received", "chunks_sent", "chunks_received",
                                       "bytes_sent", "bytes_received", "failed"), 0)
        self._ipc_opened = cuda_ipc.OpenedHandles()
        self._ipc_shared: cuda_ipc.Shared | None = None  # this cache's IPC handles, made on the first CUDA send
        self._memory = ChannelMemory(cache)

    def __repr__(self) -> str:
        return f"<KVChannel {self.name!r} on {self.comm!r} for {self.cache!r}>"

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def _engine(self) -> Engine:
        return self.comm._engine

    def _base(self, key: str) -> str:
        return f"kv|{self.comm.group_id}|{self.name}|{key}"

    def _claim(self, side: str, peer: int, key: str, request_id: object) -> tuple[str, int, str]:
        slot = (side, peer, key)
        if slot in self._busy:
            what = "sending request {!r} to" if side == "send" else "receiving request {!r} from"
            raise InvalidArgument(f"already {what.format(request_id)} rank {peer} on this channel")
        self._busy.add(slot)
        return slot

    def _clock(self, timeout: float | None, what: str) -> _Clock:
        limit = timeout if timeout is not None else self.comm._timeout
        return _Clock(limit, f"{what} on rank {self.comm.rank} (channel {self.name!r})")

    # -- sending ------------------------------------------------------------------------------
    async def send(self, request_id: str | int, dst: int, block_ids: Sequence[int], *, codec: str | None = _DEFAULT,
                   timeout: float | None = None, priority: str = "low") -> TransferStats:
        """Send the KV of `block_ids` (this cache's blocks, in token order) to group rank `dst`.

        Returns once the receiver has written and verified every layer. The default
        priority is "low", so collectives on the same links go first.
        """
        level = priority_level(priority)
        self.comm._check_p2p(dst, 0, "dst", "kv send")
        key = _request_key(request_id)
        ids = self.cache.check_blocks(block_ids, f"kv send of request {request_id!r}")
        codec_name = get_codec(self.codec if codec is _DEFAULT else codec).name
        slot = self._claim("send", dst, key, request_id)
        try:
            return await self._send(request_id, key, dst, ids, codec_name, level,
                                    self._clock(timeout, f"kv send of request {request_id!r} to rank {dst}"))
        finally:
            self._busy.discard(slot)

    async def _send(self, request_id: str | int, key: str, dst: int, ids: list[int], codec_name: str, level: int,
                    clock: _Clock) -> TransferStats:
        engine = self._engine
        peer = self.comm._group.members[dst]
        layout = self.cache.layout
        enc = get_codec(codec_name).encoded_block_bytes(layout)
        chunk_blocks = chunk_blocks_for(enc, self.chunk_bytes)
        chunks = plan(layout.num_layers, len(ids), chunk_blocks)
        nonce = secrets.randbits(62) + 1
        base = self._base(key)
        ch = f"{base}|{nonce:x}"
        t0 = time.perf_counter()
        source = ChunkSource(self._memory, ids, codec_name, self.checksum, chunk_blocks)  # after queued writes
        offer = Offer(nonce, str(request_id), layout.num_layers, layout.num_kv_heads, layout.head_dim,
                      layout.block_size, layout.dtype, len(ids), codec_name, chunk_blocks, self.checksum,
                      cuda_ipc.host_identity(), "cuda" if self.cache.is_cuda else "cpu",
                      checksum_kind=source.checksum_kind)
        ready = None
        extra = b""
        if self.cache.is_cuda:
            if self._ipc_shared is None:
                self._ipc_shared = cuda_ipc.share(self.cache)
            made = cuda_ipc.offer_ipc(self._ipc_shared, source.stream, ids)
            if made is not None:
                extra, ready = pack(made[0]), made[1]
                offer.ipc_bytes = len(extra)
        inbox = _Inbox(engine, peer, (ch, -1, TAG_TO_SENDER))
        wire = 0
        sent_at = 0.0
        pending: deque[Any] = deque()  # chunks being made ahead of the one on the wire

        async def next_notice() -> Notice:
            while True:
                n = inbox.take()
                if n is not None:
                    if n.kind in ("cancel", "fail"):
                        raise _Ended(_remote_error(n, dst, request_id))
                    return n
                await clock.wait(inbox.recv)

        try:
            with clock.limit():
                await engine.send(peer, (base, -1, TAG_OFFER), memoryview(pack(offer, OFFER_BYTES)), None,
                                  priority=level)
                if extra:
                    await engine.send(peer, (ch, -1, TAG_OFFER_IPC), memoryview(extra), None, priority=level)
            accept = await next_notice()
            path = accept.path
            if path == "stream":
                credit = accept.value
                for i, c in enumerate(chunks):
                    while len(pending) < source.lookahead + 1 and i + len(pending) < len(chunks):
                        pending.append(source.prepare(chunks[i + len(pending)]))
                    while credit <= i:
                        credit = max(credit, (await next_notice()).value)
                    while (n := inbox.take()) is not None:  # more credits, or the receiver gave up meanwhile
                        if n.kind in ("cancel", "fail"):
                            raise _Ended(_remote_error(n, dst, request_id))
                        credit = max(credit, n.value)
                    out = await source.ready(c, pending.popleft())
                    with clock.limit():
                        await engine.send(peer, (ch, -1, TAG_DATA), out.rows, None, priority=level)
                        if out.sums is not None:
                            await engine.send(peer, (ch, -1, TAG_SUMS), out.sums, None, priority=level)
                    nbytes = len(out.rows) + (len(out.sums) if out.sums is not None else 0)
                    wire += nbytes
                    self.counters["chunks_sent"] += 1
                    self.counters["bytes_sent"] += nbytes
                sent_at = time.perf_counter() - t0
            while (await next_notice()).kind != "done":
                pass
        except _Ended as e:
            self.counters["failed"] += 1
            raise e.error from None
        except BaseException as e:
            self.counters["failed"] += 1
            if not isinstance(e, PeerLost):
                engine.notify(peer, (ch, -1, TAG_TO_RECEIVER), pack(_failure_notice(e), NOTICE_BYTES))
            raise
        finally:
            del ready  # the IPC event the receiver waited on lives until here
            inbox.close()
            source.close(in_use=any(isinstance(t, Future) and not t.done() for t in pending))
            engine.discard_channel(ch)
        self.counters["transfers_sent"] += 1
        return TransferStats(request_id, wire, 2 * len(ids) * layout.num_layers * layout.block_bytes,
                             time.perf_counter() - t0, sent_at, codec_name if path == "stream" else "none", path,
                             len(chunks) if wire else 0)

    # -- receiving ----------------------------------------------------------------------------
    def receive(self, request_id: str | int, src: int, block_ids: Sequence[int], *,
                timeout: float | None = None) -> LayerStream:
        """The layers of request `request_id` from group rank `src`, as each lands in `block_ids`.

            async for layer in chan.receive(req, 0, my_blocks):
                ...  # layer `layer`'s K and V are written and verified

        Layers come in order. Leaving the loop early ends the transfer (the sender
        sees TransferCancelled); use `async with chan.receive(...) as layers:` to
        make that happen at once rather than when the iterator is collected.
        """
        self.comm._check_p2p(src, 0, "src", "kv recv")
        key = _request_key(request_id)
        ids = self.cache.check_blocks(block_ids, f"kv receive of request {request_id!r}")
        return LayerStream(self, request_id, key, src, ids, timeout)

    async def recv(self, request_id: str | int, src: int, block_ids: Sequence[int], *,
                   timeout: float | None = None) -> TransferStats:
        """Receive the whole KV of request `request_id` from group rank `src` into `block_ids`."""
        async with self.receive(request_id, src, block_ids, timeout=timeout) as layers:
            async for _ in layers:
                pass
        assert layers.stats is not None
        return layers.stats


class LayerStream:
    """The async iterator `KVChannel.receive` returns; `stats` is set once every layer has landed."""

    def __init__(self, chan: KVChannel, request_id: str | int, key: str, src: int, ids: list[int],
                 timeout: float | None) -> None:
        self.stats: TransferStats | None = None
        self.layers_done = 0
        self._gen = self._run(chan, request_id, key, src, ids, timeout)

    def __aiter__(self) -> LayerStream:
        return self

    async def __anext__(self) -> int:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> LayerStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, chan: KVChannel, request_id: str | int, key: str, src: int, ids: list[int],
                   timeout: float | None) -> AsyncGenerator[int, None]:
        slot = chan._claim("recv", src, key, request_id)
        engine = chan._engine
        peer = chan.comm._group.members[src]
        layout = chan.cache.layout
        clock = chan._clock(timeout, f"kv receive of request {request_id!r} from rank {src}")
        t0 = time.perf_counter()
        first = 0.0
        offer_recv = engine.post(peer, (chan._base(key), -1, TAG_OFFER), memoryview(bytearray(OFFER_BYTES)), None)
        ch: str | None = None
        inbox: _Inbox | None = None
        sink: ChunkSink | None = None
        posted: dict[int, Recv] = {}
        copier: cuda_ipc.LayerCopier | None = None
        try:
            await clock.wait(offer_recv)
            if offer_recv.error is not None:
                raise offer_recv.error
            offer = unpack_offer(offer_recv.dest)
            ch = f"{chan._base(key)}|{offer.nonce:x}"
            inbox = _Inbox(engine, peer, (ch, -1, TAG_TO_RECEIVER))
            _check_offer(offer, chan.cache, ids, src, request_id)
            chunks = plan(layout.num_layers, len(ids), offer.chunk_blocks)
            last_of_layer = {c.layer: c.index for c in chunks}
            opened = None
            if offer.ipc_bytes:
                extra_recv = engine.post(peer, (ch, -1, TAG_OFFER_IPC), memoryview(bytearray(offer.ipc_bytes)), None)
                posted[-1] = extra_recv  # withdrawn with the others if this ends here
                await clock.wait(extra_recv)
                del posted[-1]
                if extra_recv.error is not None:
                    raise extra_recv.error
                extra = unpack_offer_ipc(extra_recv.dest)
                if len(extra.block_ids) != offer.n_blocks:
                    raise KVMismatch(f"request {request_id!r}: rank {src}'s offer lists {len(extra.block_ids)} "
                                     f"block ids for {offer.n_blocks} blocks")
                if chan.ipc:
                    opened = cuda_ipc.try_open(chan._ipc_opened, offer, extra, chan.cache, peer)
            if opened is not None:
                await _notify(engine, peer, ch, Notice("accept", path="ipc"), clock)
                copier = cuda_ipc.LayerCopier(opened, chan._memory, ids, extra.block_ids, offer.checksum, request_id,
                                              chan.comm.rank)
                copier.start()
                for layer in range(layout.num_layers):
                    _raise_if_ended(inbox, src, request_id)
                    await copier.wait(layer)
                    if layer == 0:
                        first = time.perf_counter() - t0
                    self.layers_done = layer + 1
                    yield layer
                wire, path, nchunks = 0, "ipc", 0
                offer.codec = "none"  # copied as they are: nothing to gain from encoding on one host
            else:
                sink = ChunkSink(chan._memory, ids, offer.codec, offer.checksum, offer.checksum_kind,
                                 offer.chunk_blocks, chan.window, request_id, chan.comm.rank)

                async def post(c: Chunk) -> None:
                    rows, sums = await sink.targets(c)
                    posted[2 * c.index] = engine.post(peer, (ch, -1, TAG_DATA), rows, None)
                    if sums is not None:
                        posted[2 * c.index + 1] = engine.post(peer, (ch, -1, TAG_SUMS), sums, None)

                for c in chunks[: chan.window]:
                    await post(c)
                await _notify(engine, peer, ch, Notice("accept", value=min(chan.window, len(chunks)), path="stream"),
                              clock)
                wire = 0
                for c in chunks:
                    parts = [posted[k] for k in (2 * c.index, 2 * c.index + 1) if k in posted]
                    for r in parts:
                        while not r.finished:
                            _raise_if_ended(inbox, src, request_id)
                            await clock.wait(r, inbox.recv)
                        if r.error is not None:
                            raise r.error
                    for k in (2 * c.index, 2 * c.index + 1):
                        posted.pop(k, None)
                    nbytes = sum(r.total for r in parts)
                    wire += nbytes
                    chan.counters["chunks_received"] += 1
                    chan.counters["bytes_received"] += nbytes
                    await sink.land(c)
                    nxt = c.index + chan.window
                    if nxt < len(chunks):
                        await post(chunks[nxt])
                        await _notify(engine, peer, ch, Notice("credit", value=nxt + 1), clock)
                    if last_of_layer[c.layer] == c.index:
                        await sink.layer_done(c.layer)
                        if c.layer == 0:
                            first = time.perf_counter() - t0
                        self.layers_done = c.layer + 1
                        yield c.layer
                path, nchunks = "stream", len(chunks)
            await _notify(engine, peer, ch, Notice("done"), clock)
            chan.counters["transfers_received"] += 1
            self.stats = TransferStats(request_id, wire, 2 * len(ids) * layout.num_layers * layout.block_bytes,
                                       time.perf_counter() - t0, first, offer.codec, path, nchunks)
        except _Ended as e:
            chan.counters["failed"] += 1
            raise e.error from None
        except BaseException as e:
            chan.counters["failed"] += 1
            to_sender = ch
            if to_sender is None and offer_recv.finished and offer_recv.error is None:
                try:  # the offer landed just as we gave up: its sender is waiting, tell it
                    to_sender = f"{chan._base(key)}|{unpack_offer(offer_recv.dest).nonce:x}"
                except CommError:
                    pass
            if to_sender is not None and not isinstance(e, PeerLost):
                engine.notify(peer, (to_sender, -1, TAG_TO_SENDER), pack(_failure_notice(e), NOTICE_BYTES))
            raise
        finally:
            engine.cancel(offer_recv)
            for r in posted.values():
                engine.cancel(r)
            if inbox is not None:
                inbox.close()
            if sink is not None:
                sink.fence()
                sink.close()
            if copier is not None:
                copier.fence()
                copier.close()
            if ch is not None:
                engine.discard_channel(ch)
            chan._busy.discard(slot)


def _raise_if_ended(inbox: _Inbox, peer: int, request_id: object) -> None:
    n = inbox.take()
    if n is not None and n.kind in ("cancel", "fail"):
        raise _Ended(_remote_error(n, peer, request_id))


async def _notify(engine: Engine, peer: int, ch: str, notice: Notice, clock: _Clock) -> None:
    with clock.limit():
        await engine.send(peer, (ch, -1, TAG_TO_SENDER), memoryview(pack(notice, NOTICE_BYTES)), None,
                          priority=CONTROL_PRIORITY)


def _check_offer(offer: Offer, cache: KVCache, ids: list[int], src: int, request_id: object) -> None:
    layout = cache.layout
    theirs = (offer.num_layers, offer.num_kv_heads, offer.head_dim, offer.block_size, offer.dtype)
    mine = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype)
    if theirs != mine:
        raise KVMismatch(f"request {request_id!r}: rank {src}'s cache is {theirs} (layers, kv heads, head dim, "
                         f"block size, dtype) but this cache is {mine}")
    if offer.n_blocks != len(ids):
        raise KVMismatch(f"request {request_id!r}: rank {src} sends {offer.n_blocks} blocks, but {len(ids)} "
                         "block ids were given to receive them")
    try:
        get_codec(offer.codec)
    except InvalidArgument:
        raise KVMismatch(f"request {request_id!r}: rank {src} encodes with {offer.codec!r}, which this side "
                         "does not know") from None


__all__ = ["Chunk", "KVChannel", "LayerStream", "TransferStats"]
