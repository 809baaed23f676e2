"""`tcp://`: plain TCP sockets, any host, driven through anyio's readiness waits.

Sockets are non-blocking and used directly (`recv_into`, `sendmsg`) rather than
through anyio's byte streams: streams hand back freshly allocated `bytes` for every
read, which on this class of machine caps large receives at the speed of a copy
into fresh memory (~1.6 GB/s), while reading into a buffer that already exists
reaches the loopback ceiling (~5 GB/s). Readiness waits go through
`anyio.wait_readable`/`wait_writable`, so the same code runs on asyncio and trio.
"""

from __future__ import annotations

import errno
import os
import socket

import anyio

from ..errors import CommTimeout, InvalidArgument, PeerLost
from .base import Connection, Listener, SocketListener, Transport, Wanted, close_socket

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def parse_host_port(address: str) -> tuple[str, int]:
    """'tcp://host:port' or 'host:port' -> (host, port); IPv6 as [::1]:port."""
    addr = address.removeprefix("tcp://")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"expected host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Linux autotunes socket buffers well on loopback and LANs; a fixed size helps
    # on long fat links (cross-datacenter), so it is an opt-in knob.
    buf = int(os.environ.get("SAGELLM_COMM_TCP_BUFFER", "0"))
    if buf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)


class TcpConnection(Connection):
    transport = "tcp"

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        _tune(sock)
        self._sock = sock
        self._closed = False
        try:
            host, port = sock.getpeername()[:2]
            self._peername = f"{host}:{port}"
        except OSError:
            self._peername = "?"

    def describe(self) -> str:
        return f"tcp {self._peername}"

    def _send_now(self, parts: list[memoryview]) -> list[memoryview]:
        sock = self._sock
        while parts:
            if self._closed:
                raise PeerLost(f"connection to {self._peername} was aborted")
            try:
                n = sock.sendmsg(parts)
            except BlockingIOError:
                return parts
            except OSError as e:
                raise PeerLost(f"connection to {self._peername} broke while sending: {e}") from None
            while n:
                head = parts[0]
                if n >= len(head):
                    n -= len(head)
                    parts.pop(0)
                else:
                    parts[0] = head[n:]
                    n = 0
        return parts

    async def _wait_writable(self) -> None:
        await self._wait(anyio.wait_writable)

    async def _recv_some(self, view: memoryview, wanted: Wanted | None = None) -> int:
        sock = self._sock
        while True:
            if self._closed:
                raise PeerLost(f"connection to {self._peername} was aborted")
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                await self._wait(anyio.wait_readable)
                if wanted is not None and not wanted():
                    return 0
                continue
            except OSError as e:
                raise PeerLost(f"connection to {self._peername} broke: {e}") from None
            if n == 0:
                raise PeerLost(f"connection to {self._peername} was closed by the peer")
            return n

    async def _wait(self, waiter: object) -> None:
        try:
            await waiter(self._sock)  # type: ignore[operator]
        except (anyio.ClosedResourceError, OSError, ValueError):
            raise PeerLost(f"connection to {self._peername} was aborted") from None

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_socket(self._sock)

    async def aclose(self) -> None:
        if not self._closed:
            self.close_write()
        self.abort()

    def close_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class TcpListener(SocketListener):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        host, port = sock.getsockname()[:2]
        self.address = format_address(host, port)

    async def accept(self) -> Connection:
        return TcpConnection(await self._accept_socket())


def bind_listener(host: str, port: int = 0, backlog: int = 128) -> TcpListener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.setblocking(False)
    return TcpListener(sock)


async def connect_tcp(address: str, *, deadline: float) -> TcpConnection:
    """Connect, retrying refused connections with jittered back-off until `deadline`.

    Ranks start in any order, so "connection refused" only means "not listening yet".
    """
    import random

    host, port = parse_host_port(address)
    delay = 0.01
    while True:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                sock.connect((host, port))
            except BlockingIOError:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, errno.errorcode.get(err, str(err))) from None
            return TcpConnection(sock)
        except TimeoutError:
            sock.close()
            raise CommTimeout(f"could not connect to {address} before the deadline") from None
        except OSError as e:
            sock.close()
            if anyio.current_time() + delay > deadline:
                raise CommTimeout(f"could not connect to {address}: {e.strerror or e}") from None
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


class TcpTransport(Transport):
    scheme = "tcp"

    def __init__(self, connect_timeout: float = 60.0) -> None:
        self.connect_timeout = connect_timeout

    async def listen(self, host: str) -> Listener:
        return bind_listener(host)

    async def connect(self, address: str) -> Connection:
        return await connect_tcp(address, deadline=anyio.current_time() + self.connect_timeout)
