"""CUDA IPC between processes of one host: the receiver copies blocks straight out of the sender's cache.

Opening an IPC handle costs milliseconds and maps memory for as long as it stays
open, so each allocation of a sender's cache is opened once per receiver and kept
(`OpenedHandles`); a transfer then costs one device-to-device copy per layer run,
on the receiver's communication stream, ordered after the sender's writes by an
IPC event the sender records with its offer. The sender's `send` returns only
after the receiver has waited for its copies, so the sender may reuse its blocks.
Anything that makes IPC impossible (another host, no CUDA on the receiver, a GPU
the receiver cannot see, an old driver) makes the receiver choose the stream path
instead; the offer works for both.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVChecksumError
from ..scheduler import device
from .chunks import ChannelMemory
from .layout import KVCache
from .protocol import IpcHandle, IpcTensor, Offer, OfferIpc

log = logging.getLogger("sagellm_comm.kv")

MAX_SLICE_COPIES = 64  # more separate runs than this per layer: one gather/scatter pair instead
GROUP_LAYERS = 8  # layers per copy after the first, where the caches allow (a group is reported whole)


@cache
def host_identity() -> str:
    """This boot of this host: IPC handles mean nothing anywhere else."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _torch() -> Any:
    import torch

    return torch


def _uuid(index: int) -> str:
    return str(_torch().cuda.get_device_properties(index).uuid)


class Shared:
    """A cache's allocations as IPC handles, made once per channel (sharing costs milliseconds)."""

    def __init__(self, ipc: list[IpcHandle], keys: list[IpcTensor], values: list[IpcTensor]) -> None:
        self.ipc = ipc
        self.keys = keys
        self.values = values


def share(cache: KVCache) -> Shared:
    """The IPC handles of `cache`'s allocations; an empty `Shared` where CUDA IPC is not available."""
    out = Shared([], [], [])
    try:
        allocations: dict[int, int] = {}
        for layer in range(cache.layout.num_layers):
            for t, where in ((cache.key(layer), out.keys), (cache.value(layer), out.values)):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in allocations:
                    (dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = storage._share_cuda_()
                    allocations[ptr] = len(out.ipc)
                    key = f"{_uuid(dev)}:{bytes(handle).hex()}:{offset}:{size}"  # one segment holds many storages
                    out.ipc.append(IpcHandle(key, dev, bytes(handle), size, offset, bytes(rc_handle), rc_offset,
                                             bytes(ev_handle or b""), bool(ev_sync)))
                where.append(IpcTensor(allocations[ptr], t.storage_offset() * t.element_size()))
    except Exception as e:  # sharing is an optimisation: without it the chunks stream
        log.debug("CUDA IPC handles of the KV cache are not available: %r", e)
        return Shared([], [], [])
    return out


def offer_ipc(shared: Shared, stream: Any, ids: list[int]) -> tuple[OfferIpc, Any] | None:
    """What lets the receiver copy through IPC, and the event after `stream`'s work it must wait for.

    None where IPC is not available. The caller keeps the event alive until the receiver is done.
    """
    if not shared.ipc:
        return None
    torch = _torch()
    try:
        ev = torch.cuda.Event(interprocess=True)
        ev.record(stream)
        handle = bytes(ev.ipc_handle())
    except Exception as e:
        log.debug("CUDA IPC event not available: %r", e)
        return None
    return OfferIpc(shared.ipc, shared.keys, shared.values, handle, ids), ev


class OpenedHandles:
    """The sender allocations this receiver has mapped, by (sender rank, allocation key)."""

    def __init__(self) -> None:
        self.storages: dict[tuple[int, str], Any] = {}
        self.views: dict[tuple[Any, ...], tuple[list[Any], list[Any]]] = {}  # per-layer tensors, per offer shape

    def storage(self, peer: int, h: IpcHandle, local_device: int) -> Any:
        key = (peer, h.key)
        s = self.storages.get(key)
        if s is None:
            torch = _torch()
            with torch.cuda.device(local_device):
                s = torch.UntypedStorage._new_shared_cuda(local_device, h.handle, h.size, h.offset,
                                                          h.ref_counter_handle, h.ref_counter_offset,
                                                          h.event_handle, h.event_sync_required)
            self.storages[key] = s
        return s


class Opened:
    """One transfer's view of the sender's cache: per layer K and V tensors, and its ready event."""

    def __init__(self, keys: list[Any], values: list[Any], ready: Any) -> None:
        self.keys = keys
        self.values = values
        self.ready = ready


def try_open(handles: OpenedHandles, head: Offer, offer: OfferIpc, cache: KVCache, peer: int) -> Opened | None:
    """The sender's cache mapped here, or None where the chunks must stream instead."""
    if head.device != "cuda" or not cache.is_cuda or not offer.ipc or head.host != host_identity():
        return None
    torch = _torch()
    try:
        by_uuid = {_uuid(i): i for i in range(torch.cuda.device_count())}
        shape = (cache.num_blocks, *cache.layout.block_shape)
        dtype = cache.layout.torch_dtype
        item = dtype.itemsize
        if any(t.offset % item for t in offer.keys + offer.values):
            return None
        storages = []
        for h in offer.ipc:
            local = by_uuid.get(h.key.split(":", 1)[0])
            if local is None:
                return None  # the sender's GPU is not visible here
            storages.append(handles.storage(peer, h, local))

        def tensor(t: IpcTensor) -> Any:
            s = storages[t.allocation]
            out = torch.empty(0, dtype=dtype, device=s.device)
            return out.set_(s, t.offset // item, shape)

        vkey = (peer, tuple(h.key for h in offer.ipc), tuple((t.allocation, t.offset) for t in offer.keys),
                tuple((t.allocation, t.offset) for t in offer.values), shape, dtype)
        if vkey not in handles.views:
            handles.views[vkey] = ([tensor(t) for t in offer.keys], [tensor(t) for t in offer.values])
        keys, values = handles.views[vkey]
        if keys and keys[0].size(0) != cache.num_blocks:
            return None
        ready = torch.cuda.Event.from_ipc_handle(cache.device, offer.ready_event) if offer.ready_event else None
        return Opened(keys, values, ready)
    except Exception as e:
        log.debug("CUDA IPC open failed, streaming instead: %r", e)
        return None


def paired_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of stretches where both id lists count up by one."""
    a = np.asarray(src, dtype=np.int64)
    b = np.asarray(dst, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(a) != 1) | (np.diff(b) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(a)]))
    return [(int(a[i]), int(b[i]), int(j - i)) for i, j in zip(starts, ends, strict=True)]


def stacked(tensors: Sequence[Any]) -> Any:
    """The tensors as one strided view [len, ...] where they sit evenly spaced in one allocation (as
    `KVCache.allocate` lays out every layer's K and V); None otherwise. One copy then covers many."""
    t0 = tensors[0]
    if len(tensors) == 1:
        return t0.unsqueeze(0)
    step = tensors[1].storage_offset() - t0.storage_offset()
    base = t0.untyped_storage().data_ptr()
    if step <= 0:
        return None
    for i, t in enumerate(tensors):
        if (t.untyped_storage().data_ptr() != base or t.storage_offset() != t0.storage_offset() + i * step
                or t.stride() != t0.stride() or t.shape != t0.shape):
            return None
    return t0.as_strided((len(tensors), *t0.shape), (step, *t0.stride()), t0.storage_offset())


def as_words(t: Any) -> Any:
    """`t` viewed as the widest integers its rows split into: a strided copy moves 8 bytes per element
    instead of 2 (measured on an H100: 98% of a contiguous copy's rate as int64, 55% as bf16)."""
    torch = _torch()
    row = t.size(-1) * t.element_size()
    for dt in (torch.int64, torch.int32):
        if row % dt.itemsize == 0:
            return t.view(dt)
    return t.view(torch.uint8)


def layer_groups(num_layers: int, size: int) -> list[tuple[int, int]]:
    """Layer 0 alone (decode can start on it at once), then groups of `size` layers."""
    return [(0, 1)] + [(g, min(num_layers, g + size)) for g in range(1, num_layers, size)]


class LayerCopier:
    """Copies every layer from the mapped sender cache into this cache, queued at once on a comm stream.

    Everything is queued up front, each group of layers followed by an event, so the GPU copies back
    to back while `wait(layer)` reports layers in order as their groups' events pass. Where both caches
    keep all K and V slabs evenly in one allocation, one strided copy per run of blocks covers a whole
    group of layers (a launch costs ~20 us of CPU, about what a 1k-token layer takes to copy).
    """

    def __init__(self, opened: Opened, memory: ChannelMemory, dst_ids: list[int], src_ids: list[int],
                 checksum: bool, request: object, rank: int) -> None:
        torch = _torch()
        cache = memory.cache
        self.memory = memory
        self.opened = opened
        self.cache = cache
        self.dst_ids = dst_ids
        self.checksum = checksum
        self.request = request
        self.rank = rank
        self.stream = device.comm_stream(cache.device, 0)
        self.stream.wait_stream(torch.cuda.current_stream(cache.device))  # after the owner's queued reads
        if opened.ready is not None:
            self.stream.wait_event(opened.ready)
        self.runs = paired_runs(src_ids, dst_ids)
        self.few_runs = len(self.runs) <= MAX_SLICE_COPIES
        if not self.few_runs:
            self.src_idx = torch.tensor(src_ids, dtype=torch.long, device=cache.device)
            self.dst_idx = torch.tensor(dst_ids, dtype=torch.long, device=cache.device)
        layers = cache.layout.num_layers
        # slabs in layer order, K then V: slab 2l is layer l's keys, 2l + 1 its values
        self.src_slabs = [t for i in range(layers) for t in (opened.keys[i], opened.values[i])]
        self.dst_slabs = [t for i in range(layers) for t in (cache.key(i), cache.value(i))]
        src_all = stacked(self.src_slabs) if self.few_runs else None
        dst_all = stacked(self.dst_slabs) if src_all is not None else None
        self.stacks: tuple[Any, Any] | None = (src_all, dst_all) if dst_all is not None else None
        self.groups = layer_groups(layers, GROUP_LAYERS) if self.stacks else [(i, i + 1) for i in range(layers)]
        self.events: list[Any] = []  # per group
        self.diffs: Any = None  # (checksum) per layer: source sums - copy sums, key blocks then value blocks

    @staticmethod
    def _sums(parts: list[Any]) -> Any:
        """Per slab and block, the sum of its 32-bit words (bytes where a block is not whole words): [slabs, blocks]."""
        torch = _torch()
        out = []
        for p in parts:  # [slabs, n, block_size, heads, head_dim]
            rows = p.reshape(p.size(0), p.size(1), -1).view(torch.uint8)
            out.append((rows.view(torch.int32) if rows.size(2) % 4 == 0 else rows).sum(2, dtype=torch.int64))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _group(self, g0: int, g1: int) -> Any:
        """Queue the copies (and checksums) of layers [g0, g1); returns their diffs, flat, or None."""
        torch = _torch()
        a, b = 2 * g0, 2 * g1
        if self.stacks is not None:
            src, dst = self.stacks
            s_parts = [src[a:b, s : s + n] for s, _, n in self.runs]
            d_parts = [dst[a:b, d : d + n] for _, d, n in self.runs]
            for sp, dp in zip(s_parts, d_parts, strict=True):
                as_words(dp).copy_(as_words(sp), non_blocking=True)
        elif self.few_runs:
            s_parts, d_parts = [], []
            for i in range(a, b):
                sl, dl = self.src_slabs[i], self.dst_slabs[i]
                sp = [sl[s : s + n] for s, _, n in self.runs]
                dp = [dl[d : d + n] for _, d, n in self.runs]
                for x, y in zip(sp, dp, strict=True):
                    y.copy_(x, non_blocking=True)
                if self.checksum:  # the slab's runs, gathered to be summed
                    s_parts.append(torch.cat(sp) if len(sp) > 1 else sp[0])
                    d_parts.append(torch.cat(dp) if len(dp) > 1 else dp[0])
            if not self.checksum:
                return None
            s_parts, d_parts = [torch.stack(s_parts)], [torch.stack(d_parts)]
        else:
            s_parts, d_parts = [], []
            for i in range(a, b):
                picked = self.src_slabs[i].index_select(0, self.src_idx)
                self.dst_slabs[i].index_copy_(0, self.dst_idx, picked)
                s_parts.append(picked)
                if self.checksum:
                    d_parts.append(self.dst_slabs[i].index_select(0, self.dst_idx))
            s_parts = [torch.stack(s_parts)]
            d_parts = [torch.stack(d_parts)] if d_parts else []
        if not self.checksum:
            return None
        return (self._sums(s_parts) - self._sums(d_parts)).reshape(-1)

    def fence(self) -> None:
        """Order the cache owner's later work after every copy queued here (also those of a failed transfer)."""
        _torch().cuda.current_stream(self.cache.device).wait_stream(self.stream)

    def close(self) -> None:
        if self.diffs is not None:
            self.memory.release_pinned(self.diffs)
            self.diffs = None

    def start(self) -> None:
        torch = _torch()
        n2 = 2 * len(self.dst_ids)
        host = self.memory.pinned_i64(self.cache.layout.num_layers * n2) if self.checksum else None
        self.diffs = host
        with torch.cuda.stream(self.stream):
            for g0, g1 in self.groups:
                diffs = self._group(g0, g1)
                if diffs is not None and host is not None:
                    host[g0 * n2 : g1 * n2].copy_(diffs, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.events.append(ev)

    async def wait(self, layer: int) -> None:
        """Return once `layer` is copied and its checksums matched."""
        group = next(i for i, (g0, g1) in enumerate(self.groups) if g0 <= layer < g1)
        await device.wait_event(self.events[group], key="kv ipc layers")
        if not self.checksum:
            return
        n2 = 2 * len(self.dst_ids)
        bad = self.diffs[layer * n2 : (layer + 1) * n2].nonzero()
        if bad.numel():
            j = int(bad[0])
            n = len(self.dst_ids)
            kind, pos = ("key", j) if j < n else ("value", j - n)
            raise KVChecksumError(
                f"checksum mismatch in request {self.request!r}, layer {layer}, {kind} block {pos} of the "
                f"request (rank {self.rank}'s block id {self.dst_ids[pos]}) after the CUDA IPC copy",
                request_id=self.request, layer=layer, block=pos)
