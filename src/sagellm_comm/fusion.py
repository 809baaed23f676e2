"""Many small all_reduces as one launch: a bucket filled in call order, flushed at block exit.

A decode step or a gradient sync issues dozens of all_reduces of a few KiB each;
every launch costs fixed host and network time, so batching them into one
flattened reduction per (device, dtype, op) saves all but one of those costs. The
buckets are formed by the order in which tensors are queued, never by timing, so
every rank that queues the same tensors in the same order forms the same buckets.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from .buffers import DTYPES, as_buffer, check_op
from .errors import InvalidArgument, UnsupportedBuffer

if TYPE_CHECKING:
    from .group import Communicator

FUSE_BYTES = 64 * 1024 * 1024  # at most this many bytes per launch; larger buckets are split


class FusedBucket:
    """Queue all_reduces with `all_reduce(t, op)`; they run, fused, when the block exits."""

    def __init__(self, comm: Communicator, *, priority: str = "normal", timeout: float | None = None) -> None:
        self._comm = comm
        self._priority = priority
        self._timeout = timeout
        self._queued: list[tuple[Any, str]] = []
        self.launches = 0  # all_reduce calls the last flush made

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Queue `tensor` to be reduced in place across ranks when the bucket flushes."""
        _key(tensor, op)  # validate now, where the caller can see which tensor was wrong
        if any(t is tensor for t, _ in self._queued):
            # unfused, reducing it twice would reduce the first result again; fused, both
            # slots would hold the same single reduction: refuse rather than pick one
            raise InvalidArgument("this tensor is already queued in this fused bucket; flush() first")
        self._queued.append((tensor, op))

    async def flush(self) -> None:
        """Reduce everything queued so far: one launch per (device, dtype, op) and FUSE_BYTES."""
        queued, self._queued = self._queued, []
        buckets: dict[tuple[str, str, str], list[Any]] = {}
        for t, op in queued:
            buckets.setdefault(_key(t, op), []).append(t)
        self.launches = 0
        for (_, _, op), tensors in buckets.items():
            for part in _split(tensors):
                await self._reduce(part, op)

    async def _reduce(self, tensors: list[Any], op: str) -> None:
        self.launches += 1
        if len(tensors) == 1:
            await self._comm.all_reduce(tensors[0], op, timeout=self._timeout, priority=self._priority)
            return
        if isinstance(tensors[0], np.ndarray):
            flat = np.concatenate([t.reshape(-1) for t in tensors])
            await self._comm.all_reduce(flat, op, timeout=self._timeout, priority=self._priority)
            offset = 0
            for t in tensors:
                t.reshape(-1)[:] = flat[offset : offset + t.size]
                offset += t.size
            return
        torch = sys.modules["torch"]
        flat_t = torch.cat([t.reshape(-1) for t in tensors])
        await self._comm.all_reduce(flat_t, op, timeout=self._timeout, priority=self._priority)
        for t, piece in zip(tensors, flat_t.split([t.numel() for t in tensors]), strict=True):
            t.view(-1).copy_(piece)

    async def __aenter__(self) -> FusedBucket:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.flush()
        else:
            self._queued.clear()  # the block failed: its reductions never start, on no rank's behalf


def _key(t: Any, op: str) -> tuple[str, str, str]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        if not t.is_contiguous():
            raise UnsupportedBuffer(f"tensor of shape {tuple(t.shape)} is not contiguous; pass t.contiguous()")
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise UnsupportedBuffer(f"dtype {t.dtype} is not supported; use one of {', '.join(DTYPES)}")
        check_op(op, DTYPES[name])
        return (f"torch:{t.device}", name, op)
    buf = as_buffer(t)
    check_op(op, buf.dtype)
    return ("numpy", buf.dtype.name, op)


def _split(tensors: list[Any]) -> list[list[Any]]:
    parts: list[list[Any]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()
        if parts[-1] and size + n > FUSE_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(t)
        size += n
    return parts
