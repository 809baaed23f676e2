"""`ucx://`: UCX tag messages through ucxx (shared memory on one host; RDMA or TCP across hosts).

Endpoints come from exchanged *worker addresses*, not from ucxx's listener: that path
forces a socket-based connection manager that keeps UCX off shared memory. Such
endpoints have no accept notification, so accept is emulated. A listener is a random
56-bit id plus the process worker's address (`ucx://<listen-id>/<urlsafe-base64
address>`); the dialer sends a connect request, tagged from the listen id, carrying
its own worker address and a fresh connection id, and the acceptor makes an endpoint
back. All tags derive from these ids, so any number of listeners and connections
(several simulated worlds) share the process's one worker. UCX aborts the process on
some malformed worker addresses: requests carry a digest, so corrupt ones are
dropped, but addresses must come from the rendezvous, not from strangers.

Framing: a part of at least `DIRECT_READ_MIN` bytes is a message of its own (split at
`MAX_MESSAGE`); smaller parts are joined. The reader probes a message's length
before posting its receive, so a message that fits the caller's view lands there
directly (rendezvous sizes: no copy); a bigger one is received into a buffer and
handed out piece by piece. Messages that arrive while nobody reads are taken into
such buffers too, up to `RECV_BUFFER`, so writers make progress as on a socket. An
empty message on the data tag is end of stream, ordered after the data; an empty
message on the "gone" tag means the peer stopped reading (abort, close); it is not
ordered with the data, so a writer sees it without reading.

Progress: the worker runs in blocking mode. One waiting task (the driver) polls for
`SAGELLM_COMM_UCX_SPIN_US`, then sleeps on the worker's epoll fd through
`anyio.wait_readable`, so this runs on asyncio and trio and an idle process uses no
CPU; other waiters sleep on an event the driver sets after each progress call. The
driver also wakes every `TICK` to run UCX keepalive, which is how a dead peer process
is noticed: endpoints use UCX peer error handling, which shared memory supports only
through `MM_ERROR_HANDLING` (and then copies rendezvous data through shared-memory
fragments instead of reading it with CMA).

Limits: one event loop at a time per process. Taking messages ahead of the reader
happens only while some task of the process waits on the transport; messages below
UCX's rendezvous threshold (8 KiB) are buffered by UCX itself, without a bound. A
killed peer is noticed about a second after its process is gone (a zombie not yet
reaped still counts as alive). A receive already landing in a caller's buffer is not
stopped by `abort`: the buffer is kept alive, but may still be written after PeerLost.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import secrets
import socket
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from ..errors import CommTimeout, InvalidArgument, PeerLost, ProtocolError
from .base import DIRECT_READ_MIN, Connection, Listener, Transport, Wanted, connected_pair

log = logging.getLogger("sagellm_comm.ucx")

NEEDS_UCXX = "the ucx transport needs ucxx: pip install 'sagellm-comm[ucx]' (ucxx-cu12 or ucxx-cu13)"
MAX_MESSAGE = 64 * 1024 * 1024  # larger parts are split, so a reader never buffers more at once
RECV_BUFFER = 4 * 1024 * 1024  # per connection: what is taken off UCX while nobody reads
MAX_REQUEST = 16 * 1024  # a connect request: header, peer name, worker address
TICK = 0.5  # seconds a driver sleeps at most: keepalive only runs inside progress calls
DEFAULT_SPIN_US = 50.0  # a driver polls this long before sleeping: a wake-up costs ~30 us here
SETUP_TIMEOUT = 5.0  # seconds an announced connect request may take to arrive
# Unless the user set them: peer error handling on shared memory (off by default
# there) and keepalive often enough to notice a dead peer within about a second.
UCX_DEFAULTS = {"MM_ERROR_HANDLING": "y", "KEEPALIVE_INTERVAL": "1s"}

# a tag's low byte; the other 56 bits are a listen id or a connection id
DATA_TO_ACCEPTOR, DATA_TO_DIALER, GONE_TO_ACCEPTOR, GONE_TO_DIALER, CONNECT = 1, 2, 3, 4, 5
REQUEST = struct.Struct("<8s8sQH")  # magic, digest of the rest, connection id, name length
REQUEST_MAGIC = b"sgcucx01"


def _ucxx() -> tuple[Any, Any]:
    """(ucxx's low-level module, its Array class), imported on first use only."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE on import
    try:
        api = importlib.import_module("ucxx._lib.libucxx")
        arr = importlib.import_module("ucxx._lib.arr")
    except ImportError as e:
        raise InvalidArgument(NEEDS_UCXX) from e
    except Exception as e:  # installed, but its libraries failed to load
        raise InvalidArgument(f"{NEEDS_UCXX}; importing it failed: {e!r}") from e
    return api, arr.Array


def ucx_available() -> tuple[bool, str]:
    """Whether this process can use the transport, and why not."""
    try:
        _ucxx()
    except InvalidArgument as e:
        return False, str(e)
    return True, ""


# -- the worker and who drives it ---------------------------------------------------------
@dataclass
class _Pump:
    """Who drives the worker within one event loop run."""

    driving: bool = False
    progressed: anyio.Event | None = None
    wake: anyio.CancelScope | None = None


_PUMP: anyio.lowlevel.RunVar[_Pump] = anyio.lowlevel.RunVar("sagellm_comm_ucx_pump")


def _notify(pump: _Pump) -> None:
    ev, pump.progressed = pump.progressed, None
    if ev is not None:
        ev.set()


@dataclass
class _Linger:
    """A request nobody waits for any more; `keep` holds its memory alive until it completes."""

    request: Any
    keep: Any = None
    then: Callable[[], None] | None = None


class _Worker:
    """The process's one UCX worker; requests complete only while someone calls `progress`."""

    def __init__(self) -> None:
        self.api, self.array = _ucxx()
        options = {k: v for k, v in UCX_DEFAULTS.items() if f"UCX_{k}" not in os.environ}
        self.ctx = self.api.UCXContext(options, feature_flags=(self.api.Feature.TAG, self.api.Feature.WAKEUP))
        self.worker = self.api.UCXWorker(self.ctx)
        self.worker.init_blocking_progress_mode()
        self.fd: int = self.worker.epoll_file_descriptor
        self.address: bytes = bytes(self.worker.address)
        self.pid = os.getpid()
        self.spin = float(os.environ.get("SAGELLM_COMM_UCX_SPIN_US", DEFAULT_SPIN_US)) * 1e-6
        self.lingering: list[_Linger] = []
        self.connections: weakref.WeakSet[UcxConnection] = weakref.WeakSet()

    def tag(self, ident: int, kind: int) -> Any:
        return self.api.UCXXTag((ident << 8) | kind)

    def probe(self, tag: Any, remove: bool = False) -> Any:
        return self.worker.tag_probe(tag, remove=remove)

    def receive(self, probe: Any, buf: Any) -> tuple[Any, Any]:
        """Receive the message that `probe` removed from UCX's queue into `buf`: (request, Array)."""
        arr = self.array(buf)
        return self.worker.tag_recv_with_handle(arr, probe), arr

    def discard(self, probe: Any) -> None:
        """Drop a removed message: a truncated receive still completes its sender."""
        req, arr = self.receive(probe, bytearray(min(probe.length, 64)))
        self.linger(req, arr)

    def linger(self, request: Any, keep: Any = None, then: Callable[[], None] | None = None) -> None:
        self.lingering.append(_Linger(request, keep, then))
        self._reap()

    def _reap(self) -> None:
        done: list[_Linger] = []
        still: list[_Linger] = []
        for x in self.lingering:
            (done if x.request.completed else still).append(x)
        self.lingering = still
        for x in done:
            if x.then is not None:
                try:
                    x.then()
                except Exception:  # cleanup of a connection nobody uses any more
                    log.debug("ucx: deferred cleanup failed", exc_info=True)

    def progress(self) -> None:
        self.worker.progress()
        if self.lingering:
            self._reap()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Return once `ready()` holds, driving the worker while no other task does.

        anyio lets one task at a time wait on an fd, hence one driver. Cancellable
        anywhere: nothing is consumed while waiting, and a cancelled driver hands
        its role to the next waiter.
        """
        pump = _PUMP.get(None)
        if pump is None:
            pump = _Pump()
            _PUMP.set(pump)
        while True:
            self.progress()
            if ready():
                return
            if not pump.driving:
                break
            if pump.progressed is None:
                pump.progressed = anyio.Event()
            await pump.progressed.wait()
        pump.driving = True
        spin_until = time.perf_counter() + self.spin
        try:
            while True:
                queued = self._prefetch()
                _notify(pump)
                if ready():
                    return
                # arm() is False while events are pending
                if queued or time.perf_counter() < spin_until or not self.worker.arm():
                    await anyio.lowlevel.checkpoint()
                else:
                    with anyio.move_on_after(TICK) as pump.wake:
                        await anyio.wait_readable(self.fd)
                    pump.wake = None
                self.progress()
        finally:
            pump.driving = False
            pump.wake = None
            _notify(pump)

    def _prefetch(self) -> bool:
        queued = False
        for conn in list(self.connections):
            if not conn._reading and conn._prefetch():
                queued = True
        return queued

    def poke(self) -> None:
        """Make every waiter look again, after a change that the worker's fd does not report."""
        try:
            pump = _PUMP.get(None)
        except RuntimeError:  # outside any event loop: nobody can be waiting
            return
        if pump is not None:
            if pump.wake is not None:
                pump.wake.cancel()
            _notify(pump)


_workers: dict[int, _Worker] = {}  # by pid: a forked child must not use, nor destroy, its parent's


def _worker() -> _Worker:
    w = _workers.get(os.getpid())
    if w is None:
        w = _workers[os.getpid()] = _Worker()
    return w


# -- connections ------------------------------------------------------------------------
def _messages(parts: list[memoryview]) -> Iterator[memoryview | bytes]:
    """The messages that carry `parts`: large parts alone (they can land in place), small ones joined."""
    small: list[memoryview] = []
    for part in parts:
        if len(part) < DIRECT_READ_MIN:
            if len(part):
                small.append(part)
            continue
        if small:
            yield small[0] if len(small) == 1 else b"".join(small)
            small = []
        for off in range(0, len(part), MAX_MESSAGE):
            yield part[off : off + MAX_MESSAGE]
    if small:
        yield small[0] if len(small) == 1 else b"".join(small)


@dataclass(eq=False)
class _Incoming:
    """A message taken off UCX ahead of the reader; `request` is None once it has landed."""

    request: Any
    array: Any
    data: memoryview


_IN_FLIGHT = memoryview(b"")  # `_send_now` left nothing to post, but sends still to complete


def _on_endpoint_error(ref: weakref.ref[UcxConnection]) -> None:
    conn = ref()
    if conn is not None and not conn._closed:
        conn._broken = "broke: the peer process died or became unreachable"


class UcxConnection(Connection):
    """A byte stream over one UCX endpoint and a pair of tags; one reading task at a time."""

    transport = "ucx"

    def __init__(self, w: _Worker, ep: Any, cid: int, *, dialer: bool, peer: str, loopback: bool) -> None:
        super().__init__()
        self._w = w
        self._ep = ep
        self._peer = peer
        self._loopback = loopback  # sends to our own worker raise no fd event: wake readers ourselves
        mine, theirs = (DATA_TO_ACCEPTOR, DATA_TO_DIALER) if dialer else (DATA_TO_DIALER, DATA_TO_ACCEPTOR)
        self._send_tag, self._recv_tag = w.tag(cid, mine), w.tag(cid, theirs)
        mine, theirs = (GONE_TO_ACCEPTOR, GONE_TO_DIALER) if dialer else (GONE_TO_DIALER, GONE_TO_ACCEPTOR)
        self._gone_out, self._gone_in = w.tag(cid, mine), w.tag(cid, theirs)
        self._sending: deque[tuple[Any, Any]] = deque()  # (request, Array) of sends not yet complete
        self._ahead: deque[_Incoming] = deque()
        self._ahead_bytes = 0
        self._reading = False
        self._eof_queued = False
        self._eof = False
        self._write_closed = False
        self._closed = False
        self._goodbye: Any = None  # the request carrying our "gone" marker
        self._broken: str | None = None  # why the peer can no longer be reached
        ep.set_close_callback(_on_endpoint_error, cb_args=(weakref.ref(self),))
        w.connections.add(self)

    def describe(self) -> str:
        return f"ucx {self._peer}"

    def _gone(self) -> str | None:
        """Why nothing more can be exchanged with the peer, or None while it can."""
        if self._closed:
            return "was aborted"
        if self._broken is None:
            probe = self._w.probe(self._gone_in, remove=True)
            if probe.matched:
                self._w.discard(probe)
                self._broken = "was closed by the peer"
        return self._broken

    def _lost(self, why: str) -> PeerLost:
        return PeerLost(f"ucx connection to {self._peer} {why}")

    def _check(self, req: Any, doing: str) -> None:
        try:
            req.check_error()
        except Exception as e:
            raise self._lost(f"broke while {doing}: {e}") from None

    # -- writing ---------------------------------------------------------------------
    def _post(self, msg: memoryview | bytes, tag: Any) -> tuple[Any, Any]:
        arr = self._w.array(msg)
        return self._ep.tag_send(arr, tag), arr

    def _settled(self) -> bool:
        """Whether every send has completed; PeerLost for one that failed."""
        while self._sending and self._sending[0][0].completed:
            self._check(self._sending.popleft()[0], "sending")
        return not self._sending

    def _send_now(self, parts: list[memoryview]) -> list[memoryview]:
        why = "is closed for writing" if self._write_closed else self._gone()
        if why:
            raise self._lost(why)
        self._sending.extend(self._post(m, self._send_tag) for m in _messages(parts))
        if self._loopback:
            self._w.poke()
        return [] if self._settled() else [_IN_FLIGHT]

    async def _send_parts(self, parts: list[memoryview]) -> None:
        if any(len(p) for p in parts):  # not just `_IN_FLIGHT`
            self._send_now(parts)
        if self._settled():
            return
        await self._w.wait_until(lambda: self._settled() or self._gone() is not None)
        if not self._settled():  # the peer is gone: its memory stays ours until UCX lets go
            for req, arr in self._sending:
                self._w.linger(req, arr)
            self._sending.clear()
            raise self._lost(self._gone() or "broke while sending")

    # -- reading ---------------------------------------------------------------------
    def _readable(self) -> bool:
        return self._w.probe(self._recv_tag).matched or self._gone() is not None

    async def _recv_some(self, view: memoryview, wanted: Wanted | None = None) -> int:
        self._reading = True
        try:
            while True:
                if self._ahead:
                    n = await self._from_ahead(view)
                elif self._closed:
                    raise self._lost("was aborted")
                elif self._eof:
                    raise self._lost("was closed by the peer")
                elif (probe := self._w.probe(self._recv_tag, remove=True)).matched:
                    n = await self._take(probe, view)
                elif why := self._gone():
                    raise self._lost(why)
                else:
                    await self._w.wait_until(self._readable)
                    if wanted is not None and not wanted():
                        return 0
                    continue
                if n:
                    return n
        finally:
            self._reading = False

    async def _take(self, probe: Any, view: memoryview) -> int:
        """Receive the probed message into `view` if it fits (returns its size), else queue it (0)."""
        n = probe.length
        if n > len(view):
            self._queue(probe)
            return 0
        req, arr = self._w.receive(probe, view[:n])
        if not req.completed:
            # Committed to the caller's memory: finish even if the caller is cancelled,
            # or these bytes would be lost from the stream.
            with anyio.CancelScope(shield=True):
                await self._w.wait_until(lambda: req.completed or self._closed or self._broken is not None)
            if not req.completed:
                self._w.linger(req, arr)
                raise self._lost(self._gone() or "broke while receiving")
        self._check(req, "receiving")
        self._eof = n == 0
        return int(n)

    def _queue(self, probe: Any) -> None:
        """Receive the message `probe` removed into a buffer of ours, behind what is queued."""
        n = probe.length
        if n > MAX_MESSAGE:
            self._w.discard(probe)
            raise ProtocolError(f"ucx message of {n} bytes from {self._peer} exceeds {MAX_MESSAGE}")
        buf = memoryview(bytearray(n))
        req, arr = self._w.receive(probe, buf)
        self._ahead.append(_Incoming(req, arr, buf))
        self._ahead_bytes += n

    def _prefetch(self) -> bool:
        """Queue what arrived while nobody reads, up to RECV_BUFFER: a socket's receive buffer.

        Without it, a writer of a rendezvous-sized message would wait until the reader
        asks for it, and "send, then read the answer" in one task would deadlock.
        """
        queued = False
        while not (self._reading or self._closed or self._eof_queued):
            probe = self._w.probe(self._recv_tag)
            if not probe.matched or probe.length > RECV_BUFFER - self._ahead_bytes:
                break
            self._eof_queued = probe.length == 0
            self._queue(self._w.probe(self._recv_tag, remove=True))
            queued = True
        return queued

    async def _from_ahead(self, view: memoryview) -> int:
        item = self._ahead[0]
        if item.request is not None:
            req = item.request
            if not req.completed:  # cancellable: the message stays queued for the next read
                await self._w.wait_until(lambda: req.completed or self._closed or self._broken is not None)
                if not req.completed:
                    raise self._lost(self._gone() or "broke while receiving")
            self._check(req, "receiving")
            item.request = item.array = None
        if not item.data:  # only end of stream is empty: data leaves the queue once drained
            self._ahead.popleft()
            self._eof = True
            return 0
        n = min(len(view), len(item.data))
        view[:n] = item.data[:n]
        item.data = item.data[n:]
        self._ahead_bytes -= n
        if not item.data:
            self._ahead.popleft()
        return n

    # -- closing ---------------------------------------------------------------------
    def _signal(self, tag: Any, then: Callable[[], None] | None = None) -> Any:
        """Send an empty marker that nobody waits for; `then` runs once it is out."""
        try:
            req, arr = self._post(b"", tag)
        except Exception:  # the endpoint already failed: nobody left to tell
            if then is not None:
                then()
            return None
        self._w.linger(req, arr, then)
        if self._loopback:
            self._w.poke()
        return req

    def close_write(self) -> None:
        if not (self._write_closed or self._closed):
            self._write_closed = True
            self._signal(self._send_tag)  # empty data message: end of stream, after all data

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._w.connections.discard(self)
        # The endpoint closes once "gone" is out: closing it first could cancel the marker.
        self._goodbye = self._signal(self._gone_out, then=self._ep.close_blocking)
        self._w.poke()

    async def aclose(self) -> None:
        if self._closed:
            return
        self.close_write()
        self.abort()
        goodbye = self._goodbye
        if goodbye is not None:  # let the goodbye out before this process may exit
            with anyio.move_on_after(1.0, shield=True):
                await self._w.wait_until(lambda: goodbye.completed)


# -- listening and connecting -------------------------------------------------------------
def _digest(cid: int, rest: bytes) -> bytes:
    return hashlib.blake2b(cid.to_bytes(8, "little") + rest, digest_size=8).digest()


class UcxListener(Listener):
    """Accepts connect requests sent to this listen id; malformed ones are dropped and counted."""

    def __init__(self, w: _Worker) -> None:
        self._w = w
        self._lid = secrets.randbits(56)
        self._tag = w.tag(self._lid, CONNECT)
        addr = base64.urlsafe_b64encode(w.address).rstrip(b"=").decode()
        self.address = f"ucx://{self._lid:014x}/{addr}"
        self._closed = False
        self.dropped = 0

    async def accept(self) -> Connection:
        w = self._w
        while True:
            if self._closed:
                raise PeerLost("ucx listener closed")
            probe = w.probe(self._tag, remove=True)
            if not probe.matched:
                await w.wait_until(lambda: self._closed or w.probe(self._tag).matched)
                continue
            conn = await self._from_request(probe)
            if isinstance(conn, UcxConnection):
                return conn
            self.dropped += 1
            log.warning("ucx listener %x: dropped a connect request: %s", self._lid, conn)

    async def _from_request(self, probe: Any) -> UcxConnection | str:
        """The connection a request asks for, or why the request was refused."""
        w = self._w
        if not REQUEST.size < probe.length <= MAX_REQUEST:
            w.discard(probe)
            return f"{probe.length} bytes"
        buf = bytearray(probe.length)
        req, arr = w.receive(probe, buf)
        with anyio.CancelScope(shield=True), anyio.move_on_after(SETUP_TIMEOUT):
            await w.wait_until(lambda: req.completed)
        if not req.completed:
            w.linger(req, arr)
            return "it did not arrive in time"
        magic, digest, cid, name_len = REQUEST.unpack_from(buf)
        rest = bytes(buf[REQUEST.size :])
        if magic != REQUEST_MAGIC or digest != _digest(cid, rest) or not 0 < name_len < len(rest):
            return "bad magic, digest or lengths"
        name, address = rest[:name_len].decode(errors="replace"), rest[name_len:]
        try:
            ep = w.worker.create_endpoint_from_worker_address(w.api.UCXAddress.create_from_buffer(address), True)
        except Exception as e:
            return f"no endpoint to {name}: {e}"
        return UcxConnection(w, ep, cid, dialer=False, peer=name, loopback=address == w.address)

    async def aclose(self) -> None:
        self._closed = True
        self._w.poke()


def parse_address(address: str) -> tuple[int, bytes]:
    """'ucx://<listen-id>/<base64 worker address>' -> (listen id, worker address)."""
    lid, sep, addr = address.removeprefix("ucx://").partition("/")
    try:
        if not sep or not 0 < len(lid) <= 14:
            raise ValueError
        ident = int(lid, 16)
        raw = base64.urlsafe_b64decode(addr + "=" * (-len(addr) % 4))
        if not 0 < len(raw) <= MAX_REQUEST // 2:
            raise ValueError
    except ValueError:
        raise InvalidArgument(f"expected ucx://<listen-id>/<worker address>, got {address[:80]!r}") from None
    return ident, raw


class UcxTransport(Transport):
    scheme = "ucx"

    def __init__(self, connect_timeout: float = 60.0) -> None:
        _ucxx()  # fail here, naming the fix, when ucxx is missing
        self.connect_timeout = connect_timeout

    async def listen(self, host: str) -> Listener:
        """`host` is unused: a worker address already names every way to reach this process."""
        return UcxListener(_worker())

    async def connect(self, address: str) -> Connection:
        lid, raw = parse_address(address)
        w = _worker()
        try:
            ep = w.worker.create_endpoint_from_worker_address(w.api.UCXAddress.create_from_buffer(raw), True)
        except Exception as e:
            raise CommTimeout(f"could not reach {address[:40]}...: {e}") from None
        cid = secrets.randbits(56)
        conn = UcxConnection(w, ep, cid, dialer=True, peer=f"listener {lid:x}", loopback=raw == w.address)
        name = f"{socket.gethostname()}:{os.getpid()}".encode()[:255]
        rest = name + w.address
        request = REQUEST.pack(REQUEST_MAGIC, _digest(cid, rest), cid, len(name)) + rest
        req, arr = conn._post(request, w.tag(lid, CONNECT))
        w.poke()
        with anyio.move_on_after(self.connect_timeout):
            await w.wait_until(lambda: req.completed or conn._broken is not None)
        if not req.completed or conn._broken is not None:
            w.linger(req, arr)
            conn.abort()
            raise CommTimeout(f"could not connect to {address[:40]}...: {conn._broken or 'no answer'}")
        return conn


def ucx_pair() -> AbstractAsyncContextManager[tuple[Connection, Connection]]:
    """(dialer end, acceptor end) of one connection inside this process; both aborted on exit."""
    return connected_pair(UcxTransport(), "")
