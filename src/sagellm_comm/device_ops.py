"""Device tensors in a communicator's ops. CUDA: an NCCL lane (RCCL on ROCm) where every
rank has its own GPU, host staging through pinned buffers otherwise. Ascend (npu) and
Cambricon (mlu) tensors: an HCCL or CNCL lane from torch's backend registry, or a clear
error (they have no host staging). Which tensors take which lane: `transports.vendor`.

Completion is the same as for host tensors: an awaited op has finished, so the
result can be read from the host and any kernel the caller launches afterwards, on
any stream, runs after it. Inputs are ordered after the work the caller queued on
its current stream before the call (the lane's stream waits for it; staging
copies run on a communication stream that waits for it), while kernels the
caller queues during the await (another task computing) are not waited for: that
is what makes overlap possible.

The lane is chosen once per group, device type and priority, by a collective on the
host path (`open_lane`), so every rank takes the same path. Ops the backend lacks
(bitwise reductions) are staged for CUDA tensors and refused for the others.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .buffers import DTYPES, DType, ScratchPool
from .errors import BackendUnavailable, CommError, InvalidArgument, PeerLost, UnsupportedBuffer, unwrap_group_errors
from .scheduler import device
from .transports import vendor
from .transports.nccl import LaneUnavailable, TorchLane, open_lane

if TYPE_CHECKING:
    from .group import Communicator

BACKENDS = vendor.NAMES
NCCL_OPS = frozenset(("", "sum", "prod", "min", "max", "avg"))  # what the lanes reduce; bitwise ops are staged
PRIORITIES = {"high": 1, "normal": 0, "low": -1}


def priority_level(priority: str | int) -> int:
    """1 (decode-critical), 0, or -1 (background) from the public names."""
    if isinstance(priority, int) and priority in (-1, 0, 1):
        return priority
    try:
        return PRIORITIES[priority]  # type: ignore[index]
    except (KeyError, TypeError):
        raise InvalidArgument(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}") from None


def is_cuda(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and bool(obj.is_cuda)


def on_device_path(obj: object, backend: str) -> bool:
    """True for tensors that `DeviceOps` moves (cuda, npu, mlu) in a group of `backend`;
    False for the rest (numpy arrays and CPU tensors: our transports; other devices: refused there)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return False
    if obj.is_cuda:
        return True
    if obj.is_cpu:
        return vendor.cpu_lane is not None and backend == vendor.cpu_lane  # testing only
    return obj.device.type in vendor.VENDOR_DEVICES


_TORCH_DTYPES: dict[Any, DType] = {}  # torch.dtype -> ours, filled on first use


def _dtype_of(t: Any) -> DType | None:
    if not _TORCH_DTYPES:
        torch = sys.modules["torch"]
        for d in DTYPES.values():
            _TORCH_DTYPES[getattr(torch, d.name)] = d
    return _TORCH_DTYPES.get(t.dtype)


class DeviceTensor:
    """What the op bookkeeping needs from a CUDA tensor (a `Buffer` has no device memory)."""

    __slots__ = ("dtype", "nbytes", "obj", "shape")

    def __init__(self, t: Any) -> None:
        dtype = _dtype_of(t)
        if dtype is None:
            raise UnsupportedBuffer(f"dtype {t.dtype} is not supported; use one of {', '.join(DTYPES)}")
        if not t.is_contiguous():
            raise UnsupportedBuffer(f"tensor of shape {tuple(t.shape)} is not contiguous; pass t.contiguous()")
        self.obj = t
        self.dtype: DType = dtype
        self.shape: tuple[int, ...] = tuple(t.shape)
        self.nbytes = t.numel() * dtype.itemsize

    def describe(self) -> str:
        return f"torch.Tensor(dtype={self.dtype.name}, shape={self.shape}, device={self.obj.device})"


def _pinned_block(nbytes: int) -> Any:
    torch = sys.modules["torch"]
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pinned_pool() -> ScratchPool:
    """Reused page-locked host blocks for staging (pinning is slow: never per call)."""
    return ScratchPool(alloc=_pinned_block, min_block=65536)


def _staged_copy_of(t: Any, inputs: list[Any], staged: list[Any]) -> Any:
    """The staged copy of `t` if `t` is one of `inputs` (an in-place op), else None."""
    for h, i in zip(staged, inputs, strict=True):
        if i is t:
            return h
    return None


class DeviceOps:
    """The device side of one `Communicator`."""

    def __init__(self, comm: Communicator, backend: str, host: str) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.comm = comm
        self.backend = backend
        self.host = host
        self.pinned = pinned_pool()
        self._lanes: dict[tuple[str, int], TorchLane | LaneUnavailable] = {}  # by (device type, priority)
        self.open_lanes: dict[int, TorchLane] = {}  # the usable CUDA ones by priority, for the per-op fast path
        self.device_lanes: dict[tuple[str, int], TorchLane] = {}  # every usable one, by (device type, priority)
        self._routes: dict[str, str | None] = {}  # device type -> vendor lane name (None: host)
        self._streams: dict[tuple[Any, int], Any] = {}
        self._check = self._make_watchdog()

    def stream(self, dev: Any, priority: int) -> Any:
        """This group's communication stream on `dev` at `priority` (staging copies, DMA)."""
        key = (dev, priority)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = device.new_comm_stream(dev, priority)
        return stream

    # -- choosing the path ---------------------------------------------------------------
    def route(self, dev: Any) -> str | None:
        """The vendor lane ("nccl", "hccl", "cncl") tensors on `dev` take in this group, or None
        (host staging); raises UnsupportedBuffer where this group's backend cannot move them."""
        kind = dev.type
        if kind in self._routes:
            return self._routes[kind]
        name = vendor.lane_name(kind, self.backend, dev)
        self._routes[kind] = name
        return name

    def ready(self, dev: Any, priority: int) -> TorchLane | None:
        """The lane already open for tensors on `dev` at `priority`, or None (p2p never opens one)."""
        self.route(dev)
        return self.device_lanes.get((dev.type, priority))

    async def lane(self, dev: Any, priority: int, op: str = "") -> TorchLane | None:
        """This group's lane for tensors on `dev` at `priority`, opened on first use; None: stage
        CUDA tensors through the host. Tensors of other devices get a lane or an error."""
        kind = dev.type
        name = self.route(dev)
        if op not in NCCL_OPS or name is None:
            if kind == "cuda":
                return None  # staged
            raise UnsupportedBuffer(f"{op!r} on a tensor on {dev}: the {vendor.label(name or '')} lane reduces only "
                                    f"sum, prod, min, max and avg, and {kind} tensors have no host staging; "
                                    "reduce a host copy (t.cpu()) instead")
        if kind == "cuda" and self.comm.world_size == 1 and self.backend == "auto":
            return None  # one rank has nothing to exchange (unless NCCL was asked for by name)
        key = (kind, priority)
        got = self._lanes.get(key)
        if got is None:
            try:
                got = await open_lane(self.comm, name, dev, priority, self.host)
            except LaneUnavailable as e:
                if kind != "cuda":
                    raise self._no_lane(dev, name, e) from e
                if self.backend in ("nccl", "rccl"):
                    raise
                got = e
            self._lanes[key] = got
            if isinstance(got, TorchLane):
                self.device_lanes[key] = got
                if kind == "cuda":
                    self.open_lanes[priority] = got
        if isinstance(got, TorchLane):
            return got
        if kind != "cuda":
            raise self._no_lane(dev, name, got)
        return None

    def _no_lane(self, dev: Any, name: str, e: LaneUnavailable) -> BackendUnavailable:
        label = vendor.label(name)
        return BackendUnavailable(f"a tensor on {dev} needs the {label} lane ({vendor.VENDORS[label].hardware}), "
                                  f"which group {self.comm.group_id!r} cannot open: {e}")

    def path(self, priority: int = 0) -> str:
        """"nccl" (or the vendor lane's name), "host staging" or "undecided" (no device op yet) for `priority`."""
        got = self._lanes.get(("cuda", priority))
        if got is None:  # every priority takes the same path: one decided at another priority says it
            got = next((lane for (dev, _), lane in self._lanes.items() if dev == "cuda"), None)
        if got is None:
            for (_, p), lane in self.device_lanes.items():
                if p == priority:
                    return lane.backend
            if self.backend == "host" or (self.comm.world_size == 1 and self.backend == "auto"):
                return "host staging"
            return "undecided"
        return got.backend if isinstance(got, TorchLane) else f"host staging ({got})"

    def release(self) -> list[TorchLane]:
        """Forget every lane (the communicator is closing) and return them, for `TorchLane.close`."""
        lanes = [lane for lane in self._lanes.values() if isinstance(lane, TorchLane)]
        self._lanes.clear()
        self.device_lanes.clear()
        self.open_lanes.clear()
        return lanes

    def drop_lane(self, lane: TorchLane) -> None:
        lane.abort()
        key = (lane.device_type, lane.priority)
        if self.device_lanes.get(key) is lane:
            del self.device_lanes[key]
        if self.open_lanes.get(lane.priority) is lane:
            del self.open_lanes[lane.priority]
        if self._lanes.get(key) is lane:
            self._lanes[key] = LaneUnavailable("the lane was aborted after a failure")

    # -- running on a lane ---------------------------------------------------------------
    def _make_watchdog(self) -> Callable[[], None]:
        """Raises once the group broke or a member is lost (checked on every completion poll)."""
        comm = self.comm
        g = comm._group
        peers = [comm._engine.peers[m] for m in g.members if m in comm._engine.peers]

        def check() -> None:
            if g.broken is not None:
                raise g.broken
            for p in peers:
                if p.error is not None:
                    raise PeerLost(str(p.error), peer=p.rank)

        return check

    async def await_work(self, lane: TorchLane, work: Any, key: str) -> None:
        """Wait for `work` from the loop; on any failure or cancellation abort the lane."""
        lane.waiting += 1
        try:
            if lane.polled:
                # NCCL's wait() would cost ~30 us of host time per op (and only orders streams);
                # its errors reach us through its watchdog, lost peers through `check`
                await device.poll_until(work.is_completed, key=key, check=self._check)
            else:
                await self._wait_in_thread(work)
        except BaseException as e:
            self.drop_lane(lane)
            if isinstance(e, CommError) or not isinstance(e, Exception):
                raise
            raise CommError(f"{lane.backend} failed: {e}") from e
        finally:
            lane.waiting -= 1

    async def _wait_in_thread(self, work: Any) -> None:
        """gloo: some of its works (send, recv, reduce_scatter) only progress inside wait()."""
        done = anyio.Event()

        async def watch() -> None:
            while not done.is_set():
                self._check()
                with anyio.move_on_after(0.01):
                    await done.wait()

        with unwrap_group_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                try:
                    await anyio.to_thread.run_sync(work.wait, abandon_on_cancel=True)
                finally:
                    done.set()

    # -- host staging --------------------------------------------------------------------
    async def staged_p2p(self, kind: str, t: Any, move: Callable[[Any], Awaitable[None]]) -> None:
        """A send or receive of a non-CUDA device tensor (npu, mlu) before its lane is open:
        `move(host_tensor)` sends or receives a host copy, copied back to `t` for a receive."""
        if kind == "send":
            await move(t.to("cpu"))  # waits for the device's queued work on `t`
            return
        torch = sys.modules["torch"]
        h = torch.empty(t.shape, dtype=t.dtype)
        await move(h)
        t.copy_(h)

    async def staged(self, inputs: list[Any], outputs: list[Any], priority: int,
                     host_op: Callable[[list[Any], list[Any]], Awaitable[None]]) -> None:
        """Copy CUDA `inputs` to pinned host tensors, run `host_op(host_inputs, host_outputs)`,
        copy the host outputs into the CUDA `outputs` (an output that is an input shares its
        staged copy, so in-place host ops work in place).

        The copies run on the communication stream, after the caller's queued work.
        """
        torch = sys.modules["torch"]
        dev = (inputs or outputs)[0].device
        stream = self.stream(dev, priority)
        stream.wait_stream(torch.cuda.current_stream(dev))
        blocks: list[Any] = []

        def host_like(t: Any) -> Any:
            block = self.pinned.acquire(t.numel() * t.element_size())
            blocks.append(block)
            return block[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)

        ok = False
        try:
            host_in = [host_like(t) for t in inputs]
            host_out = [_staged_copy_of(t, inputs, host_in) for t in outputs]  # in place: the staged input
            host_out = [host_like(t) if h is None else h for h, t in zip(host_out, outputs, strict=True)]
            if inputs:
                with torch.cuda.stream(stream):
                    for h, t in zip(host_in, inputs, strict=True):
                        h.copy_(t, non_blocking=True)
                await device.wait_stream(stream)
            await host_op(host_in, host_out)
            if outputs:
                with torch.cuda.stream(stream):
                    for h, t in zip(host_out, outputs, strict=True):
                        t.copy_(h, non_blocking=True)
                await device.wait_stream(stream)
            ok = True
        finally:
            if not ok:  # a copy may still be in flight: the blocks go back only once it is done
                stream.synchronize()
            for block in blocks:
                self.pinned.release(block)
