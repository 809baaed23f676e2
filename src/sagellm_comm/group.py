"""`Communicator`: the public face of a group of ranks.

Every op is an ordinary coroutine running in the caller's task, so cancelling
the caller (a task group, `fail_after`) cancels the op. A collective's failure
of any kind breaks its group on every rank (peers are told); a p2p failure ends
that message only. Buffers are the caller's: ops write results in place where
the API says so and never keep a reference after they return.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from . import trace as _trace
from .buffers import Buffer, DeviceBytes, as_buffer, check_op, empty_like, view_elements
from .collectives import direct, doubling, ring, select, tree
from .collectives.context import OpContext
from .device_ops import NCCL_OPS, DeviceOps, DeviceTensor, is_cuda, on_device_path, priority_level
from .errors import (
    CollectiveMismatch,
    CommClosed,
    CommError,
    CommTimeout,
    InvalidArgument,
    PeerLost,
    restate,
)
from .fusion import FusedBucket
from .overlap import Overlap
from .scheduler import device
from .scheduler.engine import Engine
from .scheduler.ordering import GroupState, aborted
from .stats import OpRecord, Stats
from .topology.cost import CostModel, default_model, link_class
from .transports.nccl import TorchLane
from .wire import Fingerprint

if TYPE_CHECKING:
    from .topology.cluster import ClusterView

T = TypeVar("T")

log = logging.getLogger("sagellm_comm.group")

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # pipelining unit of ring/tree algorithms; measured best on loopback


def _close_lanes(lanes: list[TorchLane]) -> None:
    for lane in lanes:
        lane.close()


class Communicator:
    """A group of ranks that run collectives and exchange messages together.

    `rank` and `world_size` are this group's (a `split` renumbers ranks from 0).
    """

    def __init__(self, engine: Engine, group: GroupState, *, timeout: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, transport: str | None = None,
                 owns_engine: bool = False, backend: str = "auto") -> None:
        self._engine = engine
        self._backend = backend
        self._device: DeviceOps | None = None
        self._group = group
        self._timeout = timeout
        self._chunk_bytes = chunk_bytes
        self._owns_engine = owns_engine
        self._splits: dict[tuple[int, ...], int] = {}
        self._closed: CommClosed | None = None
        self.stats = Stats(rank=group.members[group.rank], group=group.group_id)
        links = self.peer_transports()
        self.transport = transport or "+".join(sorted({str(v["transport"]) for v in links.values()})) or "self"
        self.stats.links = links
        self._cost_model: CostModel | None = default_model(self.link_classes(), chunk_bytes=chunk_bytes)
        self.before_op: Callable[[str], None] | None = None  # fault injection (sagellm_comm.testing)
        self.topology: ClusterView | None = None  # every member's host, gathered at init_process_group
        engine.register_group(group)
        if owns_engine:
            _trace.follow_env()
        log.info("rank %d: group %r created: rank %d of %d, transport %s", self.stats.rank, group.group_id,
                 group.rank, group.size, self.transport)

    # -- identity ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def world_size(self) -> int:
        return self._group.size

    @property
    def group_id(self) -> str:
        return self._group.group_id

    @property
    def global_ranks(self) -> list[int]:
        """The world ranks of this group's members, in group-rank order."""
        return list(self._group.members)

    @property
    def cost_model(self) -> CostModel | None:
        """What picks each collective's algorithm: predicted times (`topology.cost`), or None for the
        fixed size rules. Default: the built-in model of this group's link classes. Assign
        `topology.cost.cost_model_for(...)` (the same on every rank!) to use calibrations; the model is
        rebound to this communicator's chunk size."""
        return self._cost_model

    @cost_model.setter
    def cost_model(self, model: CostModel | None) -> None:
        self._cost_model = None if model is None else model.with_chunk_bytes(self._chunk_bytes)

    def link_classes(self) -> list[str]:
        """The cost class of the link to each other member (`topology.cost.link_class`), in group-rank order."""
        return [link_class(str(v["transport"]), str(v.get("link", ""))) for v in self.peer_transports().values()]

    def peer_transports(self) -> dict[int, dict[str, str | int]]:
        """For each other member (by group rank): its world rank, the transport to it, and why."""
        out: dict[int, dict[str, str | int]] = {}
        for g, w in enumerate(self._group.members):
            peer = self._engine.peers.get(w)
            if peer is not None:
                out[g] = {"world_rank": w, "transport": peer.conn.transport, "reason": peer.conn.reason,
                          "link": peer.conn.describe()}
        return out

    def __repr__(self) -> str:
        return f"<Communicator group={self.group_id!r} rank={self.rank}/{self.world_size} transport={self.transport}>"

    # -- collectives -----------------------------------------------------------------------
    async def all_reduce(self, tensor: T, op: str = "sum", *, timeout: float | None = None,
                         priority: str = "normal") -> T:
        """Reduce `tensor` across ranks, in place; returns `tensor`.

        op: sum, prod, min, max, avg (floating dtypes only), band, bor, bxor (integers, bool).
        Every rank ends with bitwise-identical results.
        priority: "high" (decode-critical: its frames and kernels go before queued
        "normal" and "low" work), "normal" or "low".
        """
        level = priority_level(priority)
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            check_op(op, dt.dtype)
            ops = self._device
            lane = ops.open_lanes.get(level) if ops is not None and op in NCCL_OPS and is_cuda(tensor) else None
            if lane is not None:  # a decode loop's case, once the lane is open: straight to it
                await self._lane_collective("all_reduce", dt, lane, lambda ln: ln.all_reduce(tensor, op),
                                            timeout, -1, op)
            else:
                await self._on_device("all_reduce", dt, lambda ln: ln.all_reduce(tensor, op),
                                      lambda h, o: self.all_reduce(h[0], op, timeout=timeout, priority=priority),
                                      [tensor], [tensor], level, timeout, op=op)
            return tensor
        buf = as_buffer(tensor)
        check_op(op, buf.dtype)
        algo, why, pred = select.all_reduce(buf.nbytes, self.world_size, self._cost_model)

        async def body(ctx: OpContext) -> None:
            if algo == "ring":
                await ring.all_reduce(ctx, buf, op)
            else:
                await doubling.all_reduce(ctx, buf, op)

        await self._collective("all_reduce", buf, body, algo, why, op=op, timeout=timeout, priority=level,
                               predicted=pred)
        return tensor

    async def all_gather(self, tensor: T, *, out: T | None = None, timeout: float | None = None,
                         priority: str = "normal") -> T:
        """An array/tensor of shape (world_size, *tensor.shape): row i is rank i's input.

        Pass `out` (same library and dtype, that shape) to receive into memory you reuse.
        """
        level = priority_level(priority)
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            res = _device_output(out, dt, (self.world_size, *dt.shape))
            return await self._device_out_of_place(  # type: ignore[no-any-return]
                "all_gather", dt, res, lambda lane: lane.all_gather(res, tensor),
                lambda h, o: self.all_gather(h, out=o, timeout=timeout, priority=priority), level, timeout)
        buf = as_buffer(tensor, writable=False)
        result = _output(out, buf, (self.world_size, *buf.shape))
        result.raw[self.rank * buf.nbytes : (self.rank + 1) * buf.nbytes] = buf.raw
        algo, why, pred = select.all_gather(result.nbytes, self.world_size, self._cost_model)

        async def body(ctx: OpContext) -> None:
            await (ring.all_gather(ctx, result) if algo == "ring" else direct.all_gather(ctx, result))

        await self._collective("all_gather", buf, body, algo, why, timeout=timeout, priority=level, predicted=pred)
        return result.obj  # type: ignore[no-any-return]

    async def reduce_scatter(self, tensor: T, op: str = "sum", *, out: T | None = None,
                             timeout: float | None = None, priority: str = "normal") -> T:
        """Split dim 0 into world_size equal chunks; return this rank's chunk reduced over ranks.

        `tensor` is not modified. Pass `out` (shape (dim0 / world_size, ...)) to reuse memory.
        """
        level = priority_level(priority)
        n = self.world_size
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            check_op(op, dt.dtype)
            _check_split("reduce_scatter", dt.shape, n)
            res = _device_output(out, dt, (dt.shape[0] // n, *dt.shape[1:]))
            return await self._device_out_of_place(  # type: ignore[no-any-return]
                "reduce_scatter", dt, res, lambda lane: lane.reduce_scatter(res, tensor, op),
                lambda h, o: self.reduce_scatter(h, op, out=o, timeout=timeout, priority=priority), level, timeout,
                op=op)
        buf = as_buffer(tensor, writable=False)
        check_op(op, buf.dtype)
        _check_split("reduce_scatter", buf.shape, n)
        rows = buf.shape[0] // n
        result = _output(out, buf, (rows, *buf.shape[1:]))
        algo, why, pred = select.reduce_scatter(buf.nbytes, n, self._cost_model)

        async def body(ctx: OpContext) -> None:
            if algo == "ring":
                raw = ctx.scratch(buf.nbytes)
                raw[:] = buf.raw
                work = Buffer(None, buf.dtype, buf.shape, view_elements(raw, buf.dtype), raw)
                await ring.reduce_scatter_inplace(ctx, work, op, then_gather=False)
                result.raw[:] = work.raw[self.rank * result.nbytes : (self.rank + 1) * result.nbytes]
            else:
                await direct.reduce_scatter(ctx, buf, result, op)

        if n == 1:
            result.raw[:] = buf.raw
        await self._collective("reduce_scatter", buf, body, algo, why, op=op, timeout=timeout, priority=level,
                               predicted=pred)
        return result.obj  # type: ignore[no-any-return]

    async def broadcast(self, tensor: T, root: int = 0, *, timeout: float | None = None,
                        priority: str = "normal") -> T:
        """Copy root's `tensor` into every rank's `tensor`, in place; returns `tensor`."""
        level = priority_level(priority)
        self._check_rank(root, "root")
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            await self._on_device("broadcast", dt, lambda lane: lane.broadcast(tensor, root),
                                  lambda h, o: self.broadcast(h[0], root, timeout=timeout, priority=priority),
                                  [tensor], [tensor], level, timeout, root=root)
            return tensor
        buf = as_buffer(tensor)
        algo, why, pred = select.broadcast(buf.nbytes, self.world_size, self._cost_model)
        await self._collective("broadcast", buf, lambda ctx: tree.broadcast(ctx, buf, root),
                               algo, why, root=root, timeout=timeout, priority=level, predicted=pred)
        return tensor

    async def all_to_all(self, tensor: T, *, out: T | None = None, timeout: float | None = None,
                         priority: str = "normal") -> T:
        """Split dim 0 into world_size chunks; chunk i goes to rank i.

        Returns an array/tensor of the same shape whose chunk j came from rank j
        (`out`, if given, which must not be `tensor` itself).
        """
        level = priority_level(priority)
        n = self.world_size
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            _check_split("all_to_all", dt.shape, n)
            res = _device_output(out, dt, dt.shape)
            return await self._device_out_of_place(  # type: ignore[no-any-return]
                "all_to_all", dt, res, lambda lane: lane.all_to_all(res, tensor),
                lambda h, o: self.all_to_all(h, out=o, timeout=timeout, priority=priority), level, timeout)
        buf = as_buffer(tensor, writable=False)
        _check_split("all_to_all", buf.shape, n)
        result = _output(out, buf, buf.shape)
        if n == 1:
            result.raw[:] = buf.raw
        algo, why, pred = select.all_to_all(buf.nbytes, n, self._cost_model)
        await self._collective("all_to_all", buf, lambda ctx: direct.all_to_all(ctx, buf, result),
                               algo, why, timeout=timeout, priority=level, predicted=pred)
        return result.obj  # type: ignore[no-any-return]

    async def barrier(self, *, timeout: float | None = None, priority: str = "normal") -> None:
        """Return once every rank of the group has entered the barrier."""
        algo, why, pred = select.barrier(self.world_size, self._cost_model)
        await self._collective("barrier", None, direct.barrier, algo, why, timeout=timeout,
                               priority=priority_level(priority), predicted=pred)

    # -- point to point ----------------------------------------------------------------------
    async def send(self, tensor: Any, dst: int, tag: int = 0, *, timeout: float | None = None,
                   priority: str = "normal") -> None:
        """Send `tensor` to group rank `dst`; returns once it is handed to the transport.

        Messages to one destination with one tag arrive in send order. Cancelled
        part-way, the receiver's matching `recv` raises `TransferCancelled`.
        """
        level = priority_level(priority)
        self._check_p2p(dst, tag, "dst", "send")
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            await self._p2p_on_device("send", dt, dst, tag, timeout, level)
            return
        buf = as_buffer(tensor, writable=False)
        await self._send_bytes(buf.raw, Fingerprint(-1, "p2p", buf.dtype.name, buf.shape), dst, tag, timeout, level)

    async def _send_bytes(self, raw: memoryview | DeviceBytes, fp: Fingerprint, dst: int, tag: int,
                          timeout: float | None, level: int, algo: str = "direct") -> None:
        rec = self._record("send", len(raw), algo, "point to point")
        try:
            with self._deadline(timeout, f"send to rank {dst} (tag {tag})"):
                await self._engine.send(self._group.members[dst], (self.group_id, -1, tag), raw, fp,
                                        priority=level)
        except BaseException as e:
            self._done(rec, e)
            raise
        self._done(rec, None)

    async def recv(self, tensor: T, src: int, tag: int = 0, *, timeout: float | None = None,
                   priority: str = "normal") -> T:
        """Receive the next message from group rank `src` with `tag` into `tensor`, in place.

        Cancelling (or timing out) ends this receive only; the message, if it comes,
        waits for the next `recv`. (On an NCCL lane a receive cannot be withdrawn:
        there, cancelling breaks the group.)
        """
        level = priority_level(priority)
        self._check_p2p(src, tag, "src", "recv")
        if on_device_path(tensor, self._backend):
            dt = DeviceTensor(tensor)
            await self._p2p_on_device("recv", dt, src, tag, timeout, level)
            return tensor
        buf = as_buffer(tensor)
        await self._recv_bytes(buf.raw, Fingerprint(-1, "p2p", buf.dtype.name, buf.shape), src, tag, timeout)
        return tensor

    async def _recv_bytes(self, raw: memoryview | DeviceBytes, fp: Fingerprint, src: int, tag: int,
                          timeout: float | None, algo: str = "direct") -> None:
        rec = self._record("recv", len(raw), algo, "point to point")
        posted = self._engine.post(self._group.members[src], (self.group_id, -1, tag), raw, fp)
        try:
            with self._deadline(timeout, f"recv from rank {src} (tag {tag})"):
                await posted.wait()
        except BaseException as e:
            self._engine.withdraw(posted)  # its message, even one that landed just now, stays for the next recv
            self._done(rec, e)
            raise
        self._done(rec, None)

    # -- fusion, overlap, device -------------------------------------------------------------
    def fuse(self, *, priority: str = "normal", timeout: float | None = None) -> FusedBucket:
        """Batch many small all_reduces into one launch per (device, dtype, op).

            async with comm.fuse() as bucket:
                for g in grads:
                    bucket.all_reduce(g)
            # here every g holds its reduced value

        Every rank must queue the same tensors in the same order (as for any
        collective); buckets are formed by that order, never by timing, so ranks agree.
        """
        return FusedBucket(self, priority=priority, timeout=timeout)

    def overlap(self) -> Overlap:
        """A task group that measures how much communication it hid behind compute.

            async with comm.overlap() as ov:
                ov.start_comm(comm.all_reduce, x)
                ov.start_compute(layer, h)
            print(ov.report.efficiency)
        """
        return Overlap()

    @property
    def device_path(self) -> str:
        """How CUDA tensors travel in this group: "nccl", "host staging ...", or "undecided"."""
        return self._device_ops().path()

    # -- groups ------------------------------------------------------------------------------
    def split(self, ranks: Sequence[int]) -> Communicator | None:
        """A sub-group of these ranks (renumbered 0.. in the order given); None on non-members.

        Purely local: no messages. Members must call `split` with the same ranks in
        the same order relative to their other splits. Works on a broken group, so
        survivors can rebuild after a failure.
        """
        ranks = [int(r) for r in ranks]
        if not ranks or len(set(ranks)) != len(ranks):
            raise InvalidArgument(f"split needs distinct ranks, got {ranks}")
        for r in ranks:
            self._check_rank(r, "split rank")
        key = tuple(ranks)
        nth = self._splits.get(key, 0)
        self._splits[key] = nth + 1
        if self.rank not in ranks:
            return None
        gid = f"{self.group_id}/{','.join(map(str, ranks))}#{nth}"
        g = GroupState(gid, [self._group.members[r] for r in ranks], ranks.index(self.rank))
        sub = Communicator(self._engine, g, timeout=self._timeout, chunk_bytes=self._chunk_bytes,
                           backend=self._backend)
        if self.topology is not None:
            sub.topology = self.topology.subset(ranks)
        if self._cost_model is None:
            sub.cost_model = None  # the fixed rules, as here
        elif sub.topology is not None:
            # the gathered links and calibrations of exactly these members: the same model on every one of
            # them, even where their own links differ (two ranks on one host, a third elsewhere)
            sub.cost_model = sub.topology.cost_model(self._chunk_bytes)
        else:  # a simulated world: every link is of one class, so each member's own view agrees
            sub.cost_model = self._cost_model.for_links(sub.link_classes())
        return sub

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None or self._engine.closed is not None

    async def aclose(self) -> None:
        """Close this communicator; for the world communicator, say goodbye to every peer."""
        first = self._closed is None
        if self._closed is None:
            self._closed = CommClosed(f"communicator {self.group_id!r} is closed")
            self._group.break_(self._closed)
        if self._device is not None:
            lanes = self._device.release()
            if lanes:  # NCCL's shutdown can take a while: off the loop, and not cut short by a cancel
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_close_lanes, lanes)
        if self._owns_engine:
            await self._engine.close()
            _trace.rank_closed(self.stats.rank)
        if first:
            log.info("rank %d: group %r closed", self.stats.rank, self.group_id)

    def abort(self) -> None:
        """Drop every connection at once (world communicator) without goodbyes."""
        first = self._closed is None
        self._closed = self._closed or CommClosed(f"communicator {self.group_id!r} was aborted")
        if self._owns_engine:
            self._engine.abort(self._closed)
            _trace.rank_closed(self.stats.rank)
        else:
            self._group.break_(self._closed)
        if first:
            log.info("rank %d: group %r aborted", self.stats.rank, self.group_id)

    async def __aenter__(self) -> Communicator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self, op: str = "") -> None:
        if self.before_op is not None and op:
            self.before_op(op)
        if self._closed is not None:
            raise CommClosed(f"{self._closed}; create a new one")
        self._engine.raise_if_closed()

    def _check_rank(self, r: int, what: str) -> None:
        if not isinstance(r, int) or not 0 <= r < self.world_size:
            raise InvalidArgument(f"{what} {r!r} is out of range for a group of {self.world_size} ranks")

    def _check_p2p(self, peer: int, tag: int, what: str, op: str) -> None:
        self._check_open(op)
        self._check_rank(peer, what)
        if peer == self.rank:
            raise InvalidArgument(f"{what} {peer} is this rank; point-to-point needs another rank")
        if not isinstance(tag, int) or tag < 0:
            raise InvalidArgument(f"tag must be a non-negative int, got {tag!r}")

    def _deadline(self, timeout: float | None, what: str) -> Any:
        limit = timeout if timeout is not None else self._timeout
        return _Deadline(limit, f"{what} on rank {self.rank} of group {self.group_id!r}")

    def _record(self, op: str, nbytes: int, algo: str, why: str, seq: int = -1, predicted: float = 0.0) -> OpRecord:
        now = time.perf_counter()  # nothing waits between the call and here on the host path: queued = started
        return OpRecord(op, self.group_id, seq, nbytes, algo, why, self.transport, now, predicted=predicted,
                        queued=now)

    def _done(self, rec: OpRecord, error: BaseException | None) -> None:
        rec.finished = time.perf_counter()
        rec.ok = error is None
        rec.error = "" if error is None else f"{type(error).__name__}: {error}"
        self.stats.add(rec)

    async def _collective(self, kind: str, buf: Buffer | DeviceTensor | None,
                          body: Callable[[OpContext], Awaitable[None]],
                          algo: str, why: str, *, root: int = -1, op: str = "",
                          timeout: float | None, priority: int = 0, predicted: float = 0.0) -> None:
        self._check_open(kind)
        g = self._group
        fp = g.begin(kind, buf.dtype.name if buf else "", buf.shape if buf else (), root, op)
        rec = self._record(kind, buf.nbytes if buf else 0, algo, why, fp.seq, predicted)
        ctx = OpContext(self._engine, g, fp, self._chunk_bytes, priority=priority)
        limit = timeout if timeout is not None else self._timeout
        try:
            self._check_early_frames(fp)
            if g.size > 1:
                with _Deadline(limit, lambda: self._describe(fp)):
                    await body(ctx)
        except BaseException as e:
            self._raise_failed(e, fp, rec)
        finally:
            ctx.finish()
            g.end(fp)
        self._done(rec, None)

    def _describe(self, fp: Fingerprint) -> str:
        return f"{fp.describe()} on rank {self.rank} of group {self.group_id!r}"

    def _raise_failed(self, e: BaseException, fp: Fingerprint, rec: OpRecord) -> NoReturn:
        """Break the group for collective `fp` that raised `e`, and raise what the caller should see."""
        g = self._group
        if isinstance(e, CommTimeout):
            self._engine.fail_group(g, aborted(g.group_id, fp, g.rank, f"it timed out ({e})"), notify=True)
        elif isinstance(e, CommError):
            first = g.broken
            if first is not None and first is not e:
                # the group broke first (a peer's Abort, a mismatch seen by the reader);
                # what we hit after that (a send to a rank that has left) is a symptom
                self._done(rec, first)
                raise restate(first, str(first)) from e
            cause = ("mismatch" if isinstance(e, CollectiveMismatch)
                     else "peer_lost" if isinstance(e, PeerLost) else "aborted")
            lost = e.peer if isinstance(e, PeerLost) and e.peer is not None else -1
            self._engine.fail_group(g, e, notify=True, cause=cause, peer=lost)
        else:
            self._engine.fail_group(g, aborted(g.group_id, fp, g.rank, f"cancelled ({type(e).__name__})"),
                                    notify=True)
        self._done(rec, e)
        raise e

    async def _lane_collective(self, kind: str, dt: DeviceTensor, lane: TorchLane, issue: Callable[[Any], Any],
                               timeout: float | None, root: int, op: str, queued: float = 0.0) -> None:
        """A collective on the NCCL lane: the same bookkeeping as `_collective`, minus the host path's.

        `queued`: when the caller asked for it, if it first waited (for the lane to open)."""
        self._check_open(kind)
        g = self._group
        fp = g.begin(kind, dt.dtype.name, dt.shape, root, op)
        now = time.perf_counter()
        rec = OpRecord(kind, g.group_id, fp.seq, dt.nbytes, lane.backend, lane.reason, lane.backend,
                       now, queued=queued or now)
        limit = timeout if timeout is not None else self._timeout
        ops = self._device
        assert ops is not None
        try:
            work = issue(lane)
            if lane.polled and work.is_completed():
                pass  # done before we could wait (one rank, tiny ops): no trip through the wait
            elif limit is None:
                await ops.await_work(lane, work, kind)
            else:
                with _Deadline(limit, lambda: self._describe(fp)):
                    await ops.await_work(lane, work, kind)
        except BaseException as e:
            self._raise_failed(e, fp, rec)
        finally:
            g.end(fp)
        self._done(rec, None)

    def _device_ops(self) -> DeviceOps:
        if self._device is None:
            self._device = DeviceOps(self, self._backend, self._engine.local_host)
        return self._device

    async def _on_device(self, kind: str, dt: DeviceTensor, issue: Callable[[Any], Any],
                         host_op: Callable[[list[Any], list[Any]], Awaitable[Any]],
                         inputs: list[Any], outputs: list[Any], priority: int,
                         timeout: float | None, *, root: int = -1, op: str = "") -> None:
        """Run a collective on device tensors: on the device's lane, or (CUDA) staged through `host_op`."""
        queued = time.perf_counter()
        ops = self._device_ops()
        dev = dt.obj.device
        lane = ops.device_lanes.get((dev.type, priority)) if op in NCCL_OPS else None
        if lane is None:
            lane = await ops.lane(dev, priority, op)
        if lane is not None:
            await self._lane_collective(kind, dt, lane, issue, timeout, root, op, queued)
            return
        if self.world_size == 1:  # nothing to exchange: copy locally, on the device
            self._check_open(kind)
            for src, dst in zip(inputs, outputs, strict=True):
                if dst is not src:
                    dst.view(-1).copy_(src.view(-1))
            await device.wait_stream()
            return
        await ops.staged(inputs, outputs, priority, host_op)

    async def _device_out_of_place(self, kind: str, dt: DeviceTensor, res: Any, issue: Callable[[Any], Any],
                                   host: Callable[[Any, Any], Awaitable[Any]], priority: int,
                                   timeout: float | None, *, op: str = "") -> Any:
        """An op writing a new CUDA tensor `res`; `host(input, out=)` is the same op on staged copies."""
        async def staged(h: list[Any], o: list[Any]) -> None:
            await host(h[0], o[0])

        await self._on_device(kind, dt, issue, staged, [dt.obj], [res], priority, timeout, op=op)
        return res

    async def _p2p_on_device(self, kind: str, dt: DeviceTensor, peer: int, tag: int, timeout: float | None,
                             priority: int) -> None:
        """A CUDA send or receive: on the NCCL lane if a collective opened it already (p2p
        never opens it: that takes every rank); else through the link as device bytes,
        which shared memory copies by DMA and other transports stage through pinned
        buffers piece by piece. The bytes on the wire are those of a host tensor, so
        the other side may pass one."""
        ops = self._device_ops()
        lane = ops.ready(dt.obj.device, priority)
        if lane is None and not dt.obj.is_cuda:  # npu, mlu: through a host copy until a collective opens the lane
            fp = Fingerprint(-1, "p2p", dt.dtype.name, dt.shape)
            await ops.staged_p2p(kind, dt.obj, lambda h: (
                self._send_bytes(as_buffer(h, writable=False).raw, fp, peer, tag, timeout, priority,
                                 algo="staged through host memory") if kind == "send"
                else self._recv_bytes(as_buffer(h).raw, fp, peer, tag, timeout, algo="staged through host memory")))
            return
        if lane is None:
            torch = sys.modules["torch"]
            stream = ops.stream(dt.obj.device, priority)
            stream.wait_stream(torch.cuda.current_stream(dt.obj.device))  # after the caller's queued work
            raw = DeviceBytes.of(dt.obj, stream)
            fp = Fingerprint(-1, "p2p", dt.dtype.name, dt.shape)
            dma = self._engine.peers[self._group.members[peer]].conn.device_payloads
            if kind == "send":
                await self._send_bytes(raw, fp, peer, tag, timeout, priority,
                                       algo="device copy into shm" if dma else "staged through pinned buffers")
            else:
                await self._recv_bytes(raw, fp, peer, tag, timeout,
                                       algo="device copy from shm" if dma else "staged through pinned buffers")
                await device.wait_stream(stream)  # the last pieces' copies to the device
            return
        rec = self._record(kind, dt.nbytes, lane.backend, f"{lane.backend} lane: point to point")
        rec.transport = lane.backend
        try:
            with self._deadline(timeout, f"{kind} {'to' if kind == 'send' else 'from'} rank {peer} (tag {tag})"):
                work = lane.send(dt.obj, peer, tag) if kind == "send" else lane.recv(dt.obj, peer, tag)
                await ops.await_work(lane, work, kind)
        except BaseException as e:
            # NCCL cannot withdraw a half-matched send or receive: the lane is gone, and so is the group
            err = e if isinstance(e, CommError) else CommError(f"{kind} on the {lane.backend} lane was cancelled")
            self._engine.fail_group(self._group, err, notify=True)
            self._done(rec, e)
            raise
        self._done(rec, None)

    def _check_early_frames(self, fp: Fingerprint) -> None:
        """Compare our fingerprint with those of frames that arrived before this op began."""
        g = self._group
        for (src, ch), q in self._engine.matcher.unexpected.items():
            if ch[0] == g.group_id and ch[1] == fp.seq:
                for msg in q:
                    if msg.fp is not None and msg.fp != fp:
                        raise g.mismatch_error(fp, msg.fp, g.members.index(src))


def _output(given: Any, like: Buffer, shape: tuple[int, ...]) -> Buffer:
    """The caller's `out` buffer, checked against what the op produces; or a new one."""
    if given is None:
        return empty_like(like, shape)
    out = as_buffer(given)
    if out.dtype != like.dtype or out.shape != shape or out.is_torch != like.is_torch:
        raise InvalidArgument(f"out must be a {'torch.Tensor' if like.is_torch else 'numpy.ndarray'} "
                              f"of dtype {like.dtype.name} and shape {shape}, got {out.describe()}")
    if out.nbytes and like.nbytes and _overlaps(out, like):
        raise InvalidArgument("out must not share memory with the input")
    return out


def _check_split(kind: str, shape: tuple[int, ...], n: int) -> None:
    if not shape or shape[0] % n:
        raise InvalidArgument(f"{kind} needs dim 0 divisible by world_size={n}, got shape {shape}")


def _device_output(given: Any, like: DeviceTensor, shape: tuple[int, ...]) -> Any:
    """The caller's device `out` tensor, checked; or a new one on the input's device."""
    t = like.obj
    if given is None:
        return t.new_empty(shape)
    if (not isinstance(given, sys.modules["torch"].Tensor) or given.device != t.device or given.dtype != t.dtype
            or tuple(given.shape) != shape or not given.is_contiguous()):
        raise InvalidArgument(f"out must be a contiguous torch.Tensor on {t.device} of dtype "
                              f"{like.dtype.name} and shape {shape}, got {type(given).__name__} "
                              f"{getattr(given, 'dtype', '')} {tuple(getattr(given, 'shape', ()))} "
                              f"on {getattr(given, 'device', '?')}")
    if given.data_ptr() == t.data_ptr() and like.nbytes:
        raise InvalidArgument("out must not share memory with the input")
    return given


def _overlaps(a: Buffer, b: Buffer) -> bool:
    return bool(np.shares_memory(np.frombuffer(a.raw, np.uint8), np.frombuffer(b.raw, np.uint8)))


class _Deadline:
    """`fail_after` that raises CommTimeout naming the op (None: no limit)."""

    def __init__(self, seconds: float | None, what: str | Callable[[], str]) -> None:
        self._seconds = seconds
        self._what = what
        self._scope: anyio.CancelScope | None = None

    def __enter__(self) -> _Deadline:
        if self._seconds is not None:
            self._scope = anyio.move_on_after(self._seconds)
            self._scope.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._scope is None:
            return False
        swallowed = self._scope.__exit__(*exc)
        if self._scope.cancelled_caught:
            what = self._what if isinstance(self._what, str) else self._what()  # built only when needed
            raise CommTimeout(f"{what} did not complete within {self._seconds:g} s")
        return bool(swallowed)
