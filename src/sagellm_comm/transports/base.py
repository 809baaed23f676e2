"""The transport interface: connections that move frames of bytes, nothing more.

A transport implements two primitives, `_send_parts` (write all these bytes) and
`_recv_some` (read at least one byte into this view). Everything shared lives here
once: frame writes serialized per connection, most urgent writer first, and finished
even when the writer is cancelled (a half-written frame would corrupt the stream for
every later op), and a small read-ahead buffer so that headers cost one syscall while
large payloads are read straight into the caller's memory.
"""

from __future__ import annotations

import heapq
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel

from ..buffers import DeviceBytes
from ..errors import PeerLost
from .bounce import Bounce, device_to_host_pieces, host_to_device_piece

Wanted = Callable[[], bool]  # is the view of a pending read still where its bytes should go?

Bytes = bytes | bytearray | memoryview

READ_AHEAD = 256 * 1024
DIRECT_READ_MIN = 32 * 1024  # views at least this large bypass the read-ahead buffer


class PrioritySendLock:
    """A lock whose waiters are served highest priority first, FIFO within one priority.

    Frames queue on it, so a decode-critical op's next frame goes out before the
    frames of background ops that were waiting longer. `release` hands the lock
    straight to the next waiter (the lock stays held meanwhile), so no newcomer can
    barge in between and the lock is free only when nobody waits. A waiter that is
    cancelled leaves the queue; one cancelled after it was handed the lock but before
    it ran passes the lock on, so a wake-up is never lost. Built on anyio.Event only,
    so it works under asyncio and trio.
    """

    __slots__ = ("_held", "_seq", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._seq = 0  # ties within one priority go to the earliest waiter
        self._waiters: list[tuple[int, int, anyio.Event]] = []  # heap of (-priority, arrival, wake-up)

    def locked(self) -> bool:
        """Held (a writer is writing, or the lock is on its way to a woken waiter)."""
        return self._held

    def waiting(self) -> int:
        """How many tasks wait for the lock."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting: the uncontended fast path."""
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self, priority: int = 0) -> None:
        """Take the lock, waiting behind more urgent and earlier equally urgent waiters."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self.try_acquire():
            await anyio.lowlevel.cancel_shielded_checkpoint()  # yield, but never drop a lock just taken
            return
        wake = anyio.Event()
        entry = (-priority, self._seq, wake)
        self._seq += 1
        heapq.heappush(self._waiters, entry)
        try:
            await wake.wait()
        except BaseException:
            if wake.is_set():  # the lock was handed to us, but we will not use it
                self.release()
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        """Hand the lock to the most urgent waiter, or free it if none waits."""
        if self._waiters:
            heapq.heappop(self._waiters)[2].set()
        else:
            self._held = False


class Connection(ABC):
    """A reliable, ordered byte stream to one peer, written in whole frames."""

    transport: str = "?"
    device_payloads = False  # copies `DeviceBytes` itself (shm, by DMA); the others go through `bounce.py`
    greedy_reads = True  # fill the read-ahead buffer as far as one read gives (saves syscalls)

    def __init__(self) -> None:
        self._send_lock = PrioritySendLock()
        self._rbuf = bytearray(READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self.peer: int = -1
        self.reason = ""  # why this transport was chosen for this peer (for stats and `info`)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_send = time.monotonic()  # liveness clock: real time, cheap to read
        self._bounce_out: Bounce | None = None  # pinned buffers for DeviceBytes, made on first use
        self._bounce_in: Bounce | None = None
        self.last_receive = self.last_send

    # -- what a transport implements -------------------------------------------------
    async def _send_parts(self, parts: list[memoryview]) -> None:
        """Write every byte of `parts`, in order; raise PeerLost if the stream broke.

        The default alternates `_send_now` with `_wait_writable`; a transport
        implements those two, or overrides this.
        """
        while True:
            parts = self._send_now(parts)
            if not parts:
                return
            await self._wait_writable()

    async def _wait_writable(self) -> None:
        """Wait until `_send_now` can write more (or would raise PeerLost)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _send_parts nor _wait_writable")

    def _send_now(self, parts: list[memoryview]) -> list[memoryview]:
        """Write what can be written without waiting; return what is left (in place).

        The default writes nothing; transports with non-blocking writes override it
        so that an uncontended send costs no trip through the event loop.
        """
        return parts

    @abstractmethod
    async def _recv_some(self, view: memoryview, wanted: Wanted | None = None) -> int:
        """Read 1..len(view) bytes into `view`; raise PeerLost at end of stream.

        `wanted`: asked after any wait; if it is false, return 0 without touching `view`.
        """

    @abstractmethod
    def abort(self) -> None:
        """Close at once, without a goodbye; pending reads and writes fail with PeerLost."""

    @abstractmethod
    def close_write(self) -> None:
        """Send end-of-stream after what was written; keep reading (a half close)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close after flushing what was written."""

    def describe(self) -> str:
        return self.transport

    # -- shared ----------------------------------------------------------------------
    async def send_frame(self, head: Bytes, payload: Bytes | DeviceBytes | None = None, *,
                         priority: int = 0) -> None:
        """Write one frame (prefix+header, then payload) atomically with respect to other frames.

        Writers waiting for the connection go highest `priority` first (FIFO within
        one priority); a frame being written is never interrupted. Waiting is
        cancellable; once the first byte is out, the frame is finished even if the
        caller is cancelled, since a torn frame would break the stream. A frozen peer
        cannot hold it forever: the heartbeat watchdog aborts the connection, which
        fails the write.
        """
        parts: list[Any] = [memoryview(head).cast("B")]
        if payload is not None and len(payload):
            parts.append(payload if isinstance(payload, DeviceBytes) else memoryview(payload).cast("B"))
        nbytes = sum(len(p) for p in parts)
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller writes nothing
        lock = self._send_lock
        if not lock.try_acquire():  # fast path (no await): nobody else is writing
            await lock.acquire(priority)
        try:
            if len(parts) > 1 and isinstance(parts[1], DeviceBytes) and not self.device_payloads:
                with anyio.CancelScope(shield=True):
                    await self._write(parts[:1])
                    if self._bounce_out is None:
                        self._bounce_out = Bounce()
                    async for piece in device_to_host_pieces(parts[1], self._bounce_out):
                        await self._write([piece])
            else:
                rest = self._send_now(parts)
                if rest:
                    with anyio.CancelScope(shield=True):
                        await self._send_parts(rest)
        finally:
            lock.release()
        self.bytes_sent += nbytes
        self.last_send = time.monotonic()

    async def _write(self, parts: list[memoryview]) -> None:
        rest = self._send_now(parts)
        if rest:
            await self._send_parts(rest)

    @property
    def sending(self) -> bool:
        """A frame is being written now or writers wait (the lock is free only when none wait)."""
        return self._send_lock.locked()

    def _buffered(self) -> int:
        return self._rend - self._rstart

    async def _fill(self, need: int) -> None:
        """Ensure at least `need` bytes (<= READ_AHEAD) sit in the read-ahead buffer."""
        if self._rstart + need > len(self._rbuf):
            n = self._buffered()
            self._rview[:n] = self._rview[self._rstart : self._rend]
            self._rstart, self._rend = 0, n
        while self._buffered() < need:
            view = self._rview[self._rend :] if self.greedy_reads else self._rview[self._rend : self._rstart + need]
            got = await self._recv_some(view)
            self._rend += got
            self.bytes_received += got
            self.last_receive = time.monotonic()

    async def recv_exactly(self, n: int) -> bytes:
        """The next `n` bytes of the stream (n <= READ_AHEAD); for prefixes and headers."""
        await self._fill(n)
        out = bytes(self._rview[self._rstart : self._rstart + n])
        self._rstart += n
        return out

    async def recv_some_into(self, view: Any, wanted: Wanted | None = None) -> int:
        """Read 1..len(view) bytes into `view`, from the read-ahead buffer first.

        `wanted`: whether `view` is still the right place, asked after any wait. A read
        that had to wait returns 0 instead, with `view` untouched, when it is not: the
        caller of a receive that was withdrawn meanwhile may already have reused that
        memory. (Reads that need no wait copy at once, and a transport that committed
        a copy before it could ask may still land it: the caller checks afterwards.)

        `view` may be `DeviceBytes`: a transport with `device_payloads` copies into it
        itself; for the others the bytes go through a pinned bounce buffer, and the
        copy to the device is still running on `view.stream` when this returns.
        """
        if isinstance(view, DeviceBytes) and not self.device_payloads:
            if self._bounce_in is None:
                self._bounce_in = Bounce()
            return await host_to_device_piece(view, self._bounce_in, self.recv_some_into)
        avail = self._buffered()
        if avail:
            n = min(avail, len(view))
            view[:n] = self._rview[self._rstart : self._rstart + n]
            self._rstart += n
            return n
        if len(view) >= DIRECT_READ_MIN or not self.greedy_reads:
            got = await self._recv_some(view, wanted)
            self.bytes_received += got
            if got:
                self.last_receive = time.monotonic()
            return got
        self._rstart = self._rend = 0
        await self._fill(1)
        if wanted is not None and not wanted():
            return 0
        return await self.recv_some_into(view)

    async def recv_into(self, view: memoryview) -> None:
        """Fill all of `view` from the stream."""
        done = 0
        while done < len(view):
            done += await self.recv_some_into(view[done:])


class Listener(ABC):
    """Accepts connections for one rank; `address` is what peers pass to `connect`."""

    address: str

    @abstractmethod
    async def accept(self) -> Connection: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Transport(ABC):
    """A way to reach peers, named by a URL scheme (`tcp`, `inproc`, ...)."""

    scheme: str

    @abstractmethod
    async def listen(self, host: str) -> Listener: ...

    @abstractmethod
    async def connect(self, address: str) -> Connection: ...



def close_socket(sock: socket.socket) -> None:
    """Close `sock`, first waking every task waiting on it (they see ClosedResourceError)."""
    try:
        anyio.notify_closing(sock)
    except Exception:
        pass
    sock.close()


class SocketListener(Listener):
    """A listener over a non-blocking listening socket (TCP, or shm's Unix socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False

    async def _accept_socket(self) -> socket.socket:
        while True:
            try:
                conn, _ = self._sock.accept()
                return conn
            except BlockingIOError:
                try:
                    await anyio.wait_readable(self._sock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    raise PeerLost("listener closed") from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            close_socket(self._sock)


@asynccontextmanager
async def connected_pair(transport: Transport, host: str = "127.0.0.1") -> AsyncIterator[tuple[Connection, Connection]]:
    """(dialer end, acceptor end) of one connection through `transport`'s listener; aborted on exit."""
    listener = await transport.listen(host)
    ends: dict[str, Connection] = {}
    try:
        async with anyio.create_task_group() as tg:
            async def accept() -> None:
                ends["b"] = await listener.accept()

            tg.start_soon(accept)
            ends["a"] = await transport.connect(listener.address)
    finally:
        await listener.aclose()
    try:
        yield ends["a"], ends["b"]
    finally:
        for c in ends.values():
            c.abort()
