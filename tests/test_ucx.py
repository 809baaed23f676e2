"""The `ucx://` transport: a byte stream over UCX tag messages, in one process and across two.

Skipped, with the reason, where ucxx is not installed. The transport conformance kit
runs over `ucx_pair` in test_transport_conformance.py; these tests cover what is
particular to UCX: zero-copy receives, the emulated accept, real processes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

import anyio
import numpy as np
import pytest

from sagellm_comm.errors import InvalidArgument, PeerLost
from sagellm_comm.transports import ucx
from sagellm_comm.transports.base import Connection
from sagellm_comm.transports.ucx import UcxConnection, UcxListener, UcxTransport, ucx_available, ucx_pair

OK, WHY = ucx_available()
if not OK:
    pytest.skip(WHY, allow_module_level=True)

pytestmark = pytest.mark.anyio


def _frame(who: int, seq: int, size: int) -> tuple[bytes, bytes]:
    head = who.to_bytes(4, "little") + seq.to_bytes(4, "little") + size.to_bytes(4, "little")
    return head, bytes([(who + seq) % 256]) * size


async def _read_frame(conn: Connection) -> tuple[int, int, bytes]:
    head = await conn.recv_exactly(12)
    who, seq, size = (int.from_bytes(head[i : i + 4], "little") for i in (0, 4, 8))
    buf = bytearray(size)
    await conn.recv_into(memoryview(buf))
    return who, seq, bytes(buf)


async def test_frames_in_order_both_ways() -> None:
    sizes = [0, 1, 100, 8191, 8192, 40_000, 300_000]
    with anyio.fail_after(30):
        async with ucx_pair() as (a, b):
            async def pump(tx: Connection, rx: Connection, who: int) -> None:
                async with anyio.create_task_group() as tg:
                    async def send() -> None:
                        for seq in range(300):
                            await tx.send_frame(*_frame(who, seq, sizes[seq % len(sizes)]))

                    tg.start_soon(send)
                    for seq in range(300):
                        got = await _read_frame(rx)
                        assert got == (who, seq, _frame(who, seq, sizes[seq % len(sizes)])[1])

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, a, b, 0)
                tg.start_soon(pump, b, a, 1)
            assert "ucx" in a.describe() and a.transport == "ucx"


async def test_empty_then_64_mib_lands_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload that fits the reader's view is received straight into it, not via a buffer."""
    queued: list[int] = []
    real_queue = UcxConnection._queue

    def spy(self: UcxConnection, probe: object) -> None:
        queued.append(probe.length)  # type: ignore[attr-defined]
        real_queue(self, probe)

    monkeypatch.setattr(UcxConnection, "_queue", spy)
    size = 64 * 1024 * 1024
    big = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    with anyio.fail_after(60):
        async with ucx_pair() as (a, b), anyio.create_task_group() as tg:
            async def send() -> None:
                await a.send_frame(b"E")
                await a.send_frame(b"L", big.data)
                await a.send_frame(b"Z", b"")

            tg.start_soon(send)
            assert await b.recv_exactly(1) == b"E"
            assert await b.recv_exactly(1) == b"L"
            out = np.zeros(size, dtype=np.uint8)
            await b.recv_into(out.data)
            assert np.array_equal(out, big)
            assert await b.recv_exactly(1) == b"Z"
    assert max(queued, default=0) < 1024 * 1024, queued


async def test_concurrent_senders_never_interleave() -> None:
    with anyio.fail_after(30):
        async with ucx_pair() as (a, b), anyio.create_task_group() as tg:
            async def send(who: int) -> None:
                for seq in range(40):
                    await a.send_frame(*_frame(who, seq, 1000 + 13_331 * ((who + seq) % 7)))

            for who in range(8):
                tg.start_soon(send, who)
            next_seq = [0] * 8
            for _ in range(8 * 40):
                who, seq, data = await _read_frame(b)
                assert seq == next_seq[who]
                assert data == _frame(who, seq, len(data))[1]
                next_seq[who] += 1


async def test_send_before_the_peer_reads() -> None:
    """Writes complete while nobody reads (up to RECV_BUFFER), as on a socket."""
    payload = os.urandom(1024 * 1024)
    with anyio.fail_after(10):
        async with ucx_pair() as (a, b):
            await a.send_frame(b"one", payload)
            await a.send_frame(b"two", payload)
            for name in (b"one", b"two"):
                assert await b.recv_exactly(3) == name
                out = bytearray(len(payload))
                await b.recv_into(memoryview(out))
                assert out == payload


@pytest.mark.fault("ucx read cancelled while the connection is idle, and while a payload is queued",
                   "nothing lost: later reads get the whole frame")
async def test_cancelled_read_loses_nothing() -> None:
    with anyio.fail_after(10):
        async with ucx_pair() as (a, b):
            with anyio.move_on_after(0.05) as scope:
                await b.recv_exactly(4)
            assert scope.cancelled_caught
            await a.send_frame(b"late", bytes(range(256)) * 1024)
            with anyio.move_on_after(0.05):  # the payload is queued while nobody reads; a cancel keeps it
                await b.recv_exactly(4)
                await anyio.sleep(1)
            rest = bytearray(256 * 1024)
            await b.recv_into(memoryview(rest))
            assert rest == bytes(range(256)) * 1024


async def test_close_write_ends_the_stream_after_the_data() -> None:
    with anyio.fail_after(10):
        async with ucx_pair() as (a, b):
            await a.send_frame(b"last", b"x" * 100_000)
            a.close_write()
            assert await b.recv_exactly(4) == b"last"
            out = bytearray(100_000)
            await b.recv_into(memoryview(out))
            assert out == b"x" * 100_000
            with pytest.raises(PeerLost, match="closed by the peer"):
                await b.recv_exactly(1)
            with pytest.raises(PeerLost):
                await a.send_frame(b"after")
            await b.send_frame(b"reply")  # a half close: the other direction still works
            assert await a.recv_exactly(5) == b"reply"


@pytest.mark.fault("one end of a ucx connection aborted while the other reads (one process)",
                   "PeerLost on the pending read and on a later write, within 10 s; the aborted end's reads "
                   "raise PeerLost ('aborted')")
async def test_abort_fails_the_peers_reads_and_writes(detected: Callable[[float], None]) -> None:
    with anyio.fail_after(10):
        async with ucx_pair() as (a, b):
            await a.send_frame(b"before")
            failed: list[str] = []
            times: dict[str, float] = {}

            async def read() -> None:
                with pytest.raises(PeerLost):
                    await b.recv_exactly(100)
                times["failed"] = anyio.current_time()
                failed.append("read")

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.sleep(0.05)
                times["aborted"] = anyio.current_time()
                a.abort()
            assert failed == ["read"]
            with pytest.raises(PeerLost):
                await b.send_frame(b"x", b"y" * 65536)
            with pytest.raises(PeerLost, match="aborted"):
                await a.recv_exactly(1)
    detected(times["failed"] - times["aborted"])  # from the abort to the pending read's PeerLost


async def test_aclose_delivers_then_ends() -> None:
    with anyio.fail_after(10):
        async with ucx_pair() as (a, b):
            await a.send_frame(b"bye")
            await a.aclose()
            assert await b.recv_exactly(3) == b"bye"
            with pytest.raises(PeerLost):
                await b.recv_exactly(1)


@pytest.mark.fault("garbage connect requests to a ucx listener (random bytes, 1 byte, a good header with a "
                   "bad name, 1 MiB of zeros)",
                   "each dropped and counted, even the 1 MiB one drained; the listener still accepts a connection "
                   "that carries a frame")
async def test_malformed_connect_requests_do_not_kill_the_listener() -> None:
    transport = UcxTransport()
    listener = await transport.listen("")
    assert isinstance(listener, UcxListener)
    w = ucx._worker()
    lid, raw = ucx.parse_address(listener.address)
    ep = w.worker.create_endpoint_from_worker_address(w.api.UCXAddress.create_from_buffer(raw), True)
    tag = w.tag(lid, ucx.CONNECT)
    good_header = ucx.REQUEST.pack(ucx.REQUEST_MAGIC, b"\0" * 8, 1, 4)
    garbage = [os.urandom(300), b"x", good_header + b"name" + os.urandom(200), bytes(1024 * 1024)]
    keep = [w.array(g) for g in garbage]
    sends = [ep.tag_send(arr, tag) for arr in keep]
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                accepted: list[Connection] = []

                async def accept() -> None:
                    accepted.append(await listener.accept())

                tg.start_soon(accept)
                await anyio.sleep(0.1)
                a = await transport.connect(listener.address)
            b = accepted[0]
            await a.send_frame(b"still-serving")
            assert await b.recv_exactly(13) == b"still-serving"
            assert listener.dropped == len(garbage)
            await w.wait_until(lambda: all(s.completed for s in sends))  # even the big one was drained
            a.abort()
            b.abort()
    finally:
        await listener.aclose()


@pytest.mark.fault("ucx listener closed while accept() waits", "PeerLost from accept()")
async def test_closed_listener_fails_accept() -> None:
    listener = await UcxTransport().listen("")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def accept() -> None:
                with pytest.raises(PeerLost):
                    await listener.accept()

            tg.start_soon(accept)
            await anyio.sleep(0.05)
            await listener.aclose()


@pytest.mark.fault("malformed ucx addresses (empty, bad id, no worker address, tcp://, 40 kB)", "InvalidArgument")
async def test_bad_addresses_are_refused() -> None:
    transport = UcxTransport()
    for bad in ["ucx://", "ucx://zz/AAAA", "ucx://12", "tcp://127.0.0.1:1", "ucx://12/" + "A" * 40000]:
        with pytest.raises(InvalidArgument):
            await transport.connect(bad)


async def test_idle_wait_uses_no_cpu() -> None:
    async with ucx_pair() as (_, b):
        cpu = time.process_time()
        with anyio.move_on_after(1.0):
            await b.recv_exactly(1)
        assert time.process_time() - cpu < 0.1


@pytest.mark.fault("ucx transport used without ucxx installed",
                   "ucx_available() says why; InvalidArgument with the pip install line")
def test_missing_ucxx_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ucxx._lib.libucxx", None)
    assert ucx_available() == (False, ucx.NEEDS_UCXX)
    with pytest.raises(InvalidArgument, match="pip install"):
        UcxTransport()


def test_importing_the_package_does_not_import_ucxx() -> None:
    code = "import sys, sagellm_comm, sagellm_comm.transports.ucx; assert 'ucxx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- two processes ------------------------------------------------------------------------
PEER = r"""
import hashlib, sys, anyio
from sagellm_comm.transports.ucx import UcxTransport

async def main(mode):
    listener = await UcxTransport().listen("")
    print(listener.address, flush=True)
    conn = await listener.accept()
    if mode == "sleep":
        await conn.send_frame(b"ready")
        await anyio.sleep(60)
    n = int.from_bytes(await conn.recv_exactly(8), "little")
    buf = bytearray(n)
    await conn.recv_into(memoryview(buf))
    await conn.send_frame(hashlib.sha256(buf).digest(), buf)
    await conn.aclose()

anyio.run(main, sys.argv[2], backend=sys.argv[1])
"""


async def _start_peer(backend: str, mode: str) -> tuple[anyio.abc.Process, str]:
    proc = await anyio.open_process([sys.executable, "-c", PEER, backend, mode], stderr=None)
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await proc.stdout.receive()
    return proc, line.decode().strip()


@pytest.mark.multiprocess
async def test_two_processes_exchange_16_mib(anyio_backend: str) -> None:
    payload = np.random.default_rng(2).integers(0, 256, 16 * 1024 * 1024, dtype=np.uint8)
    with anyio.fail_after(60):
        proc, address = await _start_peer(anyio_backend, "echo")
        async with proc:
            conn = await UcxTransport().connect(address)
            await conn.send_frame(len(payload).to_bytes(8, "little"), payload.data)
            digest = await conn.recv_exactly(32)
            echo = np.zeros_like(payload)
            await conn.recv_into(echo.data)
            assert digest == hashlib.sha256(payload.data).digest()
            assert np.array_equal(echo, payload)
            with pytest.raises(PeerLost):
                await conn.recv_exactly(1)
            conn.abort()
            assert await proc.wait() == 0


@pytest.mark.fault("peer process killed (SIGKILL) with a ucx connection open",
                   "PeerLost ('died') on the next read within 10 s of the process being reaped, and on a write")
@pytest.mark.multiprocess
async def test_killed_peer_process_is_peer_lost(anyio_backend: str, detected: Callable[[float], None],
                                                record_property: Callable[[str, object], None]) -> None:
    """UCX keepalive notices a dead peer in about a second, once the process is reaped."""
    with anyio.fail_after(30):
        proc, address = await _start_peer(anyio_backend, "sleep")
        async with proc:
            conn = await UcxTransport().connect(address)
            assert await conn.recv_exactly(5) == b"ready"
            killed_at = anyio.current_time()
            proc.kill()
            await proc.wait()
            with anyio.fail_after(10), pytest.raises(PeerLost, match="died"):
                await conn.recv_exactly(1)
            detected(anyio.current_time() - killed_at)  # from SIGKILL (reaping included) to the read's PeerLost
            record_property("note", "time to detect runs from SIGKILL, the process's reaping included")
            with pytest.raises(PeerLost):
                await conn.send_frame(b"x", b"y" * 100_000)
            conn.abort()
