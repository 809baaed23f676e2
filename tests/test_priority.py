"""Frame priorities: an urgent op's frames are written before queued background frames.

The lock is checked on its own (grant order, cancelled waiters, a waiter cancelled
after it was handed the lock), then on real connections, where a small high-priority
frame queued behind many large low and normal ones must reach the reader right after
the one frame already being written, then through `Engine.send` and `OpContext`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from sagellm_comm import wire
from sagellm_comm.collectives.context import OpContext
from sagellm_comm.scheduler.engine import Engine, EngineConfig
from sagellm_comm.scheduler.ordering import GroupState
from sagellm_comm.transports import get_transport
from sagellm_comm.transports.base import Connection, PrioritySendLock, connected_pair
from sagellm_comm.transports.shm import shm_supported
from sagellm_comm.wire import Data, Fingerprint

pytestmark = pytest.mark.anyio

HIGH, NORMAL, LOW = 1, 0, -1
BIG = 8 * 1024 * 1024  # larger than a socket buffer or the shm ring: the writer blocks on it


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await anyio.sleep(0.001)


# -- the lock on its own -------------------------------------------------------------------------

async def take(lock: PrioritySendLock, order: list[str], name: str, priority: int,
               scope: anyio.CancelScope | None = None) -> None:
    """Wait for the lock at `priority`, note the turn in `order`, release; within `scope` if given."""
    with scope or anyio.CancelScope():
        await lock.acquire(priority)
        order.append(name)
        lock.release()


async def test_uncontended_acquire_is_immediate() -> None:
    lock = PrioritySendLock()
    assert lock.try_acquire()
    assert lock.locked() and not lock.try_acquire()
    lock.release()
    assert not lock.locked()
    with anyio.fail_after(5):
        await lock.acquire(LOW)  # free: taken at once whatever the priority
    assert lock.locked() and lock.waiting() == 0
    lock.release()
    assert not lock.locked()


async def test_waiters_granted_by_priority_then_arrival() -> None:
    lock = PrioritySendLock()
    order: list[str] = []

    with anyio.fail_after(5):
        assert lock.try_acquire()
        async with anyio.create_task_group() as tg:
            for n, (name, prio) in enumerate([("low", LOW), ("normal1", NORMAL), ("high", HIGH), ("normal2", NORMAL)]):
                tg.start_soon(take, lock, order, name, prio)
                await _until(lambda n=n: lock.waiting() == n + 1)  # type: ignore[misc]
            assert order == []
            lock.release()
    assert order == ["high", "normal1", "normal2", "low"]
    assert not lock.locked() and lock.waiting() == 0


@pytest.mark.fault("send-lock waiter cancelled while queued",
                   "skipped: the other waiters get the lock in priority order, and it is free afterwards")
async def test_cancelled_waiter_is_skipped_and_does_not_strand_the_lock() -> None:
    lock = PrioritySendLock()
    order: list[str] = []

    with anyio.fail_after(5):
        assert lock.try_acquire()
        scopes = {name: anyio.CancelScope() for name in ("high", "normal", "low")}
        async with anyio.create_task_group() as tg:
            for n, (name, prio) in enumerate([("high", HIGH), ("normal", NORMAL), ("low", LOW)]):
                tg.start_soon(take, lock, order, name, prio, scopes[name])
                await _until(lambda n=n: lock.waiting() == n + 1)  # type: ignore[misc]
            scopes["high"].cancel()
            await _until(lambda: lock.waiting() == 2)  # it left the queue
            lock.release()
    assert order == ["normal", "low"]
    assert not lock.locked() and lock.waiting() == 0
    with anyio.fail_after(5):
        await lock.acquire()  # and it is free for the next writer
    lock.release()


@pytest.mark.fault("send-lock waiter cancelled in the step it is handed the lock",
                   "the next waiter still gets the lock; it is free afterwards")
async def test_waiter_cancelled_as_it_is_woken_passes_the_lock_on() -> None:
    """Release hands the lock to `high`, which is cancelled in the same step, before it runs."""
    lock = PrioritySendLock()
    order: list[str] = []
    scope = anyio.CancelScope()

    with anyio.fail_after(5):
        assert lock.try_acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, lock, order, "high", HIGH, scope)
            await _until(lambda: lock.waiting() == 1)
            tg.start_soon(take, lock, order, "normal", NORMAL)
            await _until(lambda: lock.waiting() == 2)
            lock.release()
            scope.cancel()
    assert order[-1:] == ["normal"]  # `high` may or may not have used it; `normal` was not stranded
    assert not lock.locked() and lock.waiting() == 0


@pytest.mark.fault("asyncio task cancelled (Task.cancel) after it was handed the send lock, before it runs",
                   "the next waiter gets the lock; it is free afterwards")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancelled_after_wakeup_passes_the_lock_on(anyio_backend: str) -> None:
    """A plain asyncio cancel lands after the wake-up was set: the lock must go to the next waiter."""
    lock = PrioritySendLock()
    order: list[str] = []

    with anyio.fail_after(5):
        assert lock.try_acquire()
        high = asyncio.ensure_future(take(lock, order, "high", HIGH))
        await _until(lambda: lock.waiting() == 1)
        normal = asyncio.ensure_future(take(lock, order, "normal", NORMAL))
        await _until(lambda: lock.waiting() == 2)
        lock.release()  # `high` now owns the lock...
        high.cancel()  # ...and is cancelled before it runs
        await asyncio.gather(high, normal, return_exceptions=True)
    assert high.cancelled()
    assert order == ["normal"]
    assert not lock.locked() and lock.waiting() == 0


# -- real connections ----------------------------------------------------------------------------

def _transports() -> list[Any]:
    ok, why = shm_supported()
    return ["tcp", pytest.param("shm", marks=pytest.mark.skipif(not ok, reason=why))]


async def _read_frames(conn: Connection, count: int) -> list[Data]:
    """The next `count` data frames, in the order they arrive; payloads are read and dropped."""
    sink = memoryview(bytearray(BIG))
    seen: list[Data] = []
    while len(seen) < count:
        hlen, plen = wire.parse_prefix(await conn.recv_exactly(wire.PREFIX_SIZE),
                                       max_header=wire.MAX_HEADER_BYTES, max_payload=BIG)
        msg = wire.decode(await conn.recv_exactly(hlen))
        await conn.recv_into(sink[:plen])
        if isinstance(msg, Data):
            seen.append(msg)
    return seen


def _frame(name: str, index: int, nbytes: int) -> bytes:
    return wire.encode(Data(index, 0, nbytes, name, -1, 0), nbytes)


@pytest.mark.parametrize("transport", _transports())
async def test_high_priority_frame_overtakes_queued_bulk_frames(transport: str) -> None:
    frames_each = 8
    payload = bytes(BIG)
    senders = [("low0", LOW), ("normal0", NORMAL), ("low1", LOW), ("normal1", NORMAL)]
    written = [0]  # bulk frames whose send_frame returned
    at_urgent: dict[str, int] = {}

    async def bulk(conn: Connection, name: str, priority: int) -> None:
        for i in range(frames_each):
            await conn.send_frame(_frame(name, i, BIG), payload, priority=priority)
            written[0] += 1

    async def urgent(conn: Connection) -> None:
        # No await between this snapshot and joining the queue inside send_frame.
        at_urgent.update(written=written[0], queued=conn._send_lock.waiting())
        await conn.send_frame(_frame("urgent", 0, 100), b"u" * 100, priority=HIGH)

    with anyio.fail_after(60):
        async with connected_pair(get_transport(transport)) as (a, b):
            async with anyio.create_task_group() as tg:
                # The reader has not started: the first writer fills the pipe and blocks
                # mid-frame, the other senders queue behind it, in this order.
                tg.start_soon(bulk, a, *senders[0])
                await _until(lambda: a.sending)
                for n, (name, prio) in enumerate(senders[1:]):
                    tg.start_soon(bulk, a, name, prio)
                    await _until(lambda n=n: a._send_lock.waiting() == n + 1)  # type: ignore[misc]
                tg.start_soon(urgent, a)
                await _until(lambda: bool(at_urgent))
                seen = await _read_frames(b, len(senders) * frames_each + 1)
            assert not a.sending
    names = [d.group for d in seen]
    pos = names.index("urgent")
    assert at_urgent["queued"] == len(senders) - 1  # every other sender was waiting when it queued
    fifo_position = at_urgent["written"] + 1 + at_urgent["queued"]  # behind the frame on the wire and the queue
    assert pos == at_urgent["written"] + 1 < fifo_position  # right after the frame already on the wire
    rest = names[pos + 1 :]
    last_normal = max(i for i, n in enumerate(rest) if n.startswith("normal"))
    first_low = min(i for i, n in enumerate(rest) if n.startswith("low"))
    assert last_normal < first_low  # normal senders kept the lock from the low ones while they had frames
    for name, _ in senders:  # each sender's own frames stay in order
        assert [d.mid for d in seen if d.group == name] == list(range(frames_each))


async def test_engine_send_priority_reaches_the_wire_first() -> None:
    """`Engine.send(priority=HIGH)` of a small message overtakes big messages queued before it."""
    frames_each = 4
    big = memoryview(bytearray(frames_each * BIG))
    config = EngineConfig(heartbeat_interval=30.0, heartbeat_timeout=math.inf, frame_bytes=BIG)
    at_urgent: dict[str, int] = {}

    async def urgent(engine: Engine, conn: Connection) -> None:
        at_urgent.update(written=conn.bytes_sent // BIG, queued=conn._send_lock.waiting())  # frames done
        await engine.send(1, ("urgent", -1, 0), memoryview(b"s" * 1000), None, priority=HIGH)

    with anyio.fail_after(60):
        async with connected_pair(get_transport("tcp")) as (a, b):
            engine = Engine(0, 2, {1: a}, config)
            async with anyio.create_task_group() as tg:
                engine.start(tg)
                for n, prio in enumerate([LOW, NORMAL, LOW]):
                    tg.start_soon(lambda n=n, prio=prio: engine.send(1, ("bulk", -1, n), big, None, priority=prio))
                    await _until(lambda n=n: a.sending and a._send_lock.waiting() == n)  # type: ignore[misc]
                tg.start_soon(urgent, engine, a)
                await _until(lambda: bool(at_urgent))
                seen = await _read_frames(b, 3 * frames_each + 1)
                engine.abort()
                tg.cancel_scope.cancel()
    order = [(d.group, d.tag) for d in seen]
    assert at_urgent["queued"] == 2
    # FIFO would put it behind bulk 1's and bulk 2's next frames too.
    assert order.index(("urgent", 0)) == at_urgent["written"] + 1


async def test_op_context_sends_at_its_priority() -> None:
    calls: list[int] = []

    class RecordingEngine:
        async def send(self, dst: int, channel: Any, raw: memoryview, fp: Any, *, priority: int = 0) -> None:
            calls.append(priority)

    group = GroupState("g", [0, 1], 0)
    fp = Fingerprint(0, "test", "uint8", (1,))
    with anyio.fail_after(5):
        await OpContext(RecordingEngine(), group, fp, 1024).send(1, 0, memoryview(b"x"))  # type: ignore[arg-type]
        ctx = OpContext(RecordingEngine(), group, fp, 1024, priority=HIGH)  # type: ignore[arg-type]
        assert ctx.priority == HIGH
        await ctx.send(1, 0, memoryview(b"x"))
    assert calls == [NORMAL, HIGH]
