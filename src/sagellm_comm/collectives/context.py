"""What an algorithm sees: group-local ranks, tagged sends and receives, scratch.

Algorithms are written against group ranks and small integer tags; the context
maps them to global ranks and to the (group, seq, tag) channels the engine
matches on, stamps every message with the collective's fingerprint, and cleans
up (withdraws receives, returns scratch) however the algorithm ends.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np

from ..buffers import bytes_view
from ..errors import unwrap_group_errors
from ..scheduler.engine import Engine
from ..scheduler.matching import Recv
from ..scheduler.ordering import GroupState
from ..wire import Fingerprint


class OpContext:
    def __init__(self, engine: Engine, group: GroupState, fp: Fingerprint, chunk_bytes: int, *,
                 priority: int = 0) -> None:
        self.engine = engine
        self.group = group
        self.fp = fp
        self.rank = group.rank
        self.size = group.size
        self.chunk_bytes = chunk_bytes
        self.priority = priority  # every frame this op sends queues at it (1 high, 0 normal, -1 low)
        self._recvs: list[Recv] = []
        self._blocks: list[np.ndarray[Any, Any]] = []

    def post(self, src: int, tag: int, dest: memoryview) -> Recv:
        """Post a receive from group rank `src`; bytes land in `dest` directly."""
        recv = self.engine.post(self.group.members[src], (self.group.group_id, self.fp.seq, tag), dest, self.fp)
        self._recvs.append(recv)
        return recv

    async def send(self, dst: int, tag: int, raw: memoryview) -> None:
        if self.group.broken is not None:  # stop early: peers discard this op's frames now
            raise self.group.broken
        await self.engine.send(self.group.members[dst], (self.group.group_id, self.fp.seq, tag), raw, self.fp,
                               priority=self.priority)

    def scratch(self, nbytes: int) -> memoryview:
        """Reused scratch bytes, returned to the pool when the op ends."""
        block = self.engine.pool.acquire(nbytes)
        self._blocks.append(block)
        return bytes_view(block)[:nbytes]

    def finish(self) -> None:
        for recv in self._recvs:
            if not recv.finished:
                self.engine.cancel(recv)
        self._recvs.clear()
        for block in self._blocks:
            self.engine.pool.release(block)
        self._blocks.clear()

    @asynccontextmanager
    async def sender(self) -> AsyncIterator[Callable[[int, int, memoryview], None]]:
        """A background sender, so receiving and reducing overlap with sending.

        Yields `enqueue(dst, tag, raw)`; messages go out in enqueue order, and the
        block waits for all of them before it exits.
        """
        tx, rx = anyio.create_memory_object_stream[tuple[int, int, memoryview]](math.inf)

        async def pump() -> None:
            async with rx:
                async for dst, tag, raw in rx:
                    await self.send(dst, tag, raw)

        with unwrap_group_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                with tx:
                    yield lambda dst, tag, raw: tx.send_nowait((dst, tag, raw))


def spans(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Split [lo, hi) into `parts` contiguous, nearly equal spans (some may be empty)."""
    n = hi - lo
    return [(lo + i * n // parts, lo + (i + 1) * n // parts) for i in range(parts)]


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    return max(1, -(-nbytes // max(1, chunk_bytes)))

