"""`inproc://`: simulated ranks in one event loop, connected by in-memory pipes.

A pipe behaves like a socket: bounded buffering (a writer waits when the reader
falls behind), end-of-stream on close, an error on abort. It also carries the
fault hooks that `sagellm_comm.testing` uses: a delay on every write, and a cut
link that swallows bytes silently (as a pulled cable does) so that only
heartbeats can notice it.
"""

from __future__ import annotations

import itertools
from collections import deque

import anyio

from ..errors import InvalidArgument, PeerLost
from .base import Connection, Listener, Transport, Wanted

PIPE_CAPACITY = 4 * 1024 * 1024


class Pipe:
    """One direction of an in-memory stream."""

    def __init__(self, capacity: int = PIPE_CAPACITY) -> None:
        self.chunks: deque[memoryview] = deque()
        self.buffered = 0
        self.capacity = capacity
        self.closed = False  # writer closed: reader sees EOF once drained
        self.aborted = False  # torn down: both sides fail at once
        self.cut = False  # link down: writes vanish, reads wait
        self.delay = 0.0  # seconds added before each write lands
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    async def write(self, parts: list[memoryview]) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        for part in parts:
            while self.buffered >= self.capacity and not (self.aborted or self.closed or self.cut):
                await self.wait_change()
            if self.aborted or self.closed:
                raise PeerLost("in-process link closed")
            if self.cut:
                continue
            data = memoryview(bytes(part))
            self.chunks.append(data)
            self.buffered += len(data)
            self._notify()

    async def read_into(self, view: memoryview, wanted: Wanted | None = None) -> int:
        while not self.chunks:
            if self.aborted:
                raise PeerLost("in-process link aborted")
            if self.closed:
                raise PeerLost("in-process link closed by the peer")
            await self.wait_change()
            if wanted is not None and not wanted():
                return 0
        head = self.chunks[0]
        n = min(len(head), len(view))
        view[:n] = head[:n]
        if n == len(head):
            self.chunks.popleft()
        else:
            self.chunks[0] = head[n:]
        self.buffered -= n
        self._notify()
        return n

    def close(self) -> None:
        self.closed = True
        self._notify()

    def abort(self) -> None:
        self.aborted = True
        self.chunks.clear()
        self.buffered = 0
        self._notify()


class InprocConnection(Connection):
    transport = "inproc"

    def __init__(self, tx: Pipe, rx: Pipe, name: str) -> None:
        super().__init__()
        self.tx = tx
        self.rx = rx
        self._name = name

    def describe(self) -> str:
        return f"inproc {self._name}"

    async def _send_parts(self, parts: list[memoryview]) -> None:
        await self.tx.write(parts)

    async def _recv_some(self, view: memoryview, wanted: Wanted | None = None) -> int:
        return await self.rx.read_into(view, wanted)

    def abort(self) -> None:
        self.tx.abort()
        self.rx.abort()

    def close_write(self) -> None:
        self.tx.close()

    async def aclose(self) -> None:
        self.tx.close()  # what we wrote stays readable, as with a TCP FIN
        self.rx.abort()  # what we did not read is dropped, and the peer's writes fail

    def cut(self) -> None:
        """Silently drop everything from now on, in both directions."""
        self.tx.cut = self.rx.cut = True
        self.tx._notify()
        self.rx._notify()


def connection_pair(name_a: str = "a", name_b: str = "b") -> tuple[InprocConnection, InprocConnection]:
    """Two connected ends: what one writes, the other reads."""
    ab, ba = Pipe(), Pipe()
    return InprocConnection(ab, ba, f"{name_a}->{name_b}"), InprocConnection(ba, ab, f"{name_b}->{name_a}")


class InprocListener(Listener):
    def __init__(self, registry: dict[str, InprocListener], name: str) -> None:
        self.address = f"inproc://{name}"
        self._registry = registry
        self._name = name
        send, self._incoming = anyio.create_memory_object_stream[InprocConnection](64)
        self._send = send

    def offer(self, conn: InprocConnection) -> None:
        self._send.send_nowait(conn)

    async def accept(self) -> Connection:
        try:
            return await self._incoming.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise PeerLost(f"listener {self.address} closed") from None

    async def aclose(self) -> None:
        self._registry.pop(self._name, None)
        self._send.close()
        self._incoming.close()


class InprocTransport(Transport):
    """Listeners live in this object's registry: ranks sharing it can reach each other."""

    scheme = "inproc"
    _ids = itertools.count()

    def __init__(self) -> None:
        self._listeners: dict[str, InprocListener] = {}

    async def listen(self, host: str) -> Listener:
        name = f"{host or 'rank'}-{next(self._ids)}"
        listener = InprocListener(self._listeners, name)
        self._listeners[name] = listener
        return listener

    async def connect(self, address: str) -> Connection:
        name = address.removeprefix("inproc://")
        listener = self._listeners.get(name)
        if listener is None:
            raise InvalidArgument(f"no in-process listener at {address}")
        mine, theirs = connection_pair("client", name)
        listener.offer(theirs)
        return mine
