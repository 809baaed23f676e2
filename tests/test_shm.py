"""shm:// specifics the conformance kit does not cover: setup refusals, idle CPU, addressing."""

from __future__ import annotations

import os
import socket
import time

import anyio
import pytest

from sagellm_comm.errors import InvalidArgument
from sagellm_comm.transports import shm
from sagellm_comm.transports.shm import ShmTransport

pytestmark = pytest.mark.skipif(not shm.shm_supported()[0], reason=shm.shm_supported()[1])


def _offer(address: str, fds: list[int]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + shm.parse_address(address)[1])
    socket.send_fds(sock, [b"S"], fds)
    return sock


@pytest.mark.fault("shm listener offered an unsealed memfd (the peer could shrink it), a pipe instead of a "
                   "segment, and a connection that sends nothing",
                   "all three refused; the listener then accepts a good connection that carries a frame")
@pytest.mark.anyio
async def test_unsealed_or_bogus_segments_are_refused_and_the_listener_keeps_serving() -> None:
    transport = ShmTransport()
    listener = await transport.listen()
    bad: list[socket.socket] = []
    try:
        with anyio.fail_after(20):
            # a memfd the peer could still shrink under us (SIGBUS on our next read)
            fd = os.memfd_create("unsealed")
            os.ftruncate(fd, 2 * shm.CTRL_BYTES + 2 * shm.DEFAULT_RING_BYTES)
            a, b = socket.socketpair()
            bad.append(_offer(listener.address, [fd, b.fileno()]))
            os.close(fd)
            # a plain file descriptor instead of a segment, and a connection that sends nothing
            r, w = os.pipe()
            bad.append(_offer(listener.address, [r, w]))
            os.close(r)
            os.close(w)
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.connect("\0" + shm.parse_address(listener.address)[1])
            silent.close()
            accepted = {}
            async with anyio.create_task_group() as tg:
                async def accept() -> None:
                    accepted["conn"] = await listener.accept()

                tg.start_soon(accept)
                good = await transport.connect(listener.address)
            conn = accepted["conn"]
            await good.send_frame(b"hello")
            assert await conn.recv_exactly(5) == b"hello"
            good.abort()
            conn.abort()
            a.close()
            b.close()
    finally:
        for s in bad:
            s.close()
        await listener.aclose()


@pytest.mark.anyio
async def test_an_idle_reader_parks_and_uses_no_cpu() -> None:
    transport = ShmTransport()
    listener = await transport.listen()
    with anyio.fail_after(20):
        ends = {}
        async with anyio.create_task_group() as tg:
            async def accept() -> None:
                ends["b"] = await listener.accept()

            tg.start_soon(accept)
            ends["a"] = await transport.connect(listener.address)
        await listener.aclose()
        a, b = ends["a"], ends["b"]
        cpu = time.process_time()
        with anyio.move_on_after(1.0):
            await b.recv_exactly(1)
        assert time.process_time() - cpu < 0.1  # parked on its socket, not spinning
        await a.send_frame(b"x")  # and a parked reader is woken by the writer
        with anyio.fail_after(2):
            assert await b.recv_exactly(1) == b"x"
        a.abort()
        b.abort()


@pytest.mark.fault("shm address of another host, or without a path",
                   "InvalidArgument ('another host' / 'expected shm://')")
@pytest.mark.anyio
async def test_an_address_of_another_host_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="another host"):
        await ShmTransport().connect("shm://0000000000000000/sagellm-comm-1-abc")
    with pytest.raises(InvalidArgument, match="expected shm://"):
        shm.parse_address("shm://nohost")


@pytest.mark.fault("SAGELLM_COMM_SHM_RING_BYTES not a power of two", "InvalidArgument 'power of two'")
def test_ring_size_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_COMM_SHM_RING_BYTES", "12345")
    with pytest.raises(InvalidArgument, match="power of two"):
        shm.ring_bytes_from_env()
    monkeypatch.setenv("SAGELLM_COMM_SHM_RING_BYTES", str(1 << 20))
    assert shm.ring_bytes_from_env() == 1 << 20
