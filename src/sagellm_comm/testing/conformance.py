"""A conformance kit every transport passes, in the spirit of trio's `check_two_way_stream`.

A transport is a factory of connected `Connection` pairs. The checks drive one
pair each through what the engine relies on: frames arrive whole and in order,
empty and large payloads, many tasks sending on one connection at once, a
cancelled read or write that leaves the stream usable, half close, a peer that
goes away (every pending call fails with `PeerLost`, nothing hangs), and a frame
that announces more than the limit (refused from its prefix, before any
allocation).

Use it from a test::

    @pytest.mark.anyio
    @pytest.mark.parametrize("check", sorted(conformance.CHECKS))
    async def test_my_transport(check):
        await conformance.CHECKS[check](lambda: conformance.listener_pair(MyTransport()))
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager

import anyio

from .. import wire
from ..errors import PeerLost, ProtocolError
from ..transports.base import Connection, Transport, connected_pair

PairFactory = Callable[[], AbstractAsyncContextManager[tuple[Connection, Connection]]]
Check = Callable[[PairFactory], Awaitable[None]]

LIMIT = 60.0  # seconds any one check may take before it counts as a hang
LOSS_LIMIT = 10.0  # seconds for a peer's departure to surface


class ConformanceError(AssertionError):
    """A transport broke one of the promises the engine relies on."""


@asynccontextmanager
async def _opened(make_pair: PairFactory) -> AsyncIterator[tuple[Connection, Connection]]:
    """A pair whose ends are aborted if the check fails."""
    async with make_pair() as (a, b):
        try:
            yield a, b
        except BaseException:
            a.abort()
            b.abort()
            raise


Spawn = Callable[..., None]


@asynccontextmanager
async def _tasks(*conns: Connection) -> AsyncIterator[Spawn]:
    """A task group whose failure (in a task, or anything leaving its body) aborts `conns` before joining.

    Writes that have started are shielded (a torn frame would break the stream), so
    a writer blocked on a peer that stopped reading ends only when its connection does.
    """
    def abort_all() -> None:
        for c in conns:
            c.abort()

    async with anyio.create_task_group() as tg:
        def spawn(fn: Callable[..., Awaitable[None]], *args: object) -> None:
            async def run() -> None:
                try:
                    await fn(*args)
                except anyio.get_cancelled_exc_class():
                    raise  # the check stopped it on purpose
                except BaseException:
                    abort_all()
                    raise

            tg.start_soon(run)

        try:
            yield spawn
        except BaseException:
            abort_all()
            raise


def listener_pair(transport: Transport, host: str = "127.0.0.1") -> AbstractAsyncContextManager[
        tuple[Connection, Connection]]:
    """(dialer end, acceptor end) of one connection through `transport`'s listener."""
    return connected_pair(transport, host)


def _frame(sender: int, seq: int, nbytes: int) -> tuple[bytes, bytes]:
    """A frame whose header names its sender and sequence and whose payload repeats them."""
    payload = (struct.pack("<II", sender, seq) * (nbytes // 8 + 1))[:nbytes]
    return struct.pack("<III", sender, seq, nbytes), payload


async def _read_frame(conn: Connection) -> tuple[int, int, bytes]:
    sender, seq, nbytes = struct.unpack("<III", await conn.recv_exactly(12))
    buf = bytearray(nbytes)
    await conn.recv_into(memoryview(buf))
    return sender, seq, bytes(buf)


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ConformanceError(what)


@contextmanager
def _raising(error: type[BaseException], what: str) -> Iterator[None]:
    try:
        yield
    except error:
        return
    raise ConformanceError(f"{what} did not raise {error.__name__}")


async def _raises(error: type[BaseException], call: Awaitable[object], what: str) -> None:
    with _raising(error, what):
        await call


async def check_ordering(make_pair: PairFactory) -> None:
    """2000 frames of mixed sizes, both directions at once, arrive whole and in order."""
    sizes = [0, 1, 7, 8, 100, 4096, 65535, 65536, 300_000]

    async def send(tx: Connection, who: int) -> None:
        for seq in range(1000):
            await tx.send_frame(*_frame(who, seq, sizes[seq % len(sizes)]))

    async def receive(rx: Connection, who: int) -> None:
        for seq in range(1000):
            sender, got_seq, data = await _read_frame(rx)
            _expect((sender, got_seq) == (who, seq), f"frame {seq} of {who} arrived as ({sender}, {got_seq})")
            _expect(data == _frame(who, seq, sizes[seq % len(sizes)])[1], f"frame {seq}'s payload differs")

    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b), _tasks(a, b) as spawn:
            spawn(send, a, 0)
            spawn(send, b, 1)
            spawn(receive, b, 0)
            spawn(receive, a, 1)


async def check_empty_and_large(make_pair: PairFactory, large: int = 48 * 1024 * 1024) -> None:
    """A frame with no payload, then one far larger than any buffer, then another empty one."""
    import numpy as np

    big = np.random.default_rng(7).integers(0, 256, large, dtype=np.uint8)

    async def send(a: Connection) -> None:
        await a.send_frame(b"E1")
        await a.send_frame(b"LL", big.data)
        await a.send_frame(b"E2", b"")

    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b), _tasks(a, b) as spawn:
            spawn(send, a)
            _expect(await b.recv_exactly(2) == b"E1", "empty frame 1 lost")
            _expect(await b.recv_exactly(2) == b"LL", "large frame's header lost")
            out = np.zeros(large, dtype=np.uint8)
            await b.recv_into(out.data)
            _expect(bool(np.array_equal(out, big)), f"a {large}-byte payload arrived corrupted")
            _expect(await b.recv_exactly(2) == b"E2", "empty frame 2 lost")


async def check_concurrent_senders(make_pair: PairFactory) -> None:
    """Eight tasks sending on one connection: frames never interleave, each task's stay in order."""
    tasks, per_task = 8, 60

    async def send(a: Connection, who: int) -> None:
        for seq in range(per_task):
            await a.send_frame(*_frame(who, seq, 1000 + 7919 * ((who + seq) % 13)))
            if seq % 5 == 0:
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b), _tasks(a, b) as spawn:
            for who in range(tasks):
                spawn(send, a, who)
            next_seq = [0] * tasks
            for _ in range(tasks * per_task):
                sender, seq, data = await _read_frame(b)
                _expect(0 <= sender < tasks, f"frame from unknown sender {sender}: interleaved bytes")
                _expect(seq == next_seq[sender], f"sender {sender}'s frame {seq} came when {next_seq[sender]} was due")
                _expect(data == _frame(sender, seq, len(data))[1], f"sender {sender}'s frame {seq} is corrupted")
                next_seq[sender] += 1


async def check_cancellation(make_pair: PairFactory) -> None:
    """A read cancelled while waiting loses nothing; a cancelled writer never tears a frame."""
    big = 3 * 1024 * 1024

    async def send_forever(a: Connection, who: int) -> None:
        for seq in range(1_000_000):
            await a.send_frame(*_frame(who, seq, big))

    async def read_until_marker(b: Connection, done: anyio.Event) -> None:
        await done.wait()  # the writers have filled every buffer and been cancelled by now
        while True:
            sender, seq, data = await _read_frame(b)
            _expect(data == _frame(sender, seq, len(data))[1], f"frame ({sender}, {seq}) was torn by cancellation")
            if sender == 9:
                return

    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b):
            buf = bytearray(8)
            with anyio.move_on_after(0.05) as scope:
                await b.recv_into(memoryview(buf))
            _expect(scope.cancelled_caught, "a read of an idle connection returned")
            await a.send_frame(b"after-cancel")
            _expect(await b.recv_exactly(12) == b"after-cancel", "the stream broke after a cancelled read")

            # writers cancelled while the reader is not reading: each frame is all or nothing
            async with _tasks(a, b) as spawn:
                cancelled = anyio.Event()
                spawn(read_until_marker, b, cancelled)
                with anyio.CancelScope() as writers:
                    async with _tasks(a, b) as spawn_writer:
                        for who in range(3):
                            spawn_writer(send_forever, a, who)
                        await anyio.sleep(0.2)
                        writers.cancel()
                        cancelled.set()  # the reader drains, so shielded writes can finish
                await a.send_frame(*_frame(9, 0, 10))


async def check_half_close(make_pair: PairFactory) -> None:
    """After close_write the peer reads everything written, then end of stream; it can still answer."""
    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b):
            payload = bytes(range(256)) * 4096
            await a.send_frame(b"last", payload)
            a.close_write()
            _expect(await b.recv_exactly(4) == b"last", "data written before close_write was lost")
            out = bytearray(len(payload))
            await b.recv_into(memoryview(out))
            _expect(bytes(out) == payload, "data written before close_write was corrupted")
            await _raises(PeerLost, b.recv_exactly(1), "a read after the peer's close_write")
            await b.send_frame(b"reply")
            _expect(await a.recv_exactly(5) == b"reply", "the half-closed side can no longer read")


async def check_peer_death(make_pair: PairFactory) -> None:
    """When one end is aborted, the other's pending read and its writes fail with PeerLost, promptly."""
    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b):
            await a.send_frame(b"before")
            _expect(await b.recv_exactly(6) == b"before", "frame before the abort was lost")

            async def read() -> None:
                await _raises(PeerLost, b.recv_exactly(1), "a read pending when the peer aborted")

            with anyio.fail_after(LOSS_LIMIT):
                async with _tasks(a, b) as spawn:
                    spawn(read)
                    await anyio.sleep(0.05)
                    a.abort()
            with anyio.fail_after(LOSS_LIMIT), _raising(PeerLost, "writing 100000 frames to an aborted peer"):
                for _ in range(100_000):  # buffered writes may succeed for a while
                    await b.send_frame(b"x" * 65536)


async def check_oversized_frame(make_pair: PairFactory) -> None:
    """A prefix announcing more than the limit is refused before its payload is read or allocated."""
    with anyio.fail_after(LIMIT):
        async with _opened(make_pair) as (a, b):
            forged = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, 8, 1 << 40)
            await a.send_frame(forged)
            prefix = await b.recv_exactly(wire.PREFIX_SIZE)
            with _raising(ProtocolError, "parsing a prefix that announces a 1 TiB frame"):
                wire.parse_prefix(prefix, max_header=wire.MAX_HEADER_BYTES, max_payload=wire.DEFAULT_MAX_FRAME_BYTES)
            await a.send_frame(b"still-serving")
            _expect(await b.recv_exactly(13) == b"still-serving", "the stream broke after an oversized prefix")


CHECKS: dict[str, Check] = {
    "ordering": check_ordering,
    "empty_and_large": check_empty_and_large,
    "concurrent_senders": check_concurrent_senders,
    "cancellation": check_cancellation,
    "half_close": check_half_close,
    "peer_death": check_peer_death,
    "oversized_frame": check_oversized_frame,
}


async def check_transport(make_pair: PairFactory) -> None:
    """Run every check; raise ConformanceError naming the first one that fails."""
    for name, check in CHECKS.items():
        try:
            await check(make_pair)
        except ConformanceError as e:
            raise ConformanceError(f"{name}: {e}") from e
