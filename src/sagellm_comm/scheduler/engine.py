"""The progress engine: one per process (per simulated rank), driving every connection.

It owns a reader task per peer that parses frames and streams payloads into
posted receives (or scratch), a heartbeat task that keeps idle links warm and
declares silent peers lost, and the failure propagation that turns one rank's
problem into a typed error on every rank: a lost peer fails every receive waiting
on it; an op that fails breaks its group, and a broken group tells its other
members with an `Abort` frame. Engine tasks never raise into the caller's task group:
everything they hit becomes peer or group state that ops observe.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import wire
from ..buffers import DeviceBytes, Pieces, ScratchPool, as_host_bytes, bytes_view
from ..errors import (
    CollectiveAborted,
    CollectiveMismatch,
    CommClosed,
    CommError,
    MessageMismatch,
    PeerLost,
    ProtocolError,
    TransferCancelled,
)
from ..transports.base import Connection
from ..wire import Abort, Bye, Cancel, Data, Fingerprint, Heartbeat
from .matching import Channel, Matcher, Recv, Unexpected
from .ordering import GroupState

log = logging.getLogger("sagellm_comm.engine")

DEVICE_FRAME_BYTES = 64 * 1024 * 1024  # within every receiver's frame limit (wire.DEFAULT_MAX_FRAME_BYTES)
DISCARDED_CHANNELS = 4096  # names of finished transfers whose late frames are dropped (oldest forgotten)

# Control frames (Abort, Cancel, heartbeat, Bye) outrank every data priority (high is 1),
# so a failure reaches peers ahead of queued bulk data instead of behind it.
CONTROL_PRIORITY = 2


@dataclass
class EngineConfig:
    """Knobs with units; every default is overridable from `init_process_group`."""

    heartbeat_interval: float = 1.0  # seconds between heartbeats on an idle link
    heartbeat_timeout: float = 10.0  # seconds of silence after which a peer is lost
    frame_bytes: int = 4 * 1024 * 1024  # payload bytes per data frame
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES  # refuse larger frames unread
    max_message_bytes: int = 64 << 30  # refuse a message announced larger before buffering any of it
    close_timeout: float = 2.0  # seconds to wait for peers' goodbyes on close


class Incoming:
    """A message being read off the wire: where its bytes go (may change on cancel)."""

    __slots__ = ("channel", "fp", "received", "target", "total")

    def __init__(self, channel: Channel, fp: Fingerprint | None, total: int) -> None:
        self.channel = channel
        self.fp = fp
        self.total = total
        self.received = 0
        self.target: Recv | Unexpected | None = None  # None: discard


def _still_target(inc: Incoming, t: Recv) -> Callable[[], bool]:
    return lambda: inc.target is t


class Peer:
    def __init__(self, rank: int, conn: Connection) -> None:
        self.rank = rank
        self.conn = conn
        self.error: PeerLost | None = None
        self.bye: str | None = None
        self.next_mid = 0
        self.incoming: dict[int, Incoming] = {}
        self.reader_done = anyio.Event()

    @property
    def alive(self) -> bool:
        return self.error is None


class Engine:
    """Connections, matching and failure state for one rank of one world."""

    def __init__(self, rank: int, world_size: int, conns: dict[int, Connection],
                 config: EngineConfig | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.config = config or EngineConfig()
        self.peers = {r: Peer(r, c) for r, c in conns.items()}
        for r, c in conns.items():
            c.peer = r
        self.pool = ScratchPool()
        self.matcher = Matcher(self.pool)
        self.groups: dict[str, GroupState] = {}
        self.closed: CommError | None = None
        self.local_host = "127.0.0.1"  # where this rank's peers reach it (device lanes open stores here)
        self._tg: TaskGroup | None = None
        self._sink = memoryview(bytearray(256 * 1024))
        self._claimed: dict[int, Unexpected] = {}  # id(Recv) -> the unexpected it waits on
        self._streaming: dict[int, Incoming] = {}  # id(Recv) -> the message streaming into it
        self._early_aborts: dict[str, tuple[Peer, Abort]] = {}  # for groups not created here yet
        self._said_bye = False  # after our Bye, nothing more is written (the peer half-closed on it)
        self._controls = 0  # control frames (Abort, Cancel) queued but not yet written
        self._controls_idle = anyio.Event()
        self._discarded: OrderedDict[str, None] = OrderedDict()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, tg: TaskGroup) -> None:
        self._tg = tg
        for peer in self.peers.values():
            tg.start_soon(self._reader, peer, name=f"sagellm-comm reader {self.rank}<-{peer.rank}")
        if self.peers:
            tg.start_soon(self._heartbeat, name=f"sagellm-comm heartbeat {self.rank}")

    async def close(self) -> None:
        """Say goodbye to every peer, wait briefly for theirs, then drop the connections."""
        if self.closed is not None:
            return
        self.closed = CommClosed(f"rank {self.rank}'s communicator is closed")
        self._fail_everything(self.closed)
        bye = wire.encode(Bye("closing"))
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.config.close_timeout):
                while self._controls:  # an Abort must reach peers before our Bye does
                    await self._controls_idle.wait()
                self._said_bye = True
                for peer in self.peers.values():
                    if peer.alive:
                        try:
                            await peer.conn.send_frame(bye, priority=CONTROL_PRIORITY)
                            peer.conn.close_write()
                        except PeerLost:
                            pass
                for peer in self.peers.values():  # their end-of-stream: they read all we sent
                    await peer.reader_done.wait()
            for peer in self.peers.values():
                await peer.conn.aclose()

    def abort(self, error: CommError | None = None) -> None:
        """Drop every connection now; peers see this rank as lost."""
        if self.closed is None:
            self.closed = error or CommClosed(f"rank {self.rank}'s communicator was aborted")
            self._fail_everything(self.closed)
        for peer in self.peers.values():
            peer.conn.abort()

    def _fail_everything(self, error: CommError) -> None:
        self.matcher.fail_where(lambda r: error)
        for g in self.groups.values():
            g.break_(error)

    def raise_if_closed(self) -> None:
        if self.closed is not None:
            raise CommClosed(str(self.closed))

    # -- sending -----------------------------------------------------------------------
    def peer(self, rank: int) -> Peer:
        peer = self.peers[rank]
        if peer.error is not None:
            raise PeerLost(str(peer.error), peer=rank)
        return peer

    async def send(self, dst: int, channel: Channel, raw: memoryview | DeviceBytes | Pieces, fp: Fingerprint | None, *,
                   priority: int = 0) -> None:
        """Send one message to global rank `dst`, split into frames of `frame_bytes`.

        Every frame queues for the connection at `priority` (1 high, 0 normal, -1 low);
        the connection is released between frames, so a more urgent message's frames
        get in between a big message's. Cancelled between frames, the receiver is
        told (`Cancel`) so it does not keep waiting for the rest.
        """
        self.raise_if_closed()
        await self._send_message(self.peer(dst), channel, raw, fp, priority)

    async def _send_message(self, peer: Peer, channel: Channel, raw: memoryview | DeviceBytes | Pieces,
                            fp: Fingerprint | None, priority: int) -> None:
        dst = peer.rank
        mid = peer.next_mid
        peer.next_mid += 1
        total = len(raw)
        group, seq, tag = channel
        # device bytes go by DMA, one awaited copy per frame: larger frames amortize that
        frame = self.config.frame_bytes if not isinstance(raw, DeviceBytes) else DEVICE_FRAME_BYTES
        offset = 0
        try:
            while True:
                if offset:  # between frames of one message, a cancellation can land
                    await anyio.lowlevel.checkpoint_if_cancelled()
                n = min(frame, total - offset)
                payload: memoryview | DeviceBytes
                if isinstance(raw, Pieces):
                    payload = raw.window(offset, offset + n)
                    n = len(payload)
                    if raw.watch is not None:
                        raw.watch(offset, offset + n)
                else:
                    payload = raw[offset : offset + n]
                head = wire.encode(Data(mid, offset, total, group, seq, tag, fp if offset == 0 else None), n)
                await peer.conn.send_frame(head, payload, priority=priority)
                offset += n
                if offset >= total:
                    return
        except PeerLost as e:
            self.lose_peer(peer, str(e))
            raise PeerLost(str(peer.error), peer=dst) from None
        except BaseException:
            if 0 < offset < total and peer.alive:
                self._spawn_control(peer, Cancel(mid, "sender cancelled"))
            raise

    def _spawn_control(self, peer: Peer, msg: wire.Message) -> None:
        """Send a control frame in the background; `close` flushes these before its Bye."""
        frame = wire.encode(msg)
        self._spawn_flushed(peer, lambda: peer.conn.send_frame(frame, priority=CONTROL_PRIORITY))

    def notify(self, dst: int, channel: Channel, payload: bytes) -> None:
        """Send a small p2p message in the background, ahead of queued data.

        For what must reach a peer even when the caller is being cancelled (a KV
        transfer telling the other side it gave up); `close` flushes these first.
        """
        peer = self.peers.get(dst)
        if peer is None or self.closed is not None:
            return
        self._spawn_flushed(peer, lambda: self._send_message(peer, channel, memoryview(payload), None,
                                                             CONTROL_PRIORITY))

    def _spawn_flushed(self, peer: Peer, send: Callable[[], Awaitable[None]]) -> None:
        """Run `send()` in the engine's task group, counted so that `close` waits for it before its Bye."""
        if self._tg is None or not peer.alive:
            return
        self._controls += 1
        self._tg.start_soon(self._run_flushed, peer, send)

    async def _run_flushed(self, peer: Peer, send: Callable[[], Awaitable[None]]) -> None:
        try:
            if peer.alive and not self._said_bye:
                with anyio.move_on_after(self.config.heartbeat_timeout):
                    await send()
        except PeerLost as e:
            self.lose_peer(peer, str(e))
        except CommError:
            pass  # we are closing: nobody is left to tell
        finally:
            self._controls -= 1
            if not self._controls:
                self._controls_idle.set()
                self._controls_idle = anyio.Event()

    def discard_channel(self, name: str) -> None:
        """Drop every p2p message of channel group `name`, queued or still to come.

        A transfer that ended (done, failed, cancelled) may still have frames in
        flight; without this they would sit in scratch memory forever.
        """
        self._discarded[name] = None
        while len(self._discarded) > DISCARDED_CHANNELS:
            self._discarded.popitem(last=False)
        self.matcher.drop_unexpected(lambda m: m.channel[0] != name, incomplete=True)
        for peer in self.peers.values():
            for inc in peer.incoming.values():
                if inc.channel[0] == name and isinstance(inc.target, Unexpected):
                    inc.target = None

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn, *args)

    # -- receiving ---------------------------------------------------------------------
    def post(self, src: int, channel: Channel, dest: memoryview | DeviceBytes | Pieces,
             fp: Fingerprint | None) -> Recv:
        """Post a receive for the next message from global rank `src` on `channel`."""
        recv = Recv(src, channel, dest, fp)
        if self.closed is not None:
            recv.fail(self.closed)
            return recv
        if channel[1] >= 0:
            g = self.groups.get(channel[0])
            if g is not None and g.broken is not None:  # its frames are discarded now: fail, don't wait
                recv.fail(g.broken)
                return recv
        peer = self.peers[src]
        msg = self.matcher.peek_unexpected(src, channel)
        if msg is not None:
            err = self._mismatch(recv, msg.total, msg.fp, src)
            if err is not None:
                recv.fail(err)
                return recv
            self.matcher.take_unexpected(src, channel)
            if msg.complete:
                recv.dest[:] = msg.target()
                self.pool.release(msg.block)
                recv.complete()
            else:
                msg.claimed_by = recv
                recv.state = "claiming"
                self._claimed[id(recv)] = msg
            return recv
        if peer.error is not None:
            recv.fail(PeerLost(str(peer.error), peer=src))
            return recv
        self.matcher.post(recv)
        return recv

    def cancel(self, recv: Recv) -> None:
        """Withdraw a receive whose caller stopped waiting; its message is not lost.

        A p2p message already streaming into the caller's buffer is moved to
        scratch (bytes so far copied) and queued first for the next receive; the
        caller's buffer is not written again. A collective's is discarded.
        """
        if recv.finished:
            return
        p2p = recv.channel[1] < 0
        if recv.state == "posted":
            self.matcher.unpost(recv)
        elif recv.state == "streaming":
            inc = self._streaming.pop(id(recv), None)
            if inc is not None:
                if p2p:
                    msg = self.matcher.add_unexpected(recv.src, recv.channel, inc.fp, inc.total, front=True)
                    msg.block[: inc.received] = as_host_bytes(recv.dest[: inc.received])
                    msg.received = inc.received
                    inc.target = msg
                else:
                    inc.target = None
        elif recv.state == "claiming":
            msg = self._claimed.pop(id(recv))
            msg.claimed_by = None
            if p2p:
                self.matcher.requeue_front(msg)
        recv.fail(CommClosed("receive withdrawn by its caller"))
        recv.state = "cancelled"

    def withdraw(self, recv: Recv) -> None:
        """Like `cancel`, for a caller that never saw the result: a p2p message that landed
        in full just as its caller gave up goes to the next receive instead of being lost.

        The caller sees its cancellation and may reuse the buffer, so the bytes are
        copied out first; a receive already waiting for the same (source, tag) gets
        them at once, otherwise they wait first in line.
        """
        if not (recv.finished and recv.state == "done" and recv.channel[1] < 0):
            self.cancel(recv)
            return
        recv.state = "cancelled"
        if recv.channel[0] in self._discarded:
            return  # an ended KV transfer: nobody will ask for this again
        landed = as_host_bytes(recv.dest[: recv.total])
        waiting = self.matcher.match_posted(recv.src, recv.channel)
        if waiting is not None:
            err = self._mismatch(waiting, recv.total, recv.fp, recv.src)
            if err is None:
                waiting.dest[:] = landed
                waiting.complete()
                return
            waiting.fail(err)  # as when it is posted behind a message it cannot hold
        msg = self.matcher.add_unexpected(recv.src, recv.channel, recv.fp, recv.total, front=True)
        bytes_view(msg.block)[: recv.total] = landed
        msg.received = recv.total
        msg.complete = True

    def _mismatch(self, recv: Recv, total: int, fp: Fingerprint | None, src: int) -> CommError | None:
        """Why the message (total bytes, fingerprint) cannot land in `recv`, or None."""
        if recv.channel[1] >= 0:  # collectives: the fingerprint was checked at claim time
            if total != recv.total:
                return CollectiveMismatch(
                    f"rank {src} sent {total} bytes for {recv.fp.describe() if recv.fp else recv.channel}, "
                    f"rank {self.rank} expected {recv.total}")
            return None
        theirs = fp.dtype if fp is not None else "?"
        mine = recv.fp.dtype if recv.fp is not None else theirs
        if total != recv.total or theirs != mine:
            return MessageMismatch(
                f"message from rank {src} with tag {recv.channel[2]} has {total} bytes of {theirs}, "
                f"but the buffer posted to receive it holds {recv.total} bytes of {mine}; "
                "the message is kept for a receive with a matching buffer")
        return None

    def _claim(self, src: int, d: Data) -> Incoming:
        """Decide where the message starting with frame `d` goes."""
        channel = (d.group, d.seq, d.tag)
        inc = Incoming(channel, d.fp, d.total)
        if d.group in self._discarded:
            return inc  # a frame of a transfer that has ended: dropped
        if d.seq >= 0:
            g = self.groups.get(d.group)
            if g is not None:
                if g.is_stale(d.seq):
                    return inc  # discard
                mine = g.active.get(d.seq)
                if mine is not None and d.fp is not None and d.fp != mine:
                    self.fail_group(g, g.mismatch_error(mine, d.fp, g.members.index(src)), notify=True,
                                    cause="mismatch")
                    return inc
        recv = self.matcher.match_posted(src, channel)
        if recv is not None:
            err = self._mismatch(recv, d.total, d.fp, src)
            if err is None:
                recv.state = "streaming"
                inc.target = recv
                self._streaming[id(recv)] = inc
                return inc
            recv.fail(err)
            if d.seq >= 0:
                g = self.groups.get(d.group)
                if g is not None:
                    self.fail_group(g, err, notify=True, cause="mismatch")
                return inc
        if d.total > self.config.max_message_bytes:
            raise ProtocolError(f"rank {src} announced a message of {d.total} bytes, over the limit of "
                                f"{self.config.max_message_bytes} (EngineConfig.max_message_bytes)")
        try:
            inc.target = self.matcher.add_unexpected(src, channel, d.fp, d.total)
        except (MemoryError, ValueError, OverflowError) as e:
            raise ProtocolError(f"rank {src} announced a message of {d.total} bytes that cannot be "
                                f"buffered here: {e!r}") from None
        return inc

    def _finish(self, inc: Incoming) -> None:
        t = inc.target
        if isinstance(t, Recv):
            self._streaming.pop(id(t), None)
            t.complete()
        elif isinstance(t, Unexpected):
            t.complete = True
            claimer = t.claimed_by
            if claimer is not None:
                self._claimed.pop(id(claimer), None)
                claimer.dest[:] = t.target()
                self.pool.release(t.block)
                claimer.complete()
            elif self._stale(t.channel):
                self.matcher.remove_unexpected(t)

    def _stale(self, channel: Channel) -> bool:
        if channel[1] < 0:
            return False
        g = self.groups.get(channel[0])
        return g is not None and g.is_stale(channel[1])

    async def _reader(self, peer: Peer) -> None:
        conn = peer.conn
        limit = self.config.max_frame_bytes
        try:
            while True:
                prefix = await conn.recv_exactly(wire.PREFIX_SIZE)
                hlen, plen = wire.parse_prefix(prefix, max_header=wire.MAX_HEADER_BYTES, max_payload=limit)
                msg = wire.decode(await conn.recv_exactly(hlen))
                if isinstance(msg, Data):
                    await self._on_data(peer, msg, plen)
                elif plen:
                    raise ProtocolError(f"{type(msg).__name__} frame carries a payload")
                elif isinstance(msg, Heartbeat):
                    pass
                elif isinstance(msg, Abort):
                    self._on_abort(peer, msg)
                elif isinstance(msg, Cancel):
                    self._on_cancel(peer, msg)
                elif isinstance(msg, Bye):
                    peer.bye = msg.reason or "closing"
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} frame after the handshake")
        except PeerLost as e:
            why = "it closed its communicator" if peer.bye is not None else str(e)
            self.lose_peer(peer, why)
        except ProtocolError as e:
            log.warning("rank %d: dropping rank %d: %s", self.rank, peer.rank, e)
            self.lose_peer(peer, f"it sent a malformed frame ({e})")
        except Exception as e:  # a bug here must not hang every op: fail loudly instead
            log.exception("rank %d: reader for rank %d crashed", self.rank, peer.rank)
            self.lose_peer(peer, f"internal error while reading: {e!r}")
        finally:
            peer.reader_done.set()

    async def _on_data(self, peer: Peer, d: Data, plen: int) -> None:
        if d.offset + plen > d.total or d.offset < 0:
            raise ProtocolError(f"data frame at offset {d.offset} with {plen} bytes overruns its message of {d.total}")
        if d.offset == 0:
            if d.mid in peer.incoming:
                raise ProtocolError(f"message {d.mid} started twice")
            inc = self._claim(peer.rank, d)
            # tracked even when this one frame is the whole message: if the peer is lost while
            # its payload is still being read, lose_peer must find and fail whoever waits on it
            peer.incoming[d.mid] = inc
        else:
            got = peer.incoming.get(d.mid)
            if got is None or got.received != d.offset:
                raise ProtocolError(f"data frame for unknown message {d.mid} or out of order")
            inc = got
        conn = peer.conn
        end = d.offset + plen
        while inc.received < end:
            t = inc.target
            want = end - inc.received
            if t is None:
                view = self._sink[: min(want, len(self._sink))]
            elif isinstance(t, Recv):
                dest = t.dest
                view = dest.window(inc.received, end) if isinstance(dest, Pieces) else dest[inc.received : end]
            else:
                view = bytes_view(t.block)[inc.received : end]
            # a read that must wait gives up (0) if the receive is withdrawn meanwhile: the
            # caller may reuse its buffer at once, so nothing may land there after the cancel
            n = await conn.recv_some_into(view, _still_target(inc, t) if isinstance(t, Recv) else None)
            if n == 0:
                continue
            if inc.target is not t:
                # withdrawn while a copy into it was already committed (a device copy, a UCX
                # receive): carry those bytes over to wherever the message goes now
                moved = inc.target
                if isinstance(moved, Unexpected):
                    bytes_view(moved.block)[inc.received : inc.received + n] = as_host_bytes(view[:n])
            inc.received += n
            if isinstance(view, memoryview) and isinstance(t, Recv) and inc.target is t:
                dest = t.dest
                if isinstance(dest, Pieces) and dest.watch is not None:
                    dest.watch(inc.received - n, inc.received)
        if end == d.total:
            peer.incoming.pop(d.mid, None)
            self._finish(inc)

    def _on_cancel(self, peer: Peer, c: Cancel) -> None:
        inc = peer.incoming.pop(c.mid, None)
        if inc is None:
            return
        err = TransferCancelled(
            f"rank {peer.rank} cancelled its message (tag {inc.channel[2]}) after sending "
            f"{inc.received} of {inc.total} bytes: {c.reason}")
        self._fail_incoming(inc, err)

    def _fail_incoming(self, inc: Incoming, err: CommError) -> None:
        """Message `inc` will never complete: fail whoever waits on it, free its scratch."""
        t = inc.target
        if isinstance(t, Recv):
            self._streaming.pop(id(t), None)
            t.fail(err)
        elif isinstance(t, Unexpected):
            if t.claimed_by is not None:
                self._claimed.pop(id(t.claimed_by), None)
                t.claimed_by.fail(err)
            self.matcher.remove_unexpected(t)
        inc.target = None

    def register_group(self, g: GroupState) -> None:
        """Start tracking group `g`; an Abort that arrived before it existed here applies now."""
        self.groups[g.group_id] = g
        early = self._early_aborts.pop(g.group_id, None)
        if early is not None:
            self._on_abort(*early)

    def _on_abort(self, peer: Peer, a: Abort) -> None:
        g = self.groups.get(a.group)
        if g is None:  # a peer got ahead of us: remember, apply when the group is created
            self._early_aborts.setdefault(a.group, (peer, a))
            return
        who = g.members.index(peer.rank) if peer.rank in g.members else peer.rank
        err: CommError
        if a.cause == "mismatch":
            err = CollectiveMismatch(a.reason)
        elif a.cause == "peer_lost":
            err = PeerLost(f"{a.reason} (reported by rank {who})", peer=a.peer if a.peer >= 0 else None)
        else:
            err = CollectiveAborted(f"collective #{a.seq} of group {a.group!r} was aborted by rank {who}: {a.reason}")
        self.fail_group(g, err, notify=False)

    # -- failure propagation ------------------------------------------------------------
    def lose_peer(self, peer: Peer, why: str) -> None:
        """Peer `peer` is gone: fail what waits on it; keep what it delivered.

        Groups are not broken here. Messages that fully arrived before the peer
        left (it may have finished its part and closed) still satisfy receives;
        an op that needs more from it fails when it posts that receive or sends
        to it, and that op's failure breaks its group and tells the other members.
        """
        if peer.error is not None:
            return
        peer.error = PeerLost(f"rank {peer.rank} is gone: {why}", peer=peer.rank)
        peer.conn.abort()
        err = peer.error
        self.matcher.fail_where(lambda r: err if r.src == peer.rank else None)
        for inc in peer.incoming.values():
            self._fail_incoming(inc, err)
        peer.incoming.clear()

    def fail_group(self, g: GroupState, error: CommError, *, notify: bool, cause: str = "aborted",
                   peer: int = -1, seq: int = -1) -> None:
        """Break group `g` with `error`; if `notify`, tell its other members why."""
        if not g.break_(error):
            return
        gid = g.group_id
        self.matcher.fail_where(lambda r: error if r.channel[0] == gid and r.channel[1] >= 0 else None)
        for rid, msg in list(self._claimed.items()):
            if msg.channel[0] == gid and msg.channel[1] >= 0 and msg.claimed_by is not None:
                msg.claimed_by.fail(error)
                msg.claimed_by = None
                del self._claimed[rid]
        self.matcher.drop_unexpected(lambda m: not (m.channel[0] == gid and m.channel[1] >= 0))
        if notify and self.closed is None:
            if seq < 0:
                seq = min(g.active, default=g.next_seq)
            for member in g.members:
                p = self.peers.get(member)
                if p is not None and p.alive:
                    self._spawn_control(p, Abort(gid, seq, str(error), cause, peer))

    def live_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive]

    # -- heartbeats ----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Keep idle links warm; declare a peer lost after `heartbeat_timeout` of silence.

        If this loop itself was blocked (a tick arrives late), silence is forgiven for
        that tick: the peers may well have talked, unread, while we were not running.
        """
        cfg = self.config
        beat = wire.encode(Heartbeat())
        interval = min(cfg.heartbeat_interval, cfg.heartbeat_timeout / 3)
        last_tick = time.monotonic()
        while self.closed is None:
            await anyio.sleep(interval)
            now = time.monotonic()
            late = now - last_tick > 2 * interval + 0.5
            last_tick = now
            for peer in self.live_peers():
                conn = peer.conn
                if late:
                    conn.last_receive = max(conn.last_receive, now - interval)
                silent = now - conn.last_receive
                if silent > cfg.heartbeat_timeout and math.isfinite(cfg.heartbeat_timeout):
                    self.lose_peer(peer, f"no frame for {silent:.1f} s (heartbeat timeout "
                                         f"{cfg.heartbeat_timeout:g} s): frozen, unreachable or overloaded")
                elif now - conn.last_send >= interval and not conn.sending:
                    self._spawn(self._send_raw_control, peer, beat)

    async def _send_raw_control(self, peer: Peer, frame: bytes) -> None:
        if not peer.alive or peer.conn.sending or self._said_bye:
            return
        try:
            await peer.conn.send_frame(frame, priority=CONTROL_PRIORITY)
        except PeerLost as e:
            self.lose_peer(peer, str(e))
