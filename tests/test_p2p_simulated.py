"""Point-to-point send/recv on simulated worlds: dtypes, ordering, tags, large messages,
matching before/after arrival, mismatched buffers, cancellation and timeouts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm.testing import FaultPlan, run_ranks

pytestmark = pytest.mark.anyio

NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
TORCH_DTYPES = [*NUMPY_DTYPES, "bfloat16"]
CASES = [("numpy", d) for d in NUMPY_DTYPES] + [("torch", d) for d in TORCH_DTYPES]
CASE_IDS = [f"{lib}-{d}" for lib, d in CASES]
FRAME = 4 * 1024 * 1024  # the engine's default payload bytes per frame


def data(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Deterministic data in the reference dtype (float32 stands in for bfloat16)."""
    rng = np.random.default_rng([seed, 4242])
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype in ("float16", "bfloat16", "float32", "float64"):
        vals = np.asarray(rng.integers(-100, 100, shape) / 4)  # exact in every float dtype
        return vals.astype("float32" if dtype == "bfloat16" else dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def to_lib(arr: np.ndarray, lib: str, dtype: str) -> Any:
    if lib == "numpy":
        return arr.copy()
    return torch.from_numpy(arr.copy()).to(getattr(torch, dtype))


def empty(shape: tuple[int, ...], lib: str, dtype: str) -> Any:
    if lib == "numpy":
        return np.zeros(shape, dtype=dtype)
    return torch.zeros(shape, dtype=getattr(torch, dtype))


def as_np(obj: Any) -> np.ndarray:
    if isinstance(obj, torch.Tensor):
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy().copy()
    return np.asarray(obj).copy()


def f32(n: int, seed: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) * 3 + seed


# -- correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_send_recv_every_dtype(lib: str, dtype: str) -> None:
    shapes = [(7,), (2, 3, 4), (), (0,), (1, 1)]

    async def body(comm: sc.Communicator) -> list[np.ndarray]:
        peer = 1 - comm.rank
        got = []
        for i, shape in enumerate(shapes):
            mine = to_lib(data(shape, dtype, seed=10 * comm.rank + i), lib, dtype)
            buf = empty(shape, lib, dtype)
            async with anyio.create_task_group() as tg:  # both directions at once
                tg.start_soon(comm.send, mine, peer, i)
                out = await comm.recv(buf, peer, tag=i)
            assert out is buf  # in place
            np.testing.assert_array_equal(as_np(mine), data(shape, dtype, seed=10 * comm.rank + i))
            got.append(as_np(buf))
        return got

    with anyio.fail_after(20):
        results = await run_ranks(2, body)
    for rank in (0, 1):
        for i, shape in enumerate(shapes):
            want = data(shape, dtype, seed=10 * (1 - rank) + i)
            got = results[rank][i]
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)


async def test_numpy_to_torch_and_back() -> None:
    """Messages carry bytes and a dtype name: a numpy sender can feed a torch receiver."""

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(np.arange(6, dtype=np.int16).reshape(2, 3), 1, tag=1)
            t = torch.zeros(5, dtype=torch.float64)
            await comm.recv(t, 1, tag=2)
            return t.numpy()
        t = torch.zeros(2, 3, dtype=torch.int16)
        await comm.recv(t, 0, tag=1)
        await comm.send(np.linspace(0, 1, 5), 0, tag=2)
        return t.numpy()

    with anyio.fail_after(10):
        r0, r1 = await run_ranks(2, body)
    np.testing.assert_array_equal(r0, np.linspace(0, 1, 5))
    np.testing.assert_array_equal(r1, np.arange(6, dtype=np.int16).reshape(2, 3))


@pytest.mark.parametrize("n_msgs", [2, 50])
async def test_same_tag_messages_arrive_in_send_order(n_msgs: int) -> None:
    async def body(comm: sc.Communicator) -> list[np.ndarray]:
        if comm.rank == 0:
            for i in range(n_msgs):
                await comm.send(f32(16, i), 1, tag=7)
            return []
        if n_msgs > 10:
            await anyio.sleep(0.05)  # let them all queue up unexpected first
        out = []
        for _ in range(n_msgs):
            buf = np.zeros(16, np.float32)
            await comm.recv(buf, 0, tag=7)
            out.append(buf)
        return out

    with anyio.fail_after(10):
        _, got = await run_ranks(2, body)
    for i, buf in enumerate(got):
        np.testing.assert_array_equal(buf, f32(16, i))


async def test_same_tag_ordering_with_mixed_sizes_and_posted_receives() -> None:
    sizes = [1, FRAME // 4 + 3, 5, 0, 3 * FRAME // 4 + 1, 2]

    async def body(comm: sc.Communicator) -> list[np.ndarray]:
        if comm.rank == 0:
            for i, n in enumerate(sizes):
                await comm.send(f32(n, i), 1)
            return []
        out: list[np.ndarray] = [np.zeros(n, np.float32) for n in sizes]
        async with anyio.create_task_group() as tg:  # all receives posted at once, in order
            for buf in out:
                await tg.start(_recv_task, comm, buf, 0, 0)
        return out

    with anyio.fail_after(20):
        _, got = await run_ranks(2, body)
    for i, (buf, n) in enumerate(zip(got, sizes, strict=True)):
        np.testing.assert_array_equal(buf, f32(n, i))


async def _recv_task(comm: sc.Communicator, buf: Any, src: int, tag: int, *,
                     task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    task_status.started()  # recv posts its receive before it first awaits
    await comm.recv(buf, src, tag)


async def test_different_tags_are_matched_out_of_order() -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(np.array([1, 1, 1], np.int32), 1, tag=1)
            await comm.send(np.array([2, 2], np.int32), 1, tag=2)
            await comm.send(np.array([3], np.int32), 1, tag=1)
            return None
        a2 = np.zeros(2, np.int32)
        a1 = np.zeros(3, np.int32)
        b1 = np.zeros(1, np.int32)
        await comm.recv(a2, 0, tag=2)  # sent second, received first
        await comm.recv(a1, 0, tag=1)
        await comm.recv(b1, 0, tag=1)
        return a1, a2, b1

    with anyio.fail_after(10):
        _, (a1, a2, b1) = await run_ranks(2, body)
    assert a1.tolist() == [1, 1, 1] and a2.tolist() == [2, 2] and b1.tolist() == [3]


async def test_recv_for_later_tag_posted_before_anything_is_sent() -> None:
    """Receives for tags 2 and 1 wait while the sender sends tag 1 first: each gets its own."""
    posted = anyio.Event()

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await posted.wait()
            await comm.send(np.full(4, 1.0, np.float64), 1, tag=1)
            await comm.send(np.full(4, 2.0, np.float64), 1, tag=2)
            return None
        t1, t2 = np.zeros(4), np.zeros(4)
        async with anyio.create_task_group() as tg:
            await tg.start(_recv_task, comm, t2, 0, 2)
            await tg.start(_recv_task, comm, t1, 0, 1)
            posted.set()
        return t1, t2

    with anyio.fail_after(10):
        _, (t1, t2) = await run_ranks(2, body)
    assert t1.tolist() == [1.0] * 4 and t2.tolist() == [2.0] * 4


@pytest.mark.parametrize("order", ["recv-first", "send-first"])
@pytest.mark.parametrize("n", [100, FRAME // 4 * 3 + 12345], ids=["small", "3-frames"])
async def test_recv_posted_before_or_after_arrival(order: str, n: int) -> None:
    ready = anyio.Event()

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            if order == "recv-first":
                await ready.wait()
            await comm.send(f32(n, 5), 1, tag=3)
            if order == "send-first":
                ready.set()
            return None
        buf = np.zeros(n, np.float32)
        if order == "recv-first":
            async with anyio.create_task_group() as tg:
                await tg.start(_recv_task, comm, buf, 0, 3)
                ready.set()
        else:
            await ready.wait()  # the whole message has been handed to the link
            await anyio.sleep(0.05)  # ... and read into scratch
            await comm.recv(buf, 0, tag=3)
        return buf

    with anyio.fail_after(20):
        _, got = await run_ranks(2, body)
    np.testing.assert_array_equal(got, f32(n, 5))


@pytest.mark.parametrize("lib", ["numpy", "torch-bfloat16"])
async def test_large_multi_frame_messages_both_ways(lib: str) -> None:
    n = 5 * FRAME // 2 + 7  # 2-byte elements: 2.5 frames (bfloat16) / 4-byte: 5 frames (float32)

    def make(seed: int) -> Any:
        arr = (np.arange(n) % 251 - 125 + seed).astype(np.float32)
        return torch.from_numpy(arr).to(torch.bfloat16) if lib != "numpy" else arr

    async def body(comm: sc.Communicator) -> Any:
        peer = 1 - comm.rank
        buf = torch.zeros(n, dtype=torch.bfloat16) if lib != "numpy" else np.zeros(n, np.float32)
        async with anyio.create_task_group() as tg:
            tg.start_soon(comm.send, make(comm.rank), peer)
            await comm.recv(buf, peer)
        return as_np(buf)

    with anyio.fail_after(30):
        results = await run_ranks(2, body)
    for rank, got in enumerate(results):
        np.testing.assert_array_equal(got, as_np(make(1 - rank)))


async def test_recv_posted_while_message_is_streaming() -> None:
    """A slow sender: the message has started arriving (into scratch) when the receive is posted."""
    n = 3 * FRAME // 4  # 3 frames, one every 0.1 s

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(f32(n, 9), 1)
            return None
        await anyio.sleep(0.15)  # frame 1 arrived, frames 2 and 3 not yet
        buf = np.zeros(n, np.float32)
        await comm.recv(buf, 0)
        return buf

    with anyio.fail_after(20):
        _, got = await run_ranks(2, body, faults=FaultPlan().delay(0, 0.1))
    np.testing.assert_array_equal(got, f32(n, 9))


async def test_many_senders_to_one_receiver() -> None:
    ws = 5

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank != 0:
            for k in range(3):
                await comm.send(f32(100 * comm.rank + 1, 10 * comm.rank + k), 0, tag=k)
            return None
        out: dict[tuple[int, int], np.ndarray] = {}

        async def get(src: int, k: int) -> None:
            buf = np.zeros(100 * src + 1, np.float32)
            await comm.recv(buf, src, tag=k)
            out[src, k] = buf

        async with anyio.create_task_group() as tg:
            for src in reversed(range(1, ws)):
                for k in reversed(range(3)):
                    tg.start_soon(get, src, k)
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    out = results[0]
    assert len(out) == (ws - 1) * 3
    for (src, k), buf in out.items():
        np.testing.assert_array_equal(buf, f32(100 * src + 1, 10 * src + k))


async def test_p2p_in_a_split_group_uses_group_ranks() -> None:
    async def body(comm: sc.Communicator) -> Any:
        sub = comm.split([2, 0])
        if sub is None:
            return None
        # world and sub-group messages with the same tag do not mix
        if sub.rank == 0:  # world rank 2
            await sub.send(np.full(3, 20, np.int64), 1, tag=0)
            await comm.send(np.full(3, 99, np.int64), 0, tag=0)
            return None
        w, s = np.zeros(3, np.int64), np.zeros(3, np.int64)
        await comm.recv(w, 2, tag=0)
        await sub.recv(s, 0, tag=0)
        return w, s

    with anyio.fail_after(10):
        results = await run_ranks(3, body)
    w, s = results[0]
    assert w.tolist() == [99] * 3
    assert s.tolist() == [20] * 3


@pytest.mark.fault("sender closes its communicator right after a send; the receiver receives later, twice",
                   "the message that arrived is still delivered; the next recv raises PeerLost ('closed')")
async def test_message_from_a_closed_peer_is_still_delivered() -> None:
    """What fully arrived before the sender closed still satisfies a receive; more does not."""

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(f32(10, 1), 1, tag=4)
            return None  # closes its communicator
        await anyio.sleep(0.3)
        buf = np.zeros(10, np.float32)
        await comm.recv(buf, 0, tag=4)
        with pytest.raises(sc.PeerLost) as info:
            await comm.recv(np.zeros(10, np.float32), 0, tag=4, timeout=5)
        return buf, info.value

    with anyio.fail_after(10):
        _, (buf, err) = await run_ranks(2, body)
    np.testing.assert_array_equal(buf, f32(10, 1))
    assert "closed" in str(err)


# -- mismatched buffers --------------------------------------------------------------------------


WRONG_RECV_EXPECT = ("MessageMismatch naming what was sent, what the buffer holds and the tag; the buffer is not "
                     "written; the message is kept, first in line for the next recv")
WRONG_SIZE = pytest.mark.fault("recv into a buffer smaller or larger than the message, posted before or after it "
                               "arrives", WRONG_RECV_EXPECT)
WRONG_DTYPE = pytest.mark.fault("recv into a buffer of the message's size but another dtype (numpy, torch), posted "
                                "before or after it arrives", WRONG_RECV_EXPECT)


@pytest.mark.parametrize("when", ["posted-before", "posted-after"])
@pytest.mark.parametrize(
    ("wrong", "what"),
    [
        pytest.param(lambda: np.zeros(5, np.float32), "20 bytes", id="smaller", marks=WRONG_SIZE),
        pytest.param(lambda: np.zeros(7, np.float32), "28 bytes", id="larger", marks=WRONG_SIZE),
        pytest.param(lambda: np.zeros(6, np.int32), "int32", id="dtype", marks=WRONG_DTYPE),  # same size
        pytest.param(lambda: torch.zeros(12, dtype=torch.bfloat16), "bfloat16", id="torch-dtype", marks=WRONG_DTYPE),
    ],
)
async def test_recv_into_wrong_buffer_keeps_the_message(wrong: Any, what: str, when: str) -> None:
    sent = anyio.Event()
    posted = anyio.Event()

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            if when == "posted-before":
                await posted.wait()
            await comm.send(f32(6, 1), 1, tag=2)
            await comm.send(f32(6, 2), 1, tag=2)
            sent.set()
            return None
        if when == "posted-after":
            await sent.wait()
            await anyio.sleep(0.05)
        bad = wrong()
        before = as_np(bad)
        async with anyio.create_task_group() as tg:
            if when == "posted-before":
                tg.start_soon(_set_soon, posted)  # the sender starts once the recv is posted
            with pytest.raises(sc.MessageMismatch) as info:
                await comm.recv(bad, 0, tag=2, timeout=5)
        np.testing.assert_array_equal(as_np(bad), before)  # the wrong buffer is not written
        first, second = np.zeros(6, np.float32), np.zeros(6, np.float32)
        await comm.recv(first, 0, tag=2, timeout=5)
        await comm.recv(second, 0, tag=2, timeout=5)
        return first, second, str(info.value)

    with anyio.fail_after(10):
        _, (first, second, msg) = await run_ranks(2, body)
    np.testing.assert_array_equal(first, f32(6, 1))  # the kept message is still first in line
    np.testing.assert_array_equal(second, f32(6, 2))
    assert "24 bytes" in msg and "float32" in msg  # what was sent ...
    assert what in msg  # ... and what the buffer holds
    assert "tag 2" in msg and "kept" in msg


async def _set_soon(ev: anyio.Event) -> None:
    await anyio.sleep(0.05)
    ev.set()


@pytest.mark.fault("recv into a 4-byte buffer for a 3-byte message", "a ValueError; the next recv gets the message")
async def test_mismatch_error_is_a_value_error() -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(np.zeros(3, np.int8), 1)
            return None
        with pytest.raises(ValueError):
            await comm.recv(np.zeros(4, np.int8), 0, timeout=5)
        buf = np.ones(3, np.int8)
        await comm.recv(buf, 0, timeout=5)
        return buf

    with anyio.fail_after(10):
        _, buf = await run_ranks(2, body)
    assert buf.tolist() == [0, 0, 0]


# -- cancellation and timeouts -------------------------------------------------------------------


@pytest.mark.fault("recv cancelled before its message arrives",
                   "its buffer is never written; the next two messages on the tag arrive in order")
async def test_cancelled_recv_leaves_the_tag_usable() -> None:
    cancelled = anyio.Event()

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await cancelled.wait()
            await comm.send(f32(8, 3), 1, tag=5)
            await comm.send(f32(8, 4), 1, tag=5)
            return None
        stale = np.zeros(8, np.float32)
        with anyio.move_on_after(0.05) as scope:
            await comm.recv(stale, 0, tag=5)
        assert scope.cancelled_caught
        cancelled.set()
        a, b = np.zeros(8, np.float32), np.zeros(8, np.float32)
        await comm.recv(a, 0, tag=5, timeout=5)
        await comm.recv(b, 0, tag=5, timeout=5)
        await anyio.sleep(0.05)
        return stale, a, b

    with anyio.fail_after(10):
        _, (stale, a, b) = await run_ranks(2, body)
    assert not stale.any()  # the withdrawn receive's buffer is never written
    np.testing.assert_array_equal(a, f32(8, 3))  # nothing was lost or reordered
    np.testing.assert_array_equal(b, f32(8, 4))


@pytest.mark.fault("recv cancelled while a 3-frame message is streaming into it",
                   "its buffer is not written after the cancel; the next recv gets the whole message")
async def test_recv_cancelled_while_streaming_does_not_lose_the_message() -> None:
    """Cancel a receive after part of a large message streamed into it: the caller's buffer is
    not written any more, and the next receive gets the whole message."""
    n = 3 * FRAME // 4  # 3 frames, one every 0.1 s
    snapshot: list[np.ndarray] = []

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(f32(n, 7), 1)
            return None
        first = np.zeros(n, np.float32)
        with anyio.move_on_after(0.15) as scope:
            await comm.recv(first, 0)
        assert scope.cancelled_caught
        snapshot.append(first.copy())
        second = np.zeros(n, np.float32)
        await comm.recv(second, 0, timeout=10)
        return first, second

    with anyio.fail_after(20):
        _, (first, second) = await run_ranks(2, body, faults=FaultPlan().delay(0, 0.1))
    np.testing.assert_array_equal(second, f32(n, 7))
    np.testing.assert_array_equal(first, snapshot[0])  # untouched after the cancellation
    assert snapshot[0][: n // 3].any()  # it had really started streaming into it


@pytest.mark.fault("recv with timeout=0.2 s for a message sent 0.4 s later",
                   "CommTimeout (a TimeoutError naming peer and tag) after 0.15-1.5 s; the late message is "
                   "received next")
async def test_recv_timeout_raises_comm_timeout_and_message_waits(detected: Callable[[float], None]) -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await anyio.sleep(0.4)
            await comm.send(f32(4, 8), 1, tag=1)
            return None
        t0 = anyio.current_time()
        with pytest.raises(sc.CommTimeout) as info:
            await comm.recv(np.zeros(4, np.float32), 0, tag=1, timeout=0.2)
        elapsed = anyio.current_time() - t0
        assert isinstance(info.value, TimeoutError)
        assert "recv from rank 0 (tag 1)" in str(info.value)
        buf = np.zeros(4, np.float32)
        await comm.recv(buf, 0, tag=1, timeout=5)  # the late message is not lost
        return elapsed, buf

    with anyio.fail_after(10):
        _, (elapsed, buf) = await run_ranks(2, body)
    assert 0.15 <= elapsed < 1.5
    np.testing.assert_array_equal(buf, f32(4, 8))
    detected(elapsed)


@pytest.mark.fault("recv from a peer that sends nothing, no timeout argument (world default 0.2 s)",
                   "CommTimeout; the two ranks then exchange a message normally")
async def test_default_timeout_applies_to_recv() -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 1:
            with pytest.raises(sc.CommTimeout):
                await comm.recv(np.zeros(1), 0)
            await comm.send(np.ones(1), 0)
            return None
        await anyio.sleep(0.4)
        buf = np.zeros(1)
        await comm.recv(buf, 1, timeout=5)
        return buf

    with anyio.fail_after(10):
        results = await run_ranks(2, body, timeout=0.2)
    assert results[0].tolist() == [1.0]


@pytest.mark.fault("send cancelled after 2 of its 3 frames",
                   "the receiver's recv raises TransferCancelled naming the tag; the next message on the tag "
                   "goes through")
async def test_sender_cancelled_mid_message(detected: Callable[[float], None]) -> None:
    """The sender gives up after 2 of 3 frames: the receiver's recv raises TransferCancelled,
    and the next message on the same tag goes through."""
    n = 3 * FRAME // 4
    done = anyio.Event()
    times: dict[str, float] = {}

    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            with anyio.move_on_after(0.15) as scope:
                await comm.send(f32(n, 1), 1, tag=9)
            assert scope.cancelled_caught
            times["cancelled"] = anyio.current_time()
            await comm.send(f32(5, 2), 1, tag=9)
            await done.wait()
            return None
        with pytest.raises(sc.TransferCancelled) as info:
            await comm.recv(np.zeros(n, np.float32), 0, tag=9, timeout=10)
        times["failed"] = anyio.current_time()
        buf = np.zeros(5, np.float32)
        await comm.recv(buf, 0, tag=9, timeout=10)
        done.set()
        return buf, str(info.value)

    with anyio.fail_after(20):
        _, (buf, msg) = await run_ranks(2, body, faults=FaultPlan().delay(0, 0.1))
    np.testing.assert_array_equal(buf, f32(5, 2))
    assert "cancelled" in msg and "tag 9" in msg
    detected(times["failed"] - times["cancelled"])  # from the sender's cancel to the receiver's error


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.fault("send/recv with a bad peer (itself, out of range, -1, a str) or tag (-1, 1.5), or an unusable "
                   "buffer (a list, complex, strided, read-only recv buffer)",
                   "InvalidArgument or UnsupportedBuffer at the call; a ring of messages then works")
async def test_invalid_peers_and_tags() -> None:
    ws = 3

    async def body(comm: sc.Communicator) -> Any:
        x = np.zeros(4, np.float32)
        me = comm.rank
        for call in (
            lambda: comm.send(x, me),
            lambda: comm.recv(x, me),
            lambda: comm.send(x, ws),
            lambda: comm.recv(x, ws),
            lambda: comm.send(x, -1),
            lambda: comm.recv(x, -1),
            lambda: comm.send(x, (me + 1) % ws, tag=-1),
            lambda: comm.recv(x, (me + 1) % ws, tag=-1),
            lambda: comm.send(x, (me + 1) % ws, tag=1.5),
            lambda: comm.send(x, "1"),
        ):
            with pytest.raises(sc.InvalidArgument):
                await call()
        for call in (
            lambda: comm.send([1, 2], (me + 1) % ws),
            lambda: comm.recv(np.zeros(4, np.complex64), (me + 1) % ws),
            lambda: comm.recv(np.zeros(8, np.float32)[::2], (me + 1) % ws),
        ):
            with pytest.raises(sc.UnsupportedBuffer):
                await call()
        ro = np.zeros(4, np.float32)
        ro.flags.writeable = False
        with pytest.raises(sc.UnsupportedBuffer):
            await comm.recv(ro, (me + 1) % ws)
        # still works: a ring of messages (read-only buffers may be sent)
        out = np.full(4, me, np.float32)
        out.flags.writeable = False
        buf = np.zeros(4, np.float32)
        async with anyio.create_task_group() as tg:
            tg.start_soon(comm.send, out, (me + 1) % ws)
            await comm.recv(buf, (me - 1) % ws, timeout=5)
        return buf

    with anyio.fail_after(10):
        results = await run_ranks(ws, body)
    for rank, buf in enumerate(results):
        assert buf.tolist() == [float((rank - 1) % ws)] * 4


async def test_p2p_stats_are_recorded() -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(np.zeros(10, np.int64), 1)
        else:
            await comm.recv(np.zeros(10, np.int64), 0)
        return comm.stats

    with anyio.fail_after(10):
        s0, s1 = await run_ranks(2, body)
    assert s0.counters["send"].calls == 1 and s0.counters["send"].bytes == 80
    assert s1.counters["recv"].calls == 1 and s1.last("recv").ok
