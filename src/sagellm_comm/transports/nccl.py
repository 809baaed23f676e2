"""Device collectives through torch.distributed's NCCL backend, bootstrapped from our own group.

NCCL moves CUDA tensors over NVLink, PCIe P2P or the network at rates no host
path reaches, and torch ships it; what it lacks is our failure model and our
event loop. So a `TorchLane` wraps one torch `ProcessGroupNCCL` per (group,
priority) without touching torch's global default group: the group's rank 0
opens a `TCPStore` on a free port, the address travels in one of our own
collectives together with each rank's GPU, and the lane exists only if every
rank has its own GPU (NCCL refuses two ranks on one device). Ops are issued on
the lane's stream (a high-priority CUDA stream for the "high" lane) and awaited by
polling the work's completion from the event loop, which also watches our
heartbeats: a peer lost mid-op aborts the lane and raises `PeerLost` on every
survivor instead of a hang inside NCCL.

The same bootstrap makes vendor lanes (`transports.vendor`): RCCL is torch's nccl
backend on ROCm; HCCL (torch_npu) and CNCL (torch_mlu) come from torch's third-party
backend registry. The same class runs torch's gloo backend on CPU tensors; the
tests use that to check the bootstrap and the op mapping on machines without a
GPU, and fake vendor packages whose registered process groups are gloo.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendUnavailable, InvalidArgument
from . import vendor

if TYPE_CHECKING:
    from ..group import Communicator

log = logging.getLogger("sagellm_comm.nccl")

INFO_BYTES = 1024  # one rank's lane description, padded, in the bootstrap all_gather
WHY_CHARS = 600  # of it, at most this much of why a rank cannot use the backend
STORE_TIMEOUT = timedelta(seconds=60)
VENDOR_TIMEOUT = timedelta(minutes=30)  # a vendor process group's own op timeout (torch's default); ours is shorter


def _torch() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    return torch


def backend_available(backend: str) -> bool:
    return unavailable_reason(backend) is None


def unavailable_reason(backend: str) -> str | None:
    """Why this process cannot use `backend` (nccl, rccl, hccl, cncl, gloo), or None."""
    if backend in ("hccl", "cncl", "rccl"):
        return vendor.problem(backend)
    try:
        dist = _torch().distributed
    except ImportError:
        return "torch is not installed"
    if not dist.is_available():
        return "torch.distributed is not available"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return "this torch has no NCCL"
        return None if _torch().cuda.is_available() else "torch sees no GPU"
    return None if dist.is_gloo_available() else "this torch has no gloo"


_REDUCE_OPS: dict[str, Any] = {}


def reduce_op(op: str) -> Any:
    """torch's ReduceOp for our op name, or None where the backend has none."""
    if not _REDUCE_OPS:
        R = _torch().distributed.ReduceOp
        _REDUCE_OPS.update({"sum": R.SUM, "prod": R.PRODUCT, "min": R.MIN, "max": R.MAX, "avg": R.AVG,
                            "band": R.BAND, "bor": R.BOR, "bxor": R.BXOR})
    return _REDUCE_OPS.get(op)


_live_lanes: weakref.WeakSet[TorchLane] = weakref.WeakSet()


@atexit.register
def _close_live_lanes() -> None:
    """Lanes whose communicator was never closed: shut down while the interpreter is whole.

    A process group destroyed during interpreter finalization can abort the process
    (gloo's worker threads release tensors and need the GIL that is being torn down:
    "terminate called without an active exception", exit -6), so none may live that long.
    """
    for lane in list(_live_lanes):
        lane.close()


class LaneUnavailable(BackendUnavailable):
    """This group cannot use the backend (says why); CUDA tensors fall back to host staging."""


class TorchLane:
    """One torch process group (NCCL, RCCL, HCCL, CNCL, or gloo in tests) for one of our groups and priority.

    `backend` is our name for it (what op records show), `device_type` the tensors it
    moves, `reason` the record's reason. `polled`: its works are awaited by polling
    `is_completed()` from the loop (device backends, whose `wait()` only orders streams);
    otherwise (gloo, whose send, recv and reduce_scatter progress only inside `wait()`)
    by `wait()` in a thread.
    """

    def __init__(self, backend: str, pg: Any, store: Any, rank: int, size: int, priority: int,
                 device_type: str = "cuda", reason: str = "") -> None:
        self.backend = backend
        self.device_type = device_type
        self.reason = reason or f"{backend} lane"
        gloo = getattr(_torch().distributed, "ProcessGroupGloo", None)
        self.polled = gloo is None or not isinstance(pg, gloo)
        self.pg = pg
        self.store = store  # rank 0 serves it; it must outlive the process group
        self.rank = rank
        self.size = size
        self.priority = priority
        self.aborted = False
        self.waiting = 0  # works being awaited on it now
        dist = _torch().distributed
        self._allreduce_opts: dict[str, Any] = {}
        self._dist = dist
        _live_lanes.add(self)

    def allreduce_opts(self, op: str) -> Any:
        opts = self._allreduce_opts.get(op)
        if opts is None:
            opts = self._dist.AllreduceOptions()
            opts.reduceOp = reduce_op(op)
            self._allreduce_opts[op] = opts
        return opts

    # each returns torch's Work; completion is polled with `work.is_completed()`
    def all_reduce(self, t: Any, op: str) -> Any:
        return self.pg.allreduce([t], self.allreduce_opts(op))

    def all_gather(self, out: Any, t: Any) -> Any:
        return self.pg._allgather_base(out.view(-1), t.view(-1))  # gloo checks shapes, not just sizes

    def reduce_scatter(self, out: Any, t: Any, op: str) -> Any:
        opts = self._dist.ReduceScatterOptions()
        opts.reduceOp = reduce_op(op)
        return self.pg._reduce_scatter_base(out, t, opts)

    def broadcast(self, t: Any, root: int) -> Any:
        opts = self._dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        return self.pg.broadcast([t], opts)

    def all_to_all(self, out: Any, t: Any) -> Any:
        return self.pg.alltoall_base(out, t, [], [], self._dist.AllToAllOptions())

    def send(self, t: Any, dst: int, tag: int) -> Any:
        return self.pg.send([t], dst, tag)

    def recv(self, t: Any, src: int, tag: int) -> Any:
        return self.pg.recv([t], src, tag)

    def close(self) -> None:
        """Shut the process group down and let go of it, then of the store it was made from
        (in that order: the group may still talk to the store while it shuts down).

        Called when its communicator closes, so the group is destroyed while the interpreter
        is whole (see `_close_live_lanes`). An aborted lane (a peer was lost), or one with a
        work still awaited (closed mid-op), is aborted and left alone instead: its backend may
        be waiting on a peer that will not answer, and destroying it would block until the
        backend's own timeout.
        """
        _live_lanes.discard(self)
        if self.waiting:
            self.abort()
        if self.aborted or self.pg is None:
            return
        self.aborted = True
        pg, self.pg = self.pg, None
        try:
            pg.shutdown()
        except Exception as e:  # best effort: we are letting go of it either way
            log.debug("lane %s: shutdown() failed: %r", self.backend, e)
        del pg  # the last reference: the group's destructor joins its threads here
        self.store = None

    def abort(self) -> None:
        """Stop the backend's in-flight work (a peer is gone); the lane is unusable after."""
        if self.aborted:
            return
        self.aborted = True
        for name in ("abort", "shutdown", "_shutdown"):
            fn = getattr(self.pg, name, None)
            if fn is not None:
                try:
                    fn()
                    return
                except Exception as e:  # best effort: the group is failing anyway
                    log.debug("lane %s: %s() failed: %r", self.backend, name, e)


def _gpu_identity(device: Any) -> str:
    torch = _torch()
    if device.type == "cpu":
        return f"cpu:{os.getpid()}:{id(device)}"  # gloo lanes (tests): no device to share
    if device.type != "cuda":  # npu, mlu: the host, which of its devices this process sees, and the index
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES" if device.type == "npu" else "MLU_VISIBLE_DEVICES", "*")
        index = device.index if device.index is not None else getattr(torch, device.type).current_device()
        return f"{socket.gethostname()}:{device.type}:{visible}:{index}"
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else f"{props.pci_bus_id if hasattr(props, 'pci_bus_id') else ''}:{device}"


async def open_lane(comm: Communicator, backend: str, device: Any, priority: int, host: str) -> TorchLane:
    """Create the lane for `comm` on every member (a collective: all ranks must call it).

    `backend`: nccl (labelled rccl on ROCm), rccl, hccl, cncl or gloo. Raises
    LaneUnavailable, on every rank alike, when some rank lacks the backend or two
    ranks share a device.
    """
    torch = _torch()
    name = vendor.label(backend) if backend in vendor.VENDORS else backend
    usable = backend_available(backend)
    why_not = "" if usable else unavailable_reason(backend) or ""
    store = None
    port = 0
    if usable and comm.rank == 0:
        try:
            store = torch.distributed.TCPStore(host, 0, comm.world_size, True, timeout=STORE_TIMEOUT,
                                               wait_for_workers=False)
            port = int(store.port)
        except Exception as e:
            log.warning("cannot open a TCPStore on %s for the %s lane: %r", host, backend, e)
            usable = False
    info = {"ok": usable, "gpu": _gpu_identity(device) if usable else "", "host": host, "port": port,
            "why": why_not[:WHY_CHARS]}
    row = np.zeros(INFO_BYTES, np.uint8)
    enc = json.dumps(info).encode()
    if len(enc) > INFO_BYTES:  # an odd `why` (escaped characters): shorten it rather than fail
        info["why"] = why_not[:100]
        enc = json.dumps(info).encode()
    if len(enc) > INFO_BYTES:
        raise InvalidArgument(f"lane description too long ({len(enc)} bytes)")
    row[: len(enc)] = np.frombuffer(enc, np.uint8)
    table = await comm.all_gather(row)
    infos = [json.loads(bytes(r).rstrip(b"\0")) for r in table]
    missing = [i for i, x in enumerate(infos) if not x["ok"]]
    if missing:
        whys = sorted({str(infos[i].get("why", "")) for i in missing} - {""})
        raise LaneUnavailable(f"ranks {missing} of group {comm.group_id!r} cannot use {name}"
                              + (f": {'; '.join(whys)}" if whys else ""))
    gpus = [x["gpu"] for x in infos]
    if len(set(gpus)) != len(gpus):
        raise LaneUnavailable(f"ranks of group {comm.group_id!r} share a GPU ({name} needs one GPU per rank)")
    root = infos[0]
    pg = None
    why = ""
    try:
        if store is None:
            store = torch.distributed.TCPStore(root["host"], root["port"], comm.world_size, False,
                                               timeout=STORE_TIMEOUT)
        pg_name = f"sagellm/{comm.group_id}/{priority}"
        prefix = torch.distributed.PrefixStore(pg_name, store)
        if backend in ("nccl", "rccl"):
            opts = torch.distributed.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = priority > 0
            pg = torch.distributed.ProcessGroupNCCL(prefix, comm.rank, comm.world_size, opts)
        elif backend in vendor.VENDORS:  # hccl, cncl: the creator their package registered with torch
            pg = vendor.create_process_group(backend, prefix, comm.rank, comm.world_size, timeout=VENDOR_TIMEOUT,
                                             group_name=pg_name, global_ranks=comm.global_ranks)
        else:
            pg = torch.distributed.ProcessGroupGloo(prefix, comm.rank, comm.world_size)
    except Exception as e:  # reported to every rank below, so that none waits inside NCCL for us
        why = f"rank {comm.rank} could not create its {name} process group: {e!r}"
        log.warning("%s", why)
    agreed = np.array([0 if pg is None else 1], np.int32)
    await comm.all_reduce(agreed, op="min")
    if not agreed[0]:
        raise LaneUnavailable(why or f"a rank of group {comm.group_id!r} could not create its {name} process group")
    return TorchLane(name, pg, store, comm.rank, comm.world_size, priority, device.type, _reason(name, device.type))


def _reason(name: str, device_type: str) -> str:
    """What an op record on this lane says about why it went there."""
    if device_type == "cuda":
        how = " (torch's nccl backend on ROCm)" if name == "rccl" else ""
        return f"{name} lane{how}: every rank has its own GPU"
    if name in vendor.VENDORS:
        v = vendor.VENDORS[name]
        return f"{name} lane ({v.package}'s process group, {v.hardware}): {device_type} tensors"
    return f"{name} lane: {device_type} tensors"
