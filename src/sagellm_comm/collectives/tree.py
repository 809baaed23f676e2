"""Binomial-tree broadcast, chunked so that large messages pipeline down the tree.

A rank forwards chunk c to its children as soon as chunk c has arrived, so the
tree's depth costs one chunk's time rather than one message's.

A tree alone lets the root (and whole subtrees) finish without hearing from the
other ranks, so a rank that called something else would go unnoticed there. A
closing dissemination round (empty frames, log2(p) rounds) makes every rank's
completion depend on every other rank having agreed on the fingerprint.
"""

from __future__ import annotations

from ..buffers import Buffer
from .context import OpContext, chunk_count, spans
from .direct import barrier

AGREE_TAG = 1 << 40  # tags of the closing agreement round, clear of chunk tags


def _parent_and_children(vrank: int, size: int) -> tuple[int, list[int]]:
    mask = 1
    parent = -1
    while mask < size:
        if vrank & mask:
            parent = vrank - mask
            break
        mask <<= 1
    children = []
    mask >>= 1
    while mask > 0:
        if vrank + mask < size:
            children.append(vrank + mask)
        mask >>= 1
    return parent, children


async def broadcast(ctx: OpContext, buf: Buffer, root: int) -> None:
    w = ctx.size
    vrank = (ctx.rank - root) % w
    vparent, vchildren = _parent_and_children(vrank, w)
    children = [(v + root) % w for v in vchildren]
    chunks = spans(0, buf.nbytes, chunk_count(buf.nbytes, ctx.chunk_bytes))
    raw = buf.raw
    async with ctx.sender() as enqueue:
        if vparent < 0:
            for c, (lo, hi) in enumerate(chunks):
                for child in children:
                    enqueue(child, c, raw[lo:hi])
        else:
            parent = (vparent + root) % w
            posted = [ctx.post(parent, c, raw[lo:hi]) for c, (lo, hi) in enumerate(chunks)]
            for c, (recv, (lo, hi)) in enumerate(zip(posted, chunks, strict=True)):
                await recv.wait()
                for child in children:
                    enqueue(child, c, raw[lo:hi])
    await barrier(ctx, AGREE_TAG)
