"""How a chunk of KV blocks becomes bytes on the wire and back, for each kind of cache.

A chunk is a run of a request's blocks in one layer. On the wire it is always
two messages: its rows (its K blocks, then its V blocks, one row of
`encoded_block_bytes` each: the codec's output, or the raw block), then one
checksum per row. So a CPU sender can feed a CUDA receiver and back, with or
without a codec, and the receiver can name the very block whose bytes went bad.

Checksums are computed where the rows are: a CPU sender takes xxh3-64 of each
row as its bytes go out (the CPU's cache still holds them), a CUDA sender the sum
of each row's 32-bit words on the device. The receiver computes the same kind,
wherever its rows land.

Where the rows already sit in host memory (a CPU cache, no codec), the message
is made of the cache's own block memory (`Pieces`): nothing is gathered or
scattered. A CUDA cache gathers and encodes rows on the device, and the rows
travel as device bytes: shared memory copies them by DMA straight between the
GPU and its rings, other transports through pinned bounce buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import xxhash

from ..buffers import DeviceBytes, Pieces, bytes_view
from ..errors import KVChecksumError
from ..scheduler import device
from .codecs import get_codec
from .layout import KVCache


@dataclass(frozen=True)
class Chunk:
    index: int
    layer: int
    start: int  # position of its first block in the request's block list
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


def plan(num_layers: int, n_blocks: int, chunk_blocks: int) -> list[Chunk]:
    """Chunks in the order they travel: layer by layer, each layer's blocks in order."""
    out: list[Chunk] = []
    for layer in range(num_layers):
        for start in range(0, n_blocks, chunk_blocks):
            out.append(Chunk(len(out), layer, start, min(n_blocks, start + chunk_blocks)))
    return out


WORKERS = 2


def chunk_blocks_for(encoded_block_bytes: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (2 * encoded_block_bytes))


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive block ids as [start, stop) ranges: each one contiguous memory in a layer."""
    out: list[tuple[int, int]] = []
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            out.append((start, prev + 1))
            start = i
        prev = i
    out.append((start, prev + 1))
    return out


_workers: ThreadPoolExecutor | None = None


def workers() -> ThreadPoolExecutor:
    """Threads for checksums and CPU codecs: xxh3 and torch release the GIL, so they run beside the
    event loop's transport copies instead of between them (measured: 2.2 -> 3.6 GB/s over shm here)."""
    global _workers
    if _workers is None:
        _workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sagellm-kv")
    return _workers


async def result(fut: Future[Any]) -> Any:
    """`fut`'s result, waiting without blocking the event loop."""
    if not fut.done():
        await anyio.to_thread.run_sync(fut.result)
    return fut.result()


class RowHasher:
    """Checksums of a message's rows, taken as the engine sends or receives their bytes.

    Hashing a row just before its bytes go out, or just after they land, reads
    them from the CPU's cache (xxh3 runs at ~90-130 GB/s there against ~30 from
    memory), and on the sending side leaves them in cache for the copy.
    """

    def __init__(self, rows: Sequence[Any], row_bytes: int, out: np.ndarray[Any, Any], *, ahead: bool) -> None:
        self.rows = rows
        self.row_bytes = row_bytes
        self.out = out
        self.ahead = ahead  # sender: hash every row the window touches; receiver: only rows complete
        self.done = 0

    def __call__(self, start: int, end: int) -> None:
        upto = -(-end // self.row_bytes) if self.ahead else end // self.row_bytes
        upto = min(upto, len(self.rows))
        if upto > self.done:
            hash_rows(self.rows[self.done : upto], self.out[self.done : upto])
            self.done = upto

    def finish(self) -> np.ndarray[Any, Any]:
        self(0, len(self.rows) * self.row_bytes)
        return self.out


def hash_rows(rows: Sequence[Any] | np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    for j, r in enumerate(rows):
        out[j] = xxhash.xxh3_64_intdigest(r)
    return out


def word_sums(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """"sum32" checksums of uint8 rows [n, row_bytes] on the host: what `device_word_sums` gives on a GPU."""
    words = rows.view(np.int32) if rows.shape[1] % 4 == 0 else rows
    return words.sum(axis=1, dtype=np.int64).view(np.uint64)  # type: ignore[no-any-return]


def device_word_sums(rows: Any) -> Any:
    """Per row of a uint8 CUDA tensor [n, row_bytes], the sum of its little-endian int32 words (int64)."""
    torch = _torch()
    words = rows.view(torch.int32) if rows.size(1) % 4 == 0 else rows
    return words.sum(1, dtype=torch.int64)


def check_rows(got: np.ndarray[Any, Any], trailer: np.ndarray[Any, Any], *, request: object, chunk: Chunk,
               dst_ids: Sequence[int], rank: int) -> None:
    """Raise KVChecksumError naming the first row whose bytes differ from the sender's checksum."""
    bad = np.flatnonzero(got != trailer)
    if not len(bad):
        return
    j = int(bad[0])
    kind, pos = ("key", j) if j < chunk.n else ("value", j - chunk.n)
    block = chunk.start + pos
    raise KVChecksumError(
        f"checksum mismatch in request {request!r}, layer {chunk.layer}, {kind} block {block} of the request "
        f"(rank {rank}'s block id {dst_ids[pos]}); {len(bad)} of {2 * chunk.n} rows in this chunk differ",
        request_id=request, layer=chunk.layer, block=block)


def _torch() -> Any:
    import torch

    return torch


class BlockRows:
    """A CPU cache seen as bytes: per layer, K and V as [num_blocks, block_bytes] uint8 arrays."""

    def __init__(self, cache: KVCache) -> None:
        torch = _torch()
        n = cache.num_blocks

        def rows(t: Any) -> np.ndarray[Any, Any]:
            return t.view(torch.uint8).reshape(n, -1).numpy()  # type: ignore[no-any-return]

        self.k = [rows(cache.key(i)) for i in range(cache.layout.num_layers)]
        self.v = [rows(cache.value(i)) for i in range(cache.layout.num_layers)]

    def row_views(self, layer: int, ids: Sequence[int]) -> list[Any]:
        k, v = self.k[layer], self.v[layer]
        return [k[i] for i in ids] + [v[i] for i in ids]

    def pieces(self, layer: int, ids: Sequence[int]) -> Pieces:
        views = [bytes_view(self.k[layer][s:e]) for s, e in runs(ids)]
        views += [bytes_view(self.v[layer][s:e]) for s, e in runs(ids)]
        return Pieces(views)


class Staging:
    """Host rows of one chunk in flight, reused: K rows [0, n), V rows [n, 2n), and their checksums.

    Page-locked for CUDA caches whose rows come from a CPU peer (the copy to the device is asynchronous).
    """

    def __init__(self, blocks: int, enc: int, pinned: bool) -> None:
        torch = _torch()
        self.blocks = blocks
        self.enc = enc
        self.t = torch.empty((2 * blocks, enc), dtype=torch.uint8, pin_memory=pinned)
        self.np: np.ndarray[Any, Any] = self.t.numpy()
        self.sums = np.empty(2 * blocks, dtype=np.uint64)
        self.h2d_done: Any = None  # event of a copy out of these rows to the device still running

    def rows(self, n: int) -> np.ndarray[Any, Any]:
        return self.np[: 2 * n]


class DeviceRows:
    """Device rows of one chunk in flight (CUDA caches), K rows [0, n), V rows [n, 2n), with pinned sums."""

    def __init__(self, blocks: int, enc: int, dev: Any) -> None:
        torch = _torch()
        self.blocks = blocks
        self.enc = enc
        self.t = torch.empty((2 * blocks, enc), dtype=torch.uint8, device=dev)
        self.sums = torch.empty(2 * blocks, dtype=torch.int64, pin_memory=True)
        self.sums_np = self.sums.numpy().view(np.uint64)


class ChannelMemory:
    """Buffers a channel keeps across transfers: pinning host memory and allocating device memory
    take milliseconds, longer than a chunk takes to move."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self._rows: BlockRows | None = None
        self._free: dict[tuple[str, int, int], list[Any]] = {}

    def rows(self) -> BlockRows:
        if self._rows is None:
            self._rows = BlockRows(self.cache)
        return self._rows

    def staging(self, blocks: int, enc: int) -> Staging:
        free = self._free.get(("host", blocks, enc))
        return free.pop() if free else Staging(blocks, enc, pinned=self.cache.is_cuda)

    def device_rows(self, blocks: int, enc: int) -> DeviceRows:
        free = self._free.get(("device", blocks, enc))
        return free.pop() if free else DeviceRows(blocks, enc, self.cache.device)

    def pinned_i64(self, count: int) -> Any:
        """A page-locked int64 tensor of at least `count` elements (give it back with `release_pinned`)."""
        size = 1 << max(10, (count - 1).bit_length())
        free = self._free.get(("pinned", size, 0))
        if free:
            return free.pop()
        torch = _torch()
        return torch.empty(size, dtype=torch.int64, pin_memory=True)

    def release_pinned(self, t: Any) -> None:
        free = self._free.setdefault(("pinned", int(t.numel()), 0), [])
        if len(free) < 8:
            free.append(t)

    def release(self, slots: Sequence[Staging | DeviceRows]) -> None:
        for s in slots:
            free = self._free.setdefault(("host" if isinstance(s, Staging) else "device", s.blocks, s.enc), [])
            if len(free) < 8:
                free.append(s)


@dataclass
class Outgoing:
    """One chunk's two messages: its rows (host ranges or device bytes) and its checksums (or None)."""

    rows: Pieces | DeviceBytes
    sums: memoryview | None


class _ChunkEnd:
    """What both ends of a transfer's chunk stream hold: the cache, the request's block ids in it, the
    codec, a communication stream for a CUDA cache, and `n_slots` reused row buffers."""

    def __init__(self, memory: ChannelMemory, ids: list[int], codec_name: str, checksum: bool, chunk_blocks: int,
                 n_slots: int, on_device: bool) -> None:
        cache = memory.cache
        self.memory = memory
        self.cache = cache
        self.ids = ids
        self.codec = get_codec(codec_name)
        self.checksum = checksum
        self.enc = self.codec.encoded_block_bytes(cache.layout)
        self.inplace = not cache.is_cuda and self.codec.name == "none"
        self.rows = memory.rows() if self.inplace else None
        self.chunk_blocks = chunk_blocks
        self.n_slots = n_slots
        self.on_device = on_device  # rows in device memory (else host rows)
        self.slots: list[Any] = []
        self.stream: Any = None
        self.idx: Any = None
        if cache.is_cuda:
            self.stream = device.comm_stream(cache.device, 0)
            self.stream.wait_stream(_torch().cuda.current_stream(cache.device))  # after the owner's queued work

    def _ids_tensor(self) -> Any:
        """The block ids as a tensor on the cache's device (made on first use: IPC needs none)."""
        if self.idx is None:
            self.idx = _torch().tensor(self.ids, dtype=_torch().long, device=self.cache.device)
        return self.idx

    def _index(self, chunk: Chunk) -> Any:
        return self._ids_tensor()[chunk.start : chunk.stop]

    def _slot(self, chunk: Chunk) -> Any:
        i = chunk.index % self.n_slots
        while len(self.slots) <= i:
            make = self.memory.device_rows if self.on_device else self.memory.staging
            self.slots.append(make(self.chunk_blocks, self.enc))
        return self.slots[i]

    def close(self, in_use: bool = False) -> None:
        """Give the row buffers back for the next transfer; `in_use`: a worker thread may still write
        them (a transfer that ended early), so they are left to the garbage collector instead."""
        if not in_use:
            self.memory.release(self.slots)
        self.slots = []


class ChunkSource(_ChunkEnd):
    """The sender's side: `prepare(chunk)` starts making its messages, `ready(...)` gives them.

    For a CUDA cache `prepare` only queues the gather, encode and checksums on a
    communication stream, so the next chunks' device work runs while this one is
    on the wire (up to `lookahead` chunks ahead).
    """

    lookahead = 2

    def __init__(self, memory: ChannelMemory, ids: list[int], codec_name: str, checksum: bool,
                 chunk_blocks: int) -> None:
        is_cuda = memory.cache.is_cuda
        super().__init__(memory, ids, codec_name, checksum, chunk_blocks, self.lookahead + 1, on_device=is_cuda)
        self.checksum_kind = "sum32" if is_cuda else "xxh3"
        if not is_cuda and not self.inplace:
            self._ids_tensor()  # made here, before worker threads use it

    def prepare(self, chunk: Chunk) -> Any:
        """Start making `chunk`'s messages: device work is queued here, CPU work goes to a thread."""
        ids = self.ids[chunk.start : chunk.stop]
        if self.rows is not None:
            return self._inplace(chunk.layer, ids)
        slot = self._slot(chunk)
        if not self.cache.is_cuda:
            return workers().submit(self._encoded, chunk, slot)
        torch = _torch()
        idx = self._index(chunk)
        n, layer = chunk.n, chunk.layer
        with torch.cuda.stream(self.stream):
            self.codec.encode(self.cache.key(layer).index_select(0, idx), slot.t[:n])
            self.codec.encode(self.cache.value(layer).index_select(0, idx), slot.t[n : 2 * n])
            if self.checksum:
                slot.sums[: 2 * n].copy_(device_word_sums(slot.t[: 2 * n]), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return (ev, slot, n)

    async def ready(self, chunk: Chunk, token: Any) -> Outgoing:
        """The messages of `chunk` (from `prepare`), once its rows are made and checksummed."""
        if isinstance(token, Outgoing):
            return token
        if isinstance(token, Future):
            return await result(token)  # type: ignore[no-any-return]
        ev, slot, n = token
        await device.wait_event(ev, key="kv gather")
        return Outgoing(DeviceBytes.of(slot.t[: 2 * n], self.stream),
                        bytes_view(slot.sums_np[: 2 * n]) if self.checksum else None)

    def _inplace(self, layer: int, ids: list[int]) -> Outgoing:
        assert self.rows is not None
        pieces = self.rows.pieces(layer, ids)
        if not self.checksum:
            return Outgoing(pieces, None)
        sums = np.empty(2 * len(ids), dtype=np.uint64)
        pieces.watch = RowHasher(self.rows.row_views(layer, ids), self.enc, sums, ahead=True)  # as bytes go out
        return Outgoing(pieces, bytes_view(sums))

    def _encoded(self, chunk: Chunk, slot: Staging) -> Outgoing:
        idx = self._index(chunk)
        n, layer = chunk.n, chunk.layer
        self.codec.encode(self.cache.key(layer).index_select(0, idx), slot.t[:n])
        self.codec.encode(self.cache.value(layer).index_select(0, idx), slot.t[n : 2 * n])
        rows = slot.rows(n)
        if self.checksum:
            hash_rows(rows, slot.sums[: 2 * n])
        return Outgoing(Pieces([bytes_view(rows)]), bytes_view(slot.sums[: 2 * n]) if self.checksum else None)


class ChunkSink(_ChunkEnd):
    """The receiver's side: where chunk `i`'s messages land (`targets`), and writing it into the cache (`land`)."""

    def __init__(self, memory: ChannelMemory, ids: list[int], codec_name: str, checksum: bool, checksum_kind: str,
                 chunk_blocks: int, window: int, request: object, rank: int) -> None:
        # rows of a CUDA cache land on the device, unless they carry host checksums (xxh3 from a CPU peer)
        on_device = memory.cache.is_cuda and not (checksum and checksum_kind == "xxh3")
        super().__init__(memory, ids, codec_name, checksum, chunk_blocks, window, on_device)
        self.kind = checksum_kind
        self.request = request
        self.rank = rank
        self.hashers: dict[int, RowHasher] = {}
        self.sums: dict[int, np.ndarray[Any, Any]] = {}  # chunk -> where the sender's checksums land
        self.pending: dict[int, Any] = {}  # layer -> event of its last copy into the cache (CUDA)
        self.checks: dict[int, list[tuple[Chunk, Any, np.ndarray[Any, Any]]]] = {}  # layer -> device sums to compare
        if not self.inplace:
            self._ids_tensor()  # made here, before worker threads use it

    def close(self, in_use: bool = False) -> None:
        super().close(in_use)
        for checks in self.checks.values():  # a transfer that ended early: its sums were never compared
            for _, got, _ in checks:
                self.memory.release_pinned(got)
        self.checks.clear()

    def fence(self) -> None:
        """Order the cache owner's later work after every copy this transfer queued (also a failed one's)."""
        if self.stream is not None:
            _torch().cuda.current_stream(self.cache.device).wait_stream(self.stream)

    async def targets(self, chunk: Chunk) -> tuple[Pieces | DeviceBytes, memoryview | None]:
        """Memory to post `chunk`'s two receives into."""
        ids = self.ids[chunk.start : chunk.stop]
        n = chunk.n
        sums = np.empty(2 * n, dtype=np.uint64) if self.checksum else None
        if sums is not None:
            self.sums[chunk.index] = sums
        sums_view = bytes_view(sums) if sums is not None else None
        if self.rows is not None:
            pieces = self.rows.pieces(chunk.layer, ids)
            if sums is not None and self.kind == "xxh3":
                h = RowHasher(self.rows.row_views(chunk.layer, ids), self.enc, np.empty(2 * n, np.uint64),
                              ahead=False)
                self.hashers[chunk.index] = h
                pieces.watch = h  # checksums taken as the bytes land
            return pieces, sums_view
        slot = self._slot(chunk)
        if self.on_device:  # the slot's previous rows were decoded on this same stream: ordered
            return DeviceBytes.of(slot.t[: 2 * n], self.stream), sums_view
        if slot.h2d_done is not None:  # the slot's previous chunk is still being copied to the device
            await device.wait_event(slot.h2d_done, key="kv h2d")
            slot.h2d_done = None
        return Pieces([bytes_view(slot.rows(n))]), sums_view

    async def land(self, chunk: Chunk) -> None:
        """Verify `chunk`'s checksums and write it into the cache (queued on the device, for a CUDA cache)."""
        if self.rows is not None:
            self._check_inplace(chunk)
            return
        slot = self._slot(chunk)
        n = chunk.n
        sums = self.sums.pop(chunk.index, None)
        if not self.on_device:
            await result(workers().submit(self._check_host, chunk, slot, sums))
            if not self.cache.is_cuda:
                return
        torch = _torch()
        idx = self._index(chunk)
        shape = (n, *self.cache.layout.block_shape)
        with torch.cuda.stream(self.stream):
            if self.on_device:
                rows = slot.t[: 2 * n]
                if sums is not None:  # compared when the layer is done: the loop goes on posting receives
                    got = self.memory.pinned_i64(2 * n)
                    got[: 2 * n].copy_(device_word_sums(rows), non_blocking=True)
                    self.checks.setdefault(chunk.layer, []).append((chunk, got, sums))
            else:
                rows = torch.empty((2 * n, self.enc), dtype=torch.uint8, device=self.cache.device)
                rows.copy_(slot.t[: 2 * n], non_blocking=True)
                h2d = torch.cuda.Event()
                h2d.record(self.stream)
                slot.h2d_done = h2d
            for dst, part in ((self.cache.key(chunk.layer), rows[:n]), (self.cache.value(chunk.layer), rows[n:])):
                tmp = torch.empty(shape, dtype=dst.dtype, device=dst.device)
                self.codec.decode(part, tmp)
                dst.index_copy_(0, idx, tmp)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[chunk.layer] = done

    def _compare(self, chunk: Chunk, got: np.ndarray[Any, Any], sums: np.ndarray[Any, Any]) -> None:
        check_rows(got, sums, request=self.request, chunk=chunk, dst_ids=self.ids[chunk.start : chunk.stop],
                   rank=self.rank)

    def _check_inplace(self, chunk: Chunk) -> None:
        assert self.rows is not None
        sums = self.sums.pop(chunk.index, None)
        hasher = self.hashers.pop(chunk.index, None)
        if sums is None:
            return
        ids = self.ids[chunk.start : chunk.stop]
        if hasher is not None:
            self._compare(chunk, hasher.finish(), sums)
            return
        k, v = self.rows.k[chunk.layer], self.rows.v[chunk.layer]  # "sum32" from a CUDA peer
        got = np.concatenate([word_sums(t[s:e]) for t in (k, v) for s, e in runs(ids)])
        self._compare(chunk, got, sums)

    def _check_host(self, chunk: Chunk, slot: Staging, sums: np.ndarray[Any, Any] | None) -> None:
        n = chunk.n
        rows = slot.rows(n)
        if sums is not None:
            got = hash_rows(rows, np.empty(2 * n, dtype=np.uint64)) if self.kind == "xxh3" else word_sums(rows)
            self._compare(chunk, got, sums)
        if self.cache.is_cuda:
            return
        torch = _torch()
        idx = self._index(chunk)
        shape = (n, *self.cache.layout.block_shape)
        for dst, part in ((self.cache.key(chunk.layer), slot.t[:n]), (self.cache.value(chunk.layer), slot.t[n:2 * n])):
            tmp = torch.empty(shape, dtype=dst.dtype)
            self.codec.decode(part, tmp)
            dst.index_copy_(0, idx, tmp)

    async def layer_done(self, layer: int) -> None:
        """Return once every write of `layer` into the cache has finished (CUDA: on the device) and
        every checksum of it matched."""
        ev = self.pending.pop(layer, None)
        if ev is not None:
            await device.wait_event(ev, key="kv layer")
        for chunk, got, sums in self.checks.pop(layer, []):
            try:
                self._compare(chunk, got.numpy()[: 2 * chunk.n].view(np.uint64), sums)
            finally:
                self.memory.release_pinned(got)
