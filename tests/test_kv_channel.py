"""KV transfers between simulated ranks: exact blocks, streaming order, codecs, back-pressure,
cancellation and timeouts on either side, checksums, mismatches and bad arguments."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm import kv
from sagellm_comm.testing import run_ranks

pytestmark = pytest.mark.anyio

LAYOUT = kv.KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4, dtype="bfloat16")
SRC_IDS = [5, 2, 9, 10, 11, 0, 7]
DST_IDS = [1, 3, 4, 5, 12, 8, 6]


def filled(layout: kv.KVLayout, num_blocks: int, seed: int) -> kv.KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = kv.KVCache.allocate(layout, num_blocks)
    for layer in range(layout.num_layers):
        cache.key(layer).copy_(torch.randn(cache.key(layer).shape, generator=g))
        cache.value(layer).copy_(torch.randn(cache.value(layer).shape, generator=g))
    return cache


def same_blocks(a: kv.KVCache, a_ids: list[int], b: kv.KVCache, b_ids: list[int], layer: int) -> bool:
    return bool(torch.equal(a.key(layer)[a_ids], b.key(layer)[b_ids])
                and torch.equal(a.value(layer)[a_ids], b.value(layer)[b_ids]))


async def pair(sender: Any, receiver: Any, *, timeout: float = 20, **kw: Any) -> list[Any]:
    """Rank 0 runs `sender(comm)`, rank 1 `receiver(comm)`; both bounded in time."""
    async def body(comm: sc.Communicator) -> Any:
        with anyio.fail_after(timeout):
            return await (sender if comm.rank == 0 else receiver)(comm)

    return await run_ranks(2, body, **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("chunk_bytes", [1, 4096, 8 << 20])
async def test_blocks_arrive_exactly_at_the_receivers_ids(dtype: str, chunk_bytes: int) -> None:
    layout = kv.KVLayout(4, 2, 16, 4, dtype)
    src = filled(layout, 16, seed=1)
    dst = kv.KVCache.allocate(layout, 16)

    async def sender(comm: sc.Communicator) -> kv.TransferStats:
        return await kv.KVChannel(comm, src, chunk_bytes=chunk_bytes).send("req-1", 1, SRC_IDS)

    async def receiver(comm: sc.Communicator) -> kv.TransferStats:
        return await kv.KVChannel(comm, dst, chunk_bytes=chunk_bytes).recv("req-1", 0, DST_IDS)

    sent, got = await pair(sender, receiver)
    for layer in range(layout.num_layers):
        assert same_blocks(src, SRC_IDS, dst, DST_IDS, layer)
        untouched = [i for i in range(16) if i not in DST_IDS]
        assert not dst.key(layer)[untouched].any() and not dst.value(layer)[untouched].any()
    raw = 2 * len(SRC_IDS) * layout.num_layers * layout.block_bytes
    assert got.raw_bytes == sent.raw_bytes == raw
    assert got.nbytes == sent.nbytes == raw + 16 * len(SRC_IDS) * layout.num_layers  # + one checksum per row
    assert got.path == sent.path == "stream" and got.codec == "none"


async def test_send_and_receive_in_either_order_and_int_request_ids() -> None:
    src = filled(LAYOUT, 16, seed=2)
    dst = kv.KVCache.allocate(LAYOUT, 16)

    async def sender(comm: sc.Communicator) -> None:
        chan = kv.KVChannel(comm, src)
        await chan.send(7, 1, SRC_IDS[:3])  # the receiver is not there yet
        await anyio.sleep(0.2)
        await chan.send("late", 1, SRC_IDS[3:])

    async def receiver(comm: sc.Communicator) -> None:
        chan = kv.KVChannel(comm, dst)
        recv7 = chan.recv(7, 0, DST_IDS[:3])
        await anyio.sleep(0.2)
        await recv7
        await chan.recv("late", 0, DST_IDS[3:])  # posted before its offer arrives

    await pair(sender, receiver)
    for layer in range(LAYOUT.num_layers):
        assert same_blocks(src, SRC_IDS, dst, DST_IDS, layer)


async def test_layers_stream_in_order_before_later_layers_arrive() -> None:
    src = filled(LAYOUT, 16, seed=3)
    dst = kv.KVCache.allocate(LAYOUT, 16)
    seen: list[tuple[int, bool, bool]] = []

    async def sender(comm: sc.Communicator) -> None:
        await kv.KVChannel(comm, src, window=1).send("r", 1, SRC_IDS)

    async def receiver(comm: sc.Communicator) -> None:
        chan = kv.KVChannel(comm, dst, window=1)  # one chunk per layer here: at most one layer ahead
        async for layer in chan.receive("r", 0, DST_IDS):
            last = LAYOUT.num_layers - 1
            seen.append((layer, same_blocks(src, SRC_IDS, dst, DST_IDS, layer),
                         layer < last - 1 and bool(dst.key(last)[DST_IDS].any())))
            await anyio.sleep(0.02)

    await pair(sender, receiver)
    assert [s[0] for s in seen] == list(range(LAYOUT.num_layers))
    assert all(s[1] for s in seen), "a layer was reported before all its blocks were written"
    assert not any(s[2] for s in seen), "the last layer arrived while the receiver was still at an early one"


@pytest.mark.parametrize("codec", ["fp8", "int8"])
async def test_codecs_shrink_the_wire_and_stay_close(codec: str) -> None:
    layout = kv.KVLayout(2, 4, 64, 8, "bfloat16")
    src = filled(layout, 8, seed=4)
    dst = kv.KVCache.allocate(layout, 8)

    async def sender(comm: sc.Communicator) -> kv.TransferStats:
        return await kv.KVChannel(comm, src, codec=codec, checksum=False).send("q", 1, [0, 1, 2])

    async def receiver(comm: sc.Communicator) -> kv.TransferStats:
        return await kv.KVChannel(comm, dst).recv("q", 0, [5, 6, 7])

    sent, got = await pair(sender, receiver)
    assert got.codec == codec and sent.raw_bytes / sent.nbytes >= 1.9
    for layer in range(layout.num_layers):
        a, b = src.key(layer)[[0, 1, 2]].float(), dst.key(layer)[[5, 6, 7]].float()
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 0.08, rel


async def test_slow_receiver_holds_the_sender_to_its_window() -> None:
    layout = kv.KVLayout(8, 2, 16, 4, "bfloat16")
    src = filled(layout, 8, seed=5)
    dst = kv.KVCache.allocate(layout, 8)
    window = 2
    ahead: list[int] = []
    chans: dict[int, kv.KVChannel] = {}

    async def sender(comm: sc.Communicator) -> None:
        chans[0] = kv.KVChannel(comm, src, window=window)
        await chans[0].send("slow", 1, [0, 1, 2])

    async def receiver(comm: sc.Communicator) -> None:
        chans[1] = chan = kv.KVChannel(comm, dst, window=window)
        async for layer in chan.receive("slow", 0, [3, 4, 5]):
            await anyio.sleep(0.05)  # let the sender run as far ahead as it can
            ahead.append(chans[0].counters["chunks_sent"] - (layer + 1))
            scratch = [k for k in comm._engine.matcher.unexpected if k[1][0].startswith("kv|")]
            assert not scratch, f"KV data went to scratch memory: {scratch}"

    await pair(sender, receiver)
    assert max(ahead) <= window and max(ahead) >= 1, ahead  # it did run ahead, but never past its credits


@pytest.mark.fault("KV receiver leaves a transfer after its first layer (receive side cancelled), "
                   "2 simulated ranks",
                   "TransferCancelled naming rank 1 and the request on the sender; a concurrent transfer to the "
                   "same rank completes exactly")
async def test_receiver_leaving_early_cancels_that_request_only(detected: Callable[[float], None]) -> None:
    src = filled(LAYOUT, 16, seed=6)
    dst = kv.KVCache.allocate(LAYOUT, 16)
    times: dict[str, float] = {}

    async def sender(comm: sc.Communicator) -> tuple[str, str]:
        chan = kv.KVChannel(comm, src, window=1)
        out = ["", ""]

        async def one(i: int, req: str, ids: list[int]) -> None:
            try:
                await chan.send(req, 1, ids)
                out[i] = "ok"
            except sc.TransferCancelled as e:
                times["sender_error"] = anyio.current_time()
                out[i] = f"cancelled: {e}"

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0, "dropped", SRC_IDS[:3])
            tg.start_soon(one, 1, "kept", SRC_IDS[3:])
        return out[0], out[1]

    async def receiver(comm: sc.Communicator) -> list[int]:
        chan = kv.KVChannel(comm, dst, window=1)
        got: list[int] = []
        async with chan.receive("dropped", 0, DST_IDS[:3]) as layers:
            async for layer in layers:
                got.append(layer)
                break
        times["left"] = anyio.current_time()
        await chan.recv("kept", 0, DST_IDS[3:])
        return got

    (dropped, kept), got = await pair(sender, receiver)
    assert got == [0]
    assert dropped.startswith("cancelled") and "rank 1" in dropped and "'dropped'" in dropped
    assert kept == "ok"
    for layer in range(LAYOUT.num_layers):
        assert same_blocks(src, SRC_IDS[3:], dst, DST_IDS[3:], layer)
    detected(times["sender_error"] - times["left"])  # from the receiver leaving to the sender's error


@pytest.mark.fault("KV sender's send cancelled 0.15 s into a transfer (send side cancelled), 2 simulated ranks",
                   "TransferCancelled naming rank 0 and the request on the receiver; every layer it was handed "
                   "is complete and exact, and not all were; both ranks then pass a barrier")
async def test_sender_cancelled_midway_is_transfer_cancelled_and_no_partial_layer(
        detected: Callable[[float], None]) -> None:
    layout = kv.KVLayout(6, 2, 16, 4, "float32")
    src = filled(layout, 16, seed=7)
    dst = kv.KVCache.allocate(layout, 16)
    times: dict[str, float] = {}

    async def sender(comm: sc.Communicator) -> str:
        chan = kv.KVChannel(comm, src, window=1, chunk_bytes=1)  # a chunk per block: layers take many chunks
        with anyio.move_on_after(0.15):
            await chan.send("gone", 1, SRC_IDS)
        times["cancelled"] = anyio.current_time()
        await comm.barrier()  # the rank keeps serving after its transfer was cancelled
        return "cancelled"

    async def receiver(comm: sc.Communicator) -> dict[str, Any]:
        chan = kv.KVChannel(comm, dst, window=1, chunk_bytes=1)
        layers: list[int] = []
        try:
            async for layer in chan.receive("gone", 0, DST_IDS):
                layers.append(layer)
                await anyio.sleep(0.05)
        except sc.TransferCancelled as e:
            times["receiver_error"] = anyio.current_time()
            error = str(e)
        await comm.barrier()
        return {"layers": layers, "error": error}

    _, r = await pair(sender, receiver)
    assert "rank 0" in r["error"] and "'gone'" in r["error"] and "cancelled" in r["error"]
    assert r["layers"] == list(range(len(r["layers"]))) and len(r["layers"]) < layout.num_layers
    for layer in r["layers"]:
        assert same_blocks(src, SRC_IDS, dst, DST_IDS, layer)
    # includes up to 0.05 s of the receiver's own pause per layer: it sees the error when it asks for one
    detected(times["receiver_error"] - times["cancelled"])


@pytest.mark.fault("KV send and recv that no peer matches (timeout 0.2 s); a receiver slower than its 0.3 s "
                   "timeout mid-transfer, 2 simulated ranks",
                   "CommTimeout naming the request on the side that waited; the sender of the timed-out transfer "
                   "raises TransferCancelled ('timed out')")
async def test_timeouts_name_the_request_and_tell_the_other_side() -> None:
    src = filled(LAYOUT, 16, seed=8)
    dst = kv.KVCache.allocate(LAYOUT, 16)

    async def sender(comm: sc.Communicator) -> str:
        chan = kv.KVChannel(comm, src, window=1)
        with pytest.raises(sc.CommTimeout, match="'nobody'"):
            await chan.send("nobody", 1, SRC_IDS, timeout=0.2)  # no receiver ever posts it
        with pytest.raises(sc.TransferCancelled, match="timed out") as info:
            await chan.send("slow", 1, SRC_IDS)
        return str(info.value)

    async def receiver(comm: sc.Communicator) -> None:
        chan = kv.KVChannel(comm, dst, window=1)
        with pytest.raises(sc.CommTimeout, match="'never'"):
            await chan.recv("never", 0, DST_IDS, timeout=0.2)
        with pytest.raises(sc.CommTimeout, match="'slow'"):
            async for _ in chan.receive("slow", 0, DST_IDS, timeout=0.3):
                await anyio.sleep(0.2)

    await pair(sender, receiver)


@pytest.mark.fault("KV cache byte flipped mid-transfer, after its row's checksum was taken (layer 2, block 4), "
                   "2 simulated ranks",
                   "KVChecksumError naming the request, layer 2 and value block 4 on both sender and receiver; "
                   "layers 0 and 1 delivered before it")
async def test_corrupted_bytes_are_a_checksum_error_naming_request_layer_and_block(
        monkeypatch: pytest.MonkeyPatch, detected: Callable[[float], None]) -> None:
    from sagellm_comm.kv import chunks

    src = filled(LAYOUT, 16, seed=9)
    dst = kv.KVCache.allocate(LAYOUT, 16)
    real = chunks.ChunkSource.ready
    flipped: list[float] = []  # time.monotonic() of the flip (the hasher may run off the event loop)
    caught: list[float] = []

    async def corrupting(self: chunks.ChunkSource, chunk: chunks.Chunk, token: Any) -> Any:
        msg = await real(self, chunk, token)
        if chunk.layer == 2:
            hasher = msg.rows.watch  # checksums are taken as the bytes go out; flip a bit right after its row's

            def watch(start: int, end: int) -> None:
                hasher(start, end)
                if hasher.done > chunk.n + 4 and not flipped:
                    flipped.append(time.monotonic())
                    self.cache.value(2)[SRC_IDS[4]].view(torch.int16)[1, 1, 3] ^= 0x10

            msg.rows.watch = watch
        return msg

    monkeypatch.setattr(chunks.ChunkSource, "ready", corrupting)

    async def sender(comm: sc.Communicator) -> BaseException:
        with pytest.raises(sc.KVChecksumError) as info:
            await kv.KVChannel(comm, src).send("bad", 1, SRC_IDS)
        caught.append(time.monotonic())
        return info.value

    async def receiver(comm: sc.Communicator) -> tuple[BaseException, list[int]]:
        layers: list[int] = []
        with pytest.raises(sc.KVChecksumError) as info:
            async for layer in kv.KVChannel(comm, dst).receive("bad", 0, DST_IDS):
                layers.append(layer)
        caught.append(time.monotonic())
        return info.value, layers

    s_err, (r_err, layers) = await pair(sender, receiver)
    assert layers == [0, 1]
    for e in (s_err, r_err):
        assert isinstance(e, sc.KVChecksumError)
        assert (e.request_id, e.layer, e.block) == ("bad", 2, 4), (e.request_id, e.layer, e.block)
        assert "'bad'" in str(e) and "layer 2" in str(e) and "value block 4" in str(e)
    detected(max(caught) - flipped[0])  # from the flip to the later of the two ends' errors


@pytest.mark.fault("KV sender and receiver disagree: 7 blocks sent, 2 block ids posted; caches of another "
                   "block size, 2 simulated ranks",
                   "KVMismatch on both ends, naming the block counts or 'block size'")
async def test_disagreeing_ends_get_kv_mismatch_on_both_sides() -> None:
    other = kv.KVLayout(4, 2, 16, 8, "bfloat16")  # another block size

    async def sender(comm: sc.Communicator) -> list[str]:
        chan = kv.KVChannel(comm, filled(LAYOUT, 16, seed=10))
        errors = []
        for req in ("count", "layout"):
            with pytest.raises(sc.KVMismatch) as info:
                await chan.send(req, 1, SRC_IDS)
            errors.append(str(info.value))
        return errors

    async def receiver(comm: sc.Communicator) -> list[str]:
        errors = []
        with pytest.raises(sc.KVMismatch) as info:
            await kv.KVChannel(comm, kv.KVCache.allocate(LAYOUT, 16)).recv("count", 0, DST_IDS[:2])
        errors.append(str(info.value))
        with pytest.raises(sc.KVMismatch) as info:
            await kv.KVChannel(comm, kv.KVCache.allocate(other, 16)).recv("layout", 0, DST_IDS)
        errors.append(str(info.value))
        return errors

    s, r = await pair(sender, receiver)
    assert "7 blocks" in r[0] and "2 block ids" in r[0] and "7 blocks" in s[0]
    assert "block size" in r[1] and "block size" in s[1]


@pytest.mark.fault("bad KV arguments: block id out of range, repeated or none; this rank as peer; float request "
                   "id; unknown codec; window 0; cache tensors of the wrong shape; int8 layout dtype",
                   "InvalidArgument naming the problem, at the call on both ranks; they then pass a barrier")
async def test_bad_arguments_are_refused_before_anything_moves() -> None:
    async def body(comm: sc.Communicator) -> None:
        cache = kv.KVCache.allocate(LAYOUT, 8)
        chan = kv.KVChannel(comm, cache)
        peer = 1 - comm.rank
        for ids, match in (([8], "out of range"), ([1, 1], "repeat"), ([], "no block ids")):
            with pytest.raises(sc.InvalidArgument, match=match):
                await chan.send("x", peer, ids)
            with pytest.raises(sc.InvalidArgument, match=match):
                await chan.recv("x", peer, ids)
        with pytest.raises(sc.InvalidArgument, match="this rank"):
            await chan.send("x", comm.rank, [0])
        with pytest.raises(sc.InvalidArgument, match="request_id"):
            await chan.send(1.5, peer, [0])  # type: ignore[arg-type]
        with pytest.raises(sc.InvalidArgument, match="codec"):
            await chan.send("x", peer, [0], codec="zstd")
        with pytest.raises(sc.InvalidArgument, match="window"):
            kv.KVChannel(comm, cache, window=0)
        with pytest.raises(sc.InvalidArgument, match="shape"):
            kv.KVCache(LAYOUT, [torch.zeros(3, 4)] * 4, [torch.zeros(3, 4)] * 4)
        with pytest.raises(sc.InvalidArgument, match="dtype"):
            kv.KVLayout(2, 2, 2, 2, "int8")
        await comm.barrier()

    with anyio.fail_after(20):
        await run_ranks(2, body)


@pytest.mark.fault("KV sender's communicator aborted mid-transfer, no goodbye (a dying process), 2 simulated ranks",
                   "PeerLost naming rank 0 on the receiver; CommClosed on the sender's own send")
async def test_a_lost_sender_is_peer_lost_on_the_receiver(detected: Callable[[float], None]) -> None:
    src = filled(LAYOUT, 16, seed=11)
    dst = kv.KVCache.allocate(LAYOUT, 16)
    times: dict[str, float] = {}

    async def sender(comm: sc.Communicator) -> None:
        chan = kv.KVChannel(comm, src, window=1, chunk_bytes=1)
        async def send() -> None:
            with pytest.raises(sc.CommClosed):
                await chan.send("dies", 1, SRC_IDS)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await anyio.sleep(0.1)
            times["aborted"] = anyio.current_time()
            comm.abort()  # the process "dies" mid-transfer: no goodbye, no cancel notice
            tg.cancel_scope.cancel()

    async def receiver(comm: sc.Communicator) -> str:
        with pytest.raises(sc.PeerLost) as info:
            async for _ in kv.KVChannel(comm, dst, window=1, chunk_bytes=1).receive("dies", 0, DST_IDS):
                await anyio.sleep(0.1)
        times["lost"] = anyio.current_time()
        return str(info.value)

    _, err = await pair(sender, receiver)
    assert "rank 0" in err
    # includes up to 0.1 s of the receiver's own pause per layer: it sees the error when it asks for one
    detected(times["lost"] - times["aborted"])


def test_word_sums_are_the_same_on_host_and_through_torch() -> None:
    """A CUDA sender's checksums ("sum32", computed by torch) must equal a CPU receiver's (numpy)."""
    from sagellm_comm.kv.chunks import device_word_sums, word_sums

    g = torch.Generator().manual_seed(12)
    for row_bytes in (4096, 16416, 1001):  # whole int32 words, an fp8 row, and bytes that are not
        rows = torch.randint(0, 256, (9, row_bytes), dtype=torch.uint8, generator=g)
        host = word_sums(rows.numpy())
        assert host.dtype == np.uint64
        assert np.array_equal(host, device_word_sums(rows).numpy().view(np.uint64))
        flipped = rows.clone()
        flipped[4, 7] ^= 1
        assert (word_sums(flipped.numpy()) != host).nonzero()[0].tolist() == [4]


def test_ipc_copy_plan_finds_runs_where_both_id_lists_count_up() -> None:
    from sagellm_comm.kv.ipc import paired_runs

    assert paired_runs([5, 6, 7, 2, 3, 9], [0, 1, 2, 3, 4, 8]) == [(5, 0, 3), (2, 3, 2), (9, 8, 1)]
    assert paired_runs([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert paired_runs([4], [0]) == [(4, 0, 1)]


def test_ipc_copy_plan_stacks_layers_that_one_copy_can_cover() -> None:
    from sagellm_comm.kv.ipc import as_words, layer_groups, stacked

    assert layer_groups(10, 4) == [(0, 1), (1, 5), (5, 9), (9, 10)]
    cache = kv.KVCache.allocate(LAYOUT, 6)
    slabs = stacked([t for i in range(LAYOUT.num_layers) for t in (cache.key(i), cache.value(i))])
    as_words(slabs[5, 3]).fill_(-1)  # slab 5 is layer 2's values: the view is the cache's own memory
    assert bool(cache.value(2)[3].isnan().all()) and not cache.key(2).any() and not cache.value(1).any()
    assert as_words(slabs).dtype == torch.int64  # head dim 16 x 2 bytes: whole 8-byte words
    assert stacked([torch.zeros(6, *LAYOUT.block_shape) for _ in range(3)]) is None  # separate allocations
