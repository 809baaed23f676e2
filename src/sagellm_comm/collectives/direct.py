"""One-step algorithms over the full mesh: every rank talks to every other directly.

Used where latency dominates (small all-gather and reduce-scatter), where the data
pattern is inherently pairwise (all-to-all), and for the barrier (dissemination:
ceil(log2 p) rounds of empty messages).
"""

from __future__ import annotations

from ..buffers import Buffer, reduce_into, scale_avg, view_elements
from .context import OpContext


async def all_gather(ctx: OpContext, out: Buffer) -> None:
    """Each rank sends its block (block `rank` of `out`) to every other rank."""
    w, r = ctx.size, ctx.rank
    block = out.nbytes // w
    posted = [ctx.post(j, 0, out.raw[j * block : (j + 1) * block]) for j in range(w) if j != r]
    mine = out.raw[r * block : (r + 1) * block]
    for k in range(1, w):
        await ctx.send((r + k) % w, 0, mine)
    for recv in posted:
        await recv.wait()


async def reduce_scatter(ctx: OpContext, inp: Buffer, out: Buffer, op: str) -> None:
    """Send chunk j of `inp` to rank j; reduce the chunks received into `out`."""
    w, r = ctx.size, ctx.rank
    block = out.nbytes
    out.raw[:] = inp.raw[r * block : (r + 1) * block]
    scratch = ctx.scratch(block * (w - 1))
    order = [(r - k) % w for k in range(1, w)]
    posted = [ctx.post(j, 0, scratch[i * block : (i + 1) * block]) for i, j in enumerate(order)]
    for k in range(1, w):
        dst = (r + k) % w
        await ctx.send(dst, 0, inp.raw[dst * block : (dst + 1) * block])
    for i, recv in enumerate(posted):
        await recv.wait()
        reduce_into(out.elements, view_elements(scratch[i * block : (i + 1) * block], out.dtype), op)
    if op == "avg":
        scale_avg(out.elements, w)


async def all_to_all(ctx: OpContext, inp: Buffer, out: Buffer) -> None:
    """Chunk j of `inp` goes to rank j; chunk j of `out` comes from rank j."""
    w, r = ctx.size, ctx.rank
    block = inp.nbytes // w
    out.raw[r * block : (r + 1) * block] = inp.raw[r * block : (r + 1) * block]
    posted = [ctx.post(j, 0, out.raw[j * block : (j + 1) * block]) for j in range(w) if j != r]
    for k in range(1, w):
        dst = (r + k) % w
        await ctx.send(dst, 0, inp.raw[dst * block : (dst + 1) * block])
    for recv in posted:
        await recv.wait()


async def barrier(ctx: OpContext, tag0: int = 0) -> None:
    """Dissemination: round k sends to rank+2^k and hears from rank-2^k.

    After the last round every rank has heard, transitively, from every other
    rank, and every frame carried the op's fingerprint: so a barrier also
    proves that all ranks agree on the op it is part of.
    """
    w, r = ctx.size, ctx.rank
    empty = memoryview(b"")
    dist, rnd = 1, tag0
    while dist < w:
        recv = ctx.post((r - dist) % w, rnd, memoryview(bytearray(0)))
        await ctx.send((r + dist) % w, rnd, empty)
        await recv.wait()
        dist <<= 1
        rnd += 1
