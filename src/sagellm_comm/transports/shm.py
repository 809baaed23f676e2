"""`shm://`: shared-memory rings between processes of one host.

Loopback TCP costs a kernel copy in each direction and a wake-up per message;
two processes of one host can instead share a pair of single-producer,
single-consumer byte rings, so a message is copied once into the ring and once out.

Setup: the listener is an abstract Unix socket (it vanishes with its process and
never appears on a filesystem). The dialer creates the segment with
`memfd_create`, seals its size and passes it, with one end of a second socket
pair, over the Unix socket. No name is ever created in /dev/shm, so a killed
process leaks nothing: the kernel frees the memory with its last mapping. The
seals matter too: a peer could otherwise shrink the file under us and turn our
next read into SIGBUS. The acceptor allocates nothing for an unauthenticated
peer; it maps the dialer's memory, and the normal handshake then runs over the rings.

Waiting: a reader with an empty ring (or a writer with a full one) first spins
cooperatively, yielding to the event loop, for `SAGELLM_COMM_SHM_SPIN_US`; then
it raises a "parked" flag in the ring header and waits for its socket to become
readable, so an idle rank uses no CPU. The other side sends one byte on the
socket only when it sees that flag. The flag and the ring index are plain stores
and loads (Python has no fences); the one interleaving in which both sides miss
each other's store is covered by re-checking the ring 1 ms after parking.
The same sockets report the peer's death (end of stream), after whatever it
had written to the ring has been read.

The indices are 8-byte aligned stores through a memoryview, which x86-64 makes
atomic and orders after the payload copy (TSO); on other architectures the
automatic choice does not pick this transport.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import platform
import secrets
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from functools import cache
from typing import Any

import anyio
import anyio.lowlevel

from ..buffers import DeviceBytes
from ..errors import CommTimeout, InvalidArgument, PeerLost
from ..scheduler import device
from .base import Connection, Listener, SocketListener, Transport, Wanted, close_socket

MAGIC = 0x53434F4D4D53484D  # "SCOMMSHM"
CTRL_BYTES = 4096  # per direction: indices and flags, each on its own cache line
DEFAULT_RING_BYTES = 4 * 1024 * 1024  # per direction; with 1 MiB copies, the best of 1-16 MiB measured here
CUDA_RING_BYTES = 64 * 1024 * 1024  # per direction, in processes that have CUDA (see ring_bytes_from_env)
MAX_RING_BYTES = 1 << 30
COPY_CHUNK = 1024 * 1024  # indices advance at least this often, so the reader can start early
DEFAULT_SPIN_US = 100.0
MICRO_SPIN = 5e-6  # seconds of polling between two yields to the event loop
SETUP_TIMEOUT = 5.0  # seconds an accepted socket has to hand over its segment
RECHECK_AFTER_PARK = 0.001
DMA_DEPTH = 3  # device copies (of a quarter ring each) queued at once per direction
DMA_SPIN = 2e-3  # a side waiting on the other's device copy polls this long before parking

# u64 slots in a direction's control block (8 slots = one 64-byte cache line)
HEAD, TAIL, READER_PARKED, WRITER_PARKED, WRITER_CLOSED, MAGIC_SLOT, SIZE_SLOT = 0, 8, 16, 24, 32, 40, 41

_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4) | getattr(fcntl, "F_SEAL_SEAL", 1)


def shm_supported() -> tuple[bool, str]:
    """Whether this process can use the transport, and why not."""
    if not hasattr(os, "memfd_create") or not hasattr(socket, "send_fds"):
        return False, "needs Linux memfd_create and SCM_RIGHTS (socket.send_fds)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"ring ordering relies on x86-64 store order; this is {platform.machine()}"
    return True, ""


@cache
def host_key() -> str:
    """Identifies what can share memory with us: this boot of this machine and network namespace.

    Abstract Unix sockets are per network namespace, so ranks in different
    namespaces (containers, the multi-host tests) are different hosts here.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = "?"
    return hashlib.sha256(f"{boot}/{netns}".encode()).hexdigest()[:16]


def _env_spin() -> float:
    return float(os.environ.get("SAGELLM_COMM_SHM_SPIN_US", DEFAULT_SPIN_US)) * 1e-6


def _process_has_cuda() -> bool:
    torch = sys.modules.get("torch")  # only if the caller imported it: we never import torch for them
    try:
        return torch is not None and bool(torch.cuda.is_available())
    except Exception:
        return False


def ring_bytes_from_env() -> int:
    """The ring size a dialer gives a new link: the setting, else by what this process moves.

    CUDA tensors go through the rings by DMA, which wants room for several large
    copies in flight (measured: 4 MiB rings carry 18-20 GB/s, 64 MiB rings 36-41 GB/s
    from 256 MiB messages); host copies do best with 4 MiB.
    """
    default = CUDA_RING_BYTES if _process_has_cuda() else DEFAULT_RING_BYTES
    size = int(os.environ.get("SAGELLM_COMM_SHM_RING_BYTES", default))
    if size < 4096 or size > MAX_RING_BYTES or size & (size - 1):
        raise InvalidArgument(f"SAGELLM_COMM_SHM_RING_BYTES={size}: use a power of two from 4096 to {MAX_RING_BYTES}")
    return size


class Ring:
    """One direction of a connection: a byte ring and its control block in the shared segment."""

    __slots__ = ("ctrl", "data", "mask", "offset", "size")

    def __init__(self, mem: memoryview, ctrl_off: int, data_off: int, size: int) -> None:
        self.ctrl = mem[ctrl_off : ctrl_off + CTRL_BYTES].cast("Q")
        self.data = mem[data_off : data_off + size]
        self.offset = data_off  # of the data in the segment (device copies address it from there)
        self.size = size
        self.mask = size - 1

    def readable(self) -> int:
        ctrl = self.ctrl
        return int(ctrl[HEAD] - ctrl[TAIL])

    def write_some(self, src: memoryview) -> int:
        """Copy what fits of `src` (up to COPY_CHUNK) into the ring; return the count."""
        ctrl = self.ctrl
        head = ctrl[HEAD]
        n = min(self.size - (head - ctrl[TAIL]), len(src), COPY_CHUNK)
        if n <= 0:
            return 0
        pos = head & self.mask
        first = min(n, self.size - pos)
        self.data[pos : pos + first] = src[:first]
        if first < n:
            self.data[: n - first] = src[first:n]
        ctrl[HEAD] = head + n  # published after the bytes (x86-64 keeps store order)
        return n

    def read_some(self, dst: memoryview) -> int:
        """Copy up to len(dst) available bytes out of the ring; return the count."""
        ctrl = self.ctrl
        tail = ctrl[TAIL]
        n = min(ctrl[HEAD] - tail, len(dst))
        if n <= 0:
            return 0
        pos = tail & self.mask
        first = min(n, self.size - pos)
        dst[:first] = self.data[pos : pos + first]
        if first < n:
            dst[first:n] = self.data[: n - first]
        ctrl[TAIL] = tail + n
        return n


def _segment_layout(size: int) -> tuple[int, tuple[int, int, int], tuple[int, int, int]]:
    """Total bytes, and (ctrl, data, size) of the dialer->acceptor and acceptor->dialer rings."""
    a = (0, 2 * CTRL_BYTES, size)
    b = (CTRL_BYTES, 2 * CTRL_BYTES + size, size)
    return 2 * CTRL_BYTES + 2 * size, a, b


class ShmConnection(Connection):
    """A byte stream over two rings; `bell` wakes a parked reader, `space_bell` a parked writer."""

    transport = "shm"
    greedy_reads = False  # no syscall per read: take only the bytes asked for
    device_payloads = True  # CUDA memory goes through the rings by DMA (see `_dma`)

    def __init__(self, segment: mmap.mmap, dialer: bool, bell: socket.socket, space_bell: socket.socket,
                 ring_size: int) -> None:
        super().__init__()
        self._segment = segment
        mem = memoryview(segment)
        _, a, b = _segment_layout(ring_size)
        self._out = Ring(mem, *(a if dialer else b))
        self._in = Ring(mem, *(b if dialer else a))
        self._bell = bell
        self._space_bell = space_bell
        for s in (bell, space_bell):
            s.setblocking(False)
        self._closed = False  # we aborted
        self._peer_gone = False  # a socket reported end of stream: the peer's process closed it
        self._spin = _env_spin()
        self._name = f"shm pid {_peer_pid(bell)}"
        self._pinned: PinnedSegment | None = None  # the segment registered with CUDA, on first use

    def describe(self) -> str:
        return self._name

    # -- signalling ----------------------------------------------------------------------
    def _ring(self, sock: socket.socket) -> None:
        try:
            sock.send(b"\x01")
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full of wake-ups already
        except OSError:
            self._peer_gone = True

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                got = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._peer_gone = True
                return
            if not got:
                self._peer_gone = True
                return

    async def _wait(self, check: Callable[[], bool], sock: socket.socket, parked_ring: Ring, slot: int,
                    spin: float | None = None) -> None:
        """Return when `check()` holds, the peer is gone, or we are aborted: spin, then park."""
        now = time.perf_counter
        deadline = now() + (self._spin if spin is None else spin)
        while now() < deadline:
            await anyio.lowlevel.checkpoint()  # let other tasks run between polls
            burst = now() + MICRO_SPIN
            while True:  # then poll without a trip through the event loop (its poll is a syscall)
                if check() or self._closed or self._peer_gone:
                    return
                if now() > burst:
                    break
        ctrl = parked_ring.ctrl
        ctrl[slot] = 1
        try:
            bounded = True
            while not (check() or self._closed or self._peer_gone):
                try:
                    if bounded:
                        with anyio.move_on_after(RECHECK_AFTER_PARK):
                            await anyio.wait_readable(sock)
                        bounded = False
                    else:
                        await anyio.wait_readable(sock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    self._closed = True
                    break
                if not self._closed:
                    self._drain(sock)
        finally:
            ctrl[slot] = 0

    def _space(self) -> bool:
        return self._out.readable() < self._out.size

    def _data(self) -> bool:
        return self._in.readable() > 0

    # -- Connection ----------------------------------------------------------------------
    def _send_now(self, parts: list[memoryview]) -> list[memoryview]:
        if self._closed:
            raise PeerLost(f"connection to {self._name} was aborted")
        if self._peer_gone:
            raise PeerLost(f"{self._name} has gone (its process closed the connection)")
        out = self._out
        while parts:
            head = parts[0]
            if isinstance(head, DeviceBytes):
                break  # device memory needs an awaited copy: `_send_parts` does it
            n = out.write_some(head)
            if n == 0:
                break
            if n == len(head):
                parts.pop(0)
            else:
                parts[0] = head[n:]
            if out.ctrl[READER_PARKED]:  # after every step, so a parked reader starts copying out early
                self._ring(self._bell)
        return parts

    async def _wait_writable(self) -> None:
        await self._wait(self._space, self._space_bell, self._out, WRITER_PARKED)

    async def _send_parts(self, parts: list[Any]) -> None:
        for part in parts:
            if isinstance(part, DeviceBytes):
                await self._dma(part, outgoing=True)
                continue
            rest = [part]
            while True:
                rest = self._send_now(rest)
                if not rest:
                    break
                await self._wait_writable()

    def _check_open(self) -> None:
        if self._closed:
            raise PeerLost(f"connection to {self._name} was aborted")
        if self._peer_gone:
            raise PeerLost(f"{self._name} has gone (its process closed the connection)")

    def _pinned_segment(self) -> PinnedSegment:
        if self._pinned is None:
            self._pinned = PinnedSegment(self._segment)
        return self._pinned

    async def _dma(self, dev: DeviceBytes, outgoing: bool) -> int:
        """Copy between device bytes and a ring with the GPU's copy engines, pipelined.

        Copies of a quarter ring each, up to DMA_DEPTH queued, so the copy engine never
        idles waiting for the host; each chunk is handed over (published to the reader,
        or its space given back to the writer) as soon as its copy lands, so the other
        side works on it while later chunks are copied. Incoming, it returns early with
        what it has when the writer has gone and the ring is empty.
        """
        pinned = self._pinned_segment()
        seg = pinned.tensor
        torch = sys.modules["torch"]
        ring = self._out if outgoing else self._in
        ctrl = ring.ctrl
        mine = HEAD if outgoing else TAIL  # the index this side advances
        chunk = max(ring.size // 4, 1)
        pending: deque[tuple[Any, int]] = deque()  # (event, our index once its copy has landed)
        issued = 0
        while issued < len(dev) or pending:
            if outgoing:
                self._check_open()
            while issued < len(dev) and len(pending) < DMA_DEPTH:
                index = pending[-1][1] if pending else ctrl[mine]
                room = ring.size - (index - ctrl[TAIL]) if outgoing else ctrl[HEAD] - index
                pos = index & ring.mask
                n = min(room, len(dev) - issued, ring.size - pos, chunk)
                if n <= 0:
                    break
                host = seg[ring.offset + pos : ring.offset + pos + n]
                part = dev.t[issued : issued + n]
                event = torch.cuda.Event()
                with torch.cuda.stream(dev.stream):
                    if outgoing:
                        host.copy_(part, non_blocking=True)
                    else:
                        part.copy_(host, non_blocking=True)
                    event.record(dev.stream)
                pending.append((event, index + n))
                pinned.in_flight.add(event)
                issued += n
            if pending:
                event, index = pending[0]
                await device.wait_event(event, key="shm device copy")
                pending.popleft()
                pinned.in_flight.discard(event)
                ctrl[mine] = index
                if outgoing and ctrl[READER_PARKED]:
                    self._ring(self._bell)
                elif not outgoing and ctrl[WRITER_PARKED]:
                    self._ring(self._space_bell)
            elif outgoing:
                await self._wait(self._space, self._space_bell, ring, WRITER_PARKED, spin=DMA_SPIN)
            elif self._closed or self._peer_gone or ctrl[WRITER_CLOSED]:
                break  # what arrived is returned; the next read reports the end
            else:
                await self._wait(self._data, self._bell, ring, READER_PARKED, spin=DMA_SPIN)
        return issued

    async def _recv_some(self, view: Any, wanted: Wanted | None = None) -> int:
        inp = self._in
        while True:
            if isinstance(view, DeviceBytes):
                n = await self._dma(view, outgoing=False) if inp.readable() else 0
            else:
                n = inp.read_some(view)
            if n:
                if inp.ctrl[WRITER_PARKED]:
                    self._ring(self._space_bell)
                return n
            if self._closed:
                raise PeerLost(f"connection to {self._name} was aborted")
            if inp.ctrl[WRITER_CLOSED]:
                if inp.readable():
                    continue
                raise PeerLost(f"{self._name} closed the connection")
            if self._peer_gone:
                if inp.readable():
                    continue
                raise PeerLost(f"{self._name} has gone (its process closed the connection)")
            # a device copy of the other side is about to land: wait for it without parking
            await self._wait(self._data, self._bell, inp, READER_PARKED,
                             spin=DMA_SPIN if isinstance(view, DeviceBytes) else None)
            if wanted is not None and not wanted():
                return 0

    def close_write(self) -> None:
        if self._closed:
            return
        self._out.ctrl[WRITER_CLOSED] = 1
        self._ring(self._bell)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_socket(self._bell)
        close_socket(self._space_bell)
        if self._pinned is not None:
            self._pinned.release()
            self._pinned = None

    async def aclose(self) -> None:
        if not self._closed:
            self.close_write()
        self.abort()


class PinnedSegment:
    """The shared segment registered with CUDA (page-locked), so the GPU copies to and from it.

    Registration is per process and done once per connection, on its first device
    copy (it takes milliseconds); it is undone before the mapping can go away.
    """

    def __init__(self, segment: mmap.mmap) -> None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            raise InvalidArgument("device bytes over shm need torch with CUDA")
        self.in_flight: set[Any] = set()  # events of our copies not yet awaited (an abort may cut a wait)
        anchor = ctypes.c_char.from_buffer(segment)
        self.addr = ctypes.addressof(anchor)
        del anchor  # the address stays valid while the mapping lives; the export must not
        err = torch.cuda.cudart().cudaHostRegister(self.addr, len(segment), 0)
        if int(getattr(err, "value", err)) != 0:
            raise InvalidArgument(f"cudaHostRegister of the shared segment failed: {err}")
        self.tensor = torch.frombuffer(segment, dtype=torch.uint8)

    def release(self) -> None:
        torch = sys.modules["torch"]
        for event in self.in_flight:  # no copy of ours may still touch the segment (others' work may run on)
            event.synchronize()
        del self.tensor
        torch.cuda.cudart().cudaHostUnregister(self.addr)


def _peer_pid(sock: socket.socket) -> int:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except OSError:
        return -1


def _make_segment(ring_size: int) -> tuple[int, mmap.mmap]:
    total, a, b = _segment_layout(ring_size)
    fd = os.memfd_create("sagellm-comm-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, total)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        seg = mmap.mmap(fd, total)
    except BaseException:
        os.close(fd)
        raise
    mem = memoryview(seg)
    for ctrl_off, _, size in (a, b):
        ctrl = mem[ctrl_off : ctrl_off + CTRL_BYTES].cast("Q")
        ctrl[MAGIC_SLOT] = MAGIC
        ctrl[SIZE_SLOT] = size
        ctrl.release()
    mem.release()
    return fd, seg


def _map_offered(fd: int) -> tuple[mmap.mmap, int]:
    """Map a segment a dialer handed us, after checking it cannot be resized or lie about its rings."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & _SEALS != _SEALS:
        raise InvalidArgument("offered segment is not sealed against resizing")
    total = os.fstat(fd).st_size
    if total < 2 * CTRL_BYTES + 2 * 4096 or total > 2 * CTRL_BYTES + 2 * MAX_RING_BYTES:
        raise InvalidArgument(f"offered segment has an implausible size {total}")
    seg = mmap.mmap(fd, total)
    ctrl = memoryview(seg)[:CTRL_BYTES].cast("Q")
    magic, size = ctrl[MAGIC_SLOT], ctrl[SIZE_SLOT]
    ctrl.release()
    if magic != MAGIC or size & (size - 1) or _segment_layout(size)[0] != total:
        seg.close()
        raise InvalidArgument("offered segment has a bad header")
    return seg, size


def parse_address(address: str) -> tuple[str, str]:
    """'shm://<host key>/<socket name>' -> (host key, name)."""
    rest = address.removeprefix("shm://")
    key, sep, name = rest.partition("/")
    if not sep or not key or not name:
        raise InvalidArgument(f"expected shm://<host key>/<name>, got {address!r}")
    return key, name


class ShmListener(SocketListener):
    def __init__(self, ring_size: int) -> None:
        self._name = f"sagellm-comm-{os.getpid()}-{secrets.token_hex(6)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self._name)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        super().__init__(sock)
        self.address = f"shm://{host_key()}/{self._name}"

    async def accept(self) -> Connection:
        """The next peer that hands over a well-formed segment; others are dropped."""
        while True:
            sock = await self._accept_socket()
            sock.setblocking(False)
            conn = None
            with anyio.move_on_after(SETUP_TIMEOUT):
                conn = await _accept_segment(sock)
            if conn is not None:
                return conn
            sock.close()


async def _accept_segment(sock: socket.socket) -> ShmConnection | None:
    fds: list[int] = []
    try:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
                break
            except BlockingIOError:
                await anyio.wait_readable(sock)
        if msg != b"S" or len(fds) != 2:
            return None
        seg, size = _map_offered(fds[0])
        space = socket.socket(fileno=fds.pop())
        if space.family != socket.AF_UNIX:
            space.close()
            seg.close()
            return None
        return ShmConnection(seg, dialer=False, bell=sock, space_bell=space, ring_size=size)
    except (OSError, InvalidArgument, ValueError):
        return None
    finally:
        for fd in fds:  # the mapping keeps the segment alive without its descriptor
            os.close(fd)


async def connect_shm(address: str, *, deadline: float, ring_size: int | None = None) -> ShmConnection:
    """Dial a listener of this host, retrying while it is not up yet, and hand it a new segment."""
    import random

    key, name = parse_address(address)
    if key != host_key():
        raise InvalidArgument(f"{address} is on another host (or network namespace); shm only reaches this one")
    size = ring_size or ring_bytes_from_env()
    delay = 0.01
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + name)  # local: completes or fails at once
            break
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                raise PeerLost(f"cannot reach {address}: {e.strerror or e}") from None
            if anyio.current_time() + delay > deadline:
                raise CommTimeout(f"could not connect to {address}: {e.strerror or e}") from None
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = -1
    try:
        fd, seg = _make_segment(size)
        socket.send_fds(sock, [b"S"], [fd, theirs.fileno()])
    except OSError as e:
        sock.close()
        mine.close()
        raise PeerLost(f"could not hand a segment to {address}: {e.strerror or e}") from None
    finally:
        theirs.close()
        if fd >= 0:
            os.close(fd)
    return ShmConnection(seg, dialer=True, bell=sock, space_bell=mine, ring_size=size)


class ShmTransport(Transport):
    scheme = "shm"

    def __init__(self, connect_timeout: float = 60.0, ring_size: int | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.ring_size = ring_size

    async def listen(self, host: str = "") -> Listener:
        ok, why = shm_supported()
        if not ok:
            raise InvalidArgument(f"the shm transport is not available here: {why}")
        return ShmListener(self.ring_size or ring_bytes_from_env())

    async def connect(self, address: str) -> Connection:
        return await connect_shm(address, deadline=anyio.current_time() + self.connect_timeout,
                                 ring_size=self.ring_size)

