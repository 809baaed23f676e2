"""CUDA bytes over a transport that moves only host bytes: pinned bounce buffers, pipelined.

A connection that cannot copy device memory itself (tcp, ucx here, inproc) still
takes `DeviceBytes`: each direction gets two page-locked buffers used in turn, so
the GPU copies the next piece into one while the other is on the wire (sending),
or copies the last piece out of one while the next is read into the other
(receiving). The bytes on the wire are those of a host tensor.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ..buffers import DeviceBytes, bytes_view
from ..scheduler import device

BOUNCE_BYTES = 4 * 1024 * 1024  # per buffer; two per direction and connection, made on first use


class Bounce:
    """Two page-locked buffers of one direction, taken in turn; each remembers its last copy."""

    def __init__(self) -> None:
        torch = sys.modules["torch"]
        self.blocks = [torch.empty(BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.turn = 0

    async def take(self) -> tuple[int, Any]:
        """The next buffer (index, tensor), once the copy last made from or into it is done."""
        i = self.turn
        self.turn ^= 1
        event = self.events[i]
        if event is not None:
            await device.wait_event(event, key="bounce copy")
            self.events[i] = None
        return i, self.blocks[i]


async def device_to_host_pieces(src: DeviceBytes, bounce: Bounce) -> AsyncIterator[memoryview]:
    """`src` as host pieces of up to BOUNCE_BYTES, the next piece copying while one is sent.

    Each piece is valid until the caller asks for the one after the next.
    """
    torch = sys.modules["torch"]
    pending: deque[tuple[Any, Any, int]] = deque()  # (event, buffer, length)
    offset = 0

    async def issue() -> None:
        nonlocal offset
        i, block = await bounce.take()
        n = min(BOUNCE_BYTES, len(src) - offset)
        event = torch.cuda.Event()
        with torch.cuda.stream(src.stream):
            block[:n].copy_(src.t[offset : offset + n], non_blocking=True)
            event.record(src.stream)
        bounce.events[i] = event
        pending.append((event, block, n))
        offset += n

    while offset < len(src) and len(pending) < 2:
        await issue()
    while pending:
        event, block, n = pending.popleft()
        await device.wait_event(event, key="bounce copy")
        yield bytes_view(block[:n].numpy())
        if offset < len(src):
            await issue()


async def host_to_device_piece(dst: DeviceBytes, bounce: Bounce, read: Any) -> int:
    """Read up to BOUNCE_BYTES with `await read(host_view)` and start copying them into `dst`.

    The copy runs on `dst.stream` after this returns; the receiver waits for that
    stream before it reports the message complete.
    """
    torch = sys.modules["torch"]
    i, block = await bounce.take()
    n = min(BOUNCE_BYTES, len(dst))
    got = int(await read(bytes_view(block[:n].numpy())))
    event = torch.cuda.Event()
    with torch.cuda.stream(dst.stream):
        dst.t[:got].copy_(block[:got], non_blocking=True)
        event.record(dst.stream)
    bounce.events[i] = event
    return got
