"""Recursive doubling all-reduce: log2(p) exchange rounds, for latency-bound sizes.

Non-power-of-two worlds fold the first 2*(p - 2^k) ranks in pairs before the
rounds and unfold after. Both partners of a round compute `mine op theirs` with
commutative ops, so every rank ends with bitwise-identical results.
"""

from __future__ import annotations

from ..buffers import Buffer, reduce_into, scale_avg, view_elements
from .context import OpContext

FOLD, UNFOLD = 1_000_000, 1_000_001


async def all_reduce(ctx: OpContext, buf: Buffer, op: str) -> None:
    w, r = ctx.size, ctx.rank
    pof2 = 1 << (w.bit_length() - 1)
    rem = w - pof2
    scratch = ctx.scratch(buf.nbytes)

    async def exchange(partner: int, tag: int) -> None:
        recv = ctx.post(partner, tag, scratch)
        await ctx.send(partner, tag, buf.raw)
        await recv.wait()
        reduce_into(buf.elements, view_elements(scratch, buf.dtype), op)

    if r < 2 * rem:
        if r % 2 == 0:  # folded away: hand data to r+1, get the result back
            back = ctx.post(r + 1, UNFOLD, buf.raw)
            await ctx.send(r + 1, FOLD, buf.raw)
            await back.wait()
            return
        recv = ctx.post(r - 1, FOLD, scratch)
        await recv.wait()
        reduce_into(buf.elements, view_elements(scratch, buf.dtype), op)
        vrank = r // 2
    else:
        vrank = r - rem

    mask, rnd = 1, 0
    while mask < pof2:
        vpeer = vrank ^ mask
        peer = vpeer * 2 + 1 if vpeer < rem else vpeer + rem
        await exchange(peer, rnd)
        mask <<= 1
        rnd += 1

    if op == "avg":
        scale_avg(buf.elements, w)
    if r < 2 * rem:
        await ctx.send(r - 1, UNFOLD, buf.raw)
