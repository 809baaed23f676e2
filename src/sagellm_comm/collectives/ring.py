"""Ring algorithms: bandwidth-optimal reduce-scatter and all-gather, chunked and pipelined.

Each rank sends (n-1)/n of the data and receives as much, whatever the world size.
Segments are split into chunks, and every chunk moves on as soon as it has been
reduced, so receiving chunk c+1, reducing chunk c and sending chunk c-1 overlap.
All receives are posted up front, so data lands where it belongs (scratch for
partial sums, the output itself for the gather) without an extra copy.
"""

from __future__ import annotations

from collections.abc import Callable

from ..buffers import Buffer, reduce_into, scale_avg, view_elements
from ..scheduler.matching import Recv
from .context import OpContext, chunk_count, spans

Span = tuple[int, int]
Enqueue = Callable[[int, int, memoryview], None]


def _layout(numel: int, size: int, itemsize: int, chunk_bytes: int) -> tuple[list[Span], int, list[list[Span]]]:
    segs = spans(0, numel, size)
    longest = max(hi - lo for lo, hi in segs)
    k = chunk_count(longest * itemsize, chunk_bytes)
    return segs, k, [spans(lo, hi, k) for lo, hi in segs]


def _post_gather(ctx: OpContext, buf: Buffer, chunks: list[list[Span]], k: int,
                 tag0: int) -> list[list[tuple[Recv, Span]]]:
    """Post the all-gather phase's receives straight into `buf`."""
    w, r, isz = ctx.size, ctx.rank, buf.dtype.itemsize
    left = (r - 1) % w
    posted = []
    for s in range(w - 1):
        seg = (r - s - 1) % w
        posted.append([(ctx.post(left, tag0 + s * k + c, buf.raw[lo * isz : hi * isz]), (lo, hi))
                       for c, (lo, hi) in enumerate(chunks[seg])])
    return posted


async def _run_gather(ctx: OpContext, buf: Buffer, posted: list[list[tuple[Recv, Span]]], k: int,
                      tag0: int, enqueue: Enqueue) -> None:
    """Forward each gathered chunk to the right as soon as it lands."""
    w, isz = ctx.size, buf.dtype.itemsize
    right = (ctx.rank + 1) % w
    for s, row in enumerate(posted):
        for c, (recv, (lo, hi)) in enumerate(row):
            await recv.wait()
            if s < w - 2:
                enqueue(right, tag0 + (s + 1) * k + c, buf.raw[lo * isz : hi * isz])


async def reduce_scatter_inplace(ctx: OpContext, buf: Buffer, op: str, *, then_gather: bool) -> Span:
    """Ring reduce-scatter over `buf` in place; rank r ends owning segment r (element span).

    With `then_gather`, continues into a ring all-gather: a full all-reduce.
    """
    w, r, isz = ctx.size, ctx.rank, buf.dtype.itemsize
    right, left = (r + 1) % w, (r - 1) % w
    segs, k, chunks = _layout(buf.numel, w, isz, ctx.chunk_bytes)
    seg_bytes = max(hi - lo for lo, hi in segs) * isz
    scratch = ctx.scratch((w - 1) * seg_bytes)
    el, raw = buf.elements, buf.raw

    partial: list[list[tuple[Recv, Span, memoryview]]] = []
    for s in range(w - 1):
        seg = (r - s - 2) % w
        base = s * seg_bytes - segs[seg][0] * isz
        row = []
        for c, (lo, hi) in enumerate(chunks[seg]):
            view = scratch[base + lo * isz : base + hi * isz]
            row.append((ctx.post(left, s * k + c, view), (lo, hi), view))
        partial.append(row)
    gather_tag = (w - 1) * k
    gathered = _post_gather(ctx, buf, chunks, k, gather_tag) if then_gather else []

    async with ctx.sender() as enqueue:
        for c, (lo, hi) in enumerate(chunks[(r - 1) % w]):
            enqueue(right, c, raw[lo * isz : hi * isz])
        for s, row in enumerate(partial):
            last = s == w - 2
            for c, (recv, (lo, hi), view) in enumerate(row):
                await recv.wait()
                reduce_into(el[lo:hi], view_elements(view, buf.dtype), op)
                if not last:
                    enqueue(right, (s + 1) * k + c, raw[lo * isz : hi * isz])
                    continue
                if op == "avg":
                    scale_avg(el[lo:hi], w)
                if then_gather:
                    enqueue(right, gather_tag + c, raw[lo * isz : hi * isz])
        if then_gather:
            await _run_gather(ctx, buf, gathered, k, gather_tag, enqueue)
    return segs[r]


async def all_reduce(ctx: OpContext, buf: Buffer, op: str) -> None:
    await reduce_scatter_inplace(ctx, buf, op, then_gather=True)


async def all_gather(ctx: OpContext, out: Buffer) -> None:
    """Ring all-gather over `out`, whose block `rank` already holds this rank's data."""
    w, r, isz = ctx.size, ctx.rank, out.dtype.itemsize
    _, k, chunks = _layout(out.numel, w, isz, ctx.chunk_bytes)
    posted = _post_gather(ctx, out, chunks, k, 0)
    async with ctx.sender() as enqueue:
        for c, (lo, hi) in enumerate(chunks[r]):
            enqueue((r + 1) % w, c, out.raw[lo * isz : hi * isz])
        await _run_gather(ctx, out, posted, k, 0, enqueue)
