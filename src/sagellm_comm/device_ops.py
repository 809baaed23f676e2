"""CUDA tensors in a communicator's ops: an NCCL lane where every rank has its own GPU,
host staging through pinned buffers otherwise.

Completion is the same as for host tensors: an awaited op has finished, so the
result can be read from the host and any kernel the caller launches afterwards, on
any stream, runs after it. Inputs are ordered after the work the caller queued on
its current stream before the call (the lane's stream waits for it; staging
copies run on a communication stream that waits for it), while kernels the
caller queues during the await (another task computing) are not waited for: that
is what makes overlap possible.

The lane is chosen once per group and priority, by a collective on the host path
(`open_lane`), so every rank takes the same path. Ops the backend lacks (bitwise
reductions on NCCL) are staged.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .buffers import DTYPES, DType, ScratchPool
from .errors import CommError, InvalidArgument, PeerLost, UnsupportedBuffer, unwrap_group_errors
from .scheduler import device
from .transports.nccl import LaneUnavailable, TorchLane, open_lane

if TYPE_CHECKING:
    from .group import Communicator

BACKENDS = ("auto", "nccl", "host")
NCCL_OPS = frozenset(("", "sum", "prod", "min", "max", "avg"))  # what NCCL reduces; bitwise ops are staged
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
    """The CUDA side of one `Communicator`."""

    def __init__(self, comm: Communicator, backend: str, host: str) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.comm = comm
        self.backend = backend
        self.host = host
        self.pinned = pinned_pool()
        self._lanes: dict[int, TorchLane | LaneUnavailable] = {}
        self.open_lanes: dict[int, TorchLane] = {}  # the usable ones, for the per-op fast path
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
    async def lane(self, dev: Any, priority: int) -> TorchLane | None:
        """This group's NCCL lane at `priority`, opened on first use; None: stage through the host."""
        if self.backend == "host" or (self.comm.world_size == 1 and self.backend == "auto"):
            return None  # one rank has nothing to exchange (unless NCCL was asked for by name)
        got = self._lanes.get(priority)
        if got is None:
            try:
                got = await open_lane(self.comm, "nccl", dev, priority, self.host)
            except LaneUnavailable as e:
                if self.backend == "nccl":
                    raise
                got = e
            self._lanes[priority] = got
            if isinstance(got, TorchLane):
                self.open_lanes[priority] = got
        return got if isinstance(got, TorchLane) else None

    def path(self, priority: int = 0) -> str:
        """"nccl", "host staging" or "undecided" (no CUDA op yet) for `priority`."""
        got = self._lanes.get(priority)
        if got is None:
            if self.backend == "host" or (self.comm.world_size == 1 and self.backend == "auto"):
                return "host staging"
            return "undecided"
        return "nccl" if isinstance(got, TorchLane) else f"host staging ({got})"

    def drop_lane(self, lane: TorchLane) -> None:
        lane.abort()
        if self.open_lanes.get(lane.priority) is lane:
            del self.open_lanes[lane.priority]
        if self._lanes.get(lane.priority) is lane:
            self._lanes[lane.priority] = LaneUnavailable("the lane was aborted after a failure")

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
        try:
            if lane.backend == "nccl":
                # NCCL's wait() would cost ~30 us of host time per op; its errors reach us
                # through its watchdog, lost peers through `check`
                await device.poll_until(work.is_completed, key=key, check=self._check)
            else:
                await self._wait_in_thread(work)
        except BaseException as e:
            self.drop_lane(lane)
            if isinstance(e, CommError) or not isinstance(e, Exception):
                raise
            raise CommError(f"{lane.backend} failed: {e}") from e

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
