"""Matching incoming messages to posted receives, without copies when possible.

A message is named by (source rank, channel) where a channel is (group, seq, tag):
collectives use their sequence number, point-to-point messages use seq -1 and the
user's tag. Per name, posted receives and arrived-but-unclaimed ("unexpected")
messages queue in FIFO order, which gives MPI's non-overtaking rule for p2p.

A message whose receive is already posted streams straight into the caller's
memory. An unexpected one streams into a reused scratch block and is copied once
when its receive is posted. A receive cancelled while its message is streaming
into it is turned back into an unexpected message (the bytes already received are
copied out first), so nothing delivered is lost and the caller's buffer is never
written after the cancellation.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import numpy as np

from ..buffers import ScratchPool, bytes_view
from ..wire import Fingerprint

Channel = tuple[str, int, int]  # (group id, seq or -1 for p2p, tag)


class Unexpected:
    """A message that arrived before its receive was posted; owns a scratch block."""

    __slots__ = ("block", "channel", "claimed_by", "complete", "fp", "received", "src", "total")

    def __init__(self, src: int, channel: Channel, fp: Fingerprint | None, total: int, block: np.ndarray[Any, Any]):
        self.src = src
        self.channel = channel
        self.fp = fp
        self.total = total
        self.block = block
        self.received = 0
        self.complete = False
        self.claimed_by: Recv | None = None  # a receive posted while this was streaming

    def target(self) -> memoryview:
        return bytes_view(self.block)[: self.total]


class Recv:
    """A posted receive: where the message for (src, channel) should land."""

    __slots__ = ("_event", "_finished", "_waiters", "channel", "dest", "error", "fp", "received", "src", "state",
                 "total")

    def __init__(self, src: int, channel: Channel, dest: Any, fp: Fingerprint | None):
        self.src = src
        self.channel = channel
        self.dest = dest
        self.fp = fp
        self.state = "posted"  # posted -> streaming -> done | failed | cancelled
        self.received = 0
        self.total = len(dest)
        self.error: BaseException | None = None
        self._finished = False
        self._event: anyio.Event | None = None  # made only if someone waits before it finishes
        self._waiters: list[anyio.Event] | None = None  # events of callers waiting on several receives

    def complete(self) -> None:
        self.state = "done"
        self._finish()

    def fail(self, error: BaseException) -> None:
        if self.state in ("done", "failed", "cancelled"):
            return
        self.state = "failed"
        self.error = error
        self._finish()

    def _finish(self) -> None:
        self._finished = True
        if self._event is not None:
            self._event.set()
        if self._waiters is not None:
            for ev in self._waiters:
                ev.set()

    def notify(self, event: anyio.Event) -> None:
        """Set `event` when this receive finishes (now, if it has): wait for the first of several."""
        if self._finished:
            event.set()
        elif self._waiters is None:
            self._waiters = [event]
        else:
            self._waiters.append(event)

    @property
    def finished(self) -> bool:
        return self._finished

    async def wait(self) -> None:
        """Wait until the message has landed in `dest`; raise what failed it."""
        if not self._finished:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        if self.error is not None:
            raise self.error


class Matcher:
    """Posted receives and unexpected messages, per (source, channel)."""

    def __init__(self, pool: ScratchPool) -> None:
        self.pool = pool
        self.posted: dict[tuple[int, Channel], deque[Recv]] = {}
        self.unexpected: dict[tuple[int, Channel], deque[Unexpected]] = {}

    # -- the receiving side ------------------------------------------------------------
    def take_unexpected(self, src: int, channel: Channel) -> Unexpected | None:
        q = self.unexpected.get((src, channel))
        if not q:
            return None
        msg = q.popleft()
        if not q:
            del self.unexpected[(src, channel)]
        return msg

    def peek_unexpected(self, src: int, channel: Channel) -> Unexpected | None:
        q = self.unexpected.get((src, channel))
        return q[0] if q else None

    def post(self, recv: Recv) -> None:
        """Queue `recv`; the caller has already checked for an unexpected message."""
        self.posted.setdefault((recv.src, recv.channel), deque()).append(recv)

    def match_posted(self, src: int, channel: Channel) -> Recv | None:
        q = self.posted.get((src, channel))
        if not q:
            return None
        recv = q.popleft()
        if not q:
            del self.posted[(src, channel)]
        return recv

    def add_unexpected(self, src: int, channel: Channel, fp: Fingerprint | None, total: int, *,
                       front: bool = False) -> Unexpected:
        msg = Unexpected(src, channel, fp, total, self.pool.acquire(total))
        q = self.unexpected.setdefault((src, channel), deque())
        if front:
            q.appendleft(msg)
        else:
            q.append(msg)
        return msg

    def requeue_front(self, msg: Unexpected) -> None:
        """Put back a message whose receive was withdrawn; it stays first in line."""
        self.unexpected.setdefault((msg.src, msg.channel), deque()).appendleft(msg)

    def remove_unexpected(self, msg: Unexpected) -> None:
        """Forget `msg` (if queued) and return its scratch block to the pool."""
        q = self.unexpected.get((msg.src, msg.channel))
        if q is not None and msg in q:
            q.remove(msg)
            if not q:
                del self.unexpected[(msg.src, msg.channel)]
        self.pool.release(msg.block)

    def unpost(self, recv: Recv) -> None:
        q = self.posted.get((recv.src, recv.channel))
        if q is not None and recv in q:
            q.remove(recv)
            if not q:
                del self.posted[(recv.src, recv.channel)]

    # -- failures ------------------------------------------------------------------------
    def fail_where(self, error_for: Any) -> None:
        """Fail every posted receive for which `error_for(recv)` returns an error."""
        for key in list(self.posted):
            q = self.posted[key]
            keep: deque[Recv] = deque()
            for recv in q:
                err = error_for(recv)
                if err is None:
                    keep.append(recv)
                else:
                    recv.fail(err)
            if keep:
                self.posted[key] = keep
            else:
                del self.posted[key]

    def drop_unexpected(self, keep: Any, *, incomplete: bool = False) -> None:
        """Forget complete (or, with `incomplete`, any) unexpected messages for which `keep(msg)` is false.

        Complete ones' blocks go back to the pool. An incomplete one's block may be
        under a read in progress, so it is left to the garbage collector rather than
        handed to someone else; its reader must be pointed elsewhere by the caller.
        """
        for key in list(self.unexpected):
            q = self.unexpected[key]
            kept: deque[Unexpected] = deque()
            for msg in q:
                if keep(msg) or not (msg.complete or incomplete):
                    kept.append(msg)
                elif msg.complete:
                    self.pool.release(msg.block)
            if kept:
                self.unexpected[key] = kept
            else:
                del self.unexpected[key]
