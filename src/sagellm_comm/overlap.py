"""Measuring overlap: which part of the communication ran while compute was running.

`comm.overlap()` is a task group whose tasks are marked as communication or
compute. Each kind's busy time is the union of its tasks' spans; the hidden time
is the part of the communication's busy time during which compute was also busy;
efficiency is hidden / min(comm, compute), 1.0 when the shorter side was hidden
entirely. The spans are what the tasks saw, so a compute task must await its GPU
work (`sc.device.wait_stream()`) for its span to cover it; and two sides that
slow each other down (sharing SMs or memory bandwidth) look longer here than
alone. `bench overlap` therefore also compares against the same loop run
sequentially.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

Span = tuple[float, float]


@dataclass
class OverlapReport:
    comm_s: float = 0.0  # time some communication task was running
    compute_s: float = 0.0  # time some compute task was running
    wall_s: float = 0.0  # the block, start to end
    hidden_s: float = 0.0  # communication time during which compute also ran
    efficiency: float = 0.0  # hidden_s / min(comm_s, compute_s)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def union(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(spans: list[Span]) -> float:
    return sum(b - a for a, b in spans)


def intersection(x: list[Span], y: list[Span]) -> float:
    """Total length of the overlap of two sorted lists of disjoint spans."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def report(comm: list[Span], compute: list[Span], wall: float) -> OverlapReport:
    cu, pu = union(comm), union(compute)
    c, p = length(cu), length(pu)
    hidden = intersection(cu, pu)
    shorter = min(c, p)
    return OverlapReport(c, p, wall, hidden, hidden / shorter if shorter > 0 else 0.0)


class Overlap:
    """`async with comm.overlap() as ov:` then `ov.start_comm(...)` / `ov.start_compute(...)`."""

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._spans: dict[str, list[Span]] = {"comm": [], "compute": []}
        self._start = 0.0
        self.report = OverlapReport()

    async def __aenter__(self) -> Overlap:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._tg is not None
        try:
            return await self._tg.__aexit__(*exc)
        finally:
            wall = time.perf_counter() - self._start
            self.report = report(self._spans["comm"], self._spans["compute"], wall)

    def spans(self) -> dict[str, list[Span]]:
        """Each task's (start, end), in seconds from the block's start, by kind ("comm", "compute"):
        the report only sums them; a timeline (`bench overlap --plot`) draws them."""
        return {kind: sorted((a - self._start, b - self._start) for a, b in spans)
                for kind, spans in self._spans.items()}

    def start_comm(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the group, counted as communication."""
        self._start_soon("comm", fn, args)

    def start_compute(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the group, counted as compute (await the GPU work inside it)."""
        self._start_soon("compute", fn, args)

    def _start_soon(self, kind: str, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        if self._tg is None:
            raise RuntimeError("use `async with comm.overlap() as ov:` before starting tasks")
        self._tg.start_soon(self._timed, kind, fn, args)

    async def _timed(self, kind: str, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        t0 = time.perf_counter()
        try:
            await fn(*args)
        finally:
            self._spans[kind].append((t0, time.perf_counter()))
