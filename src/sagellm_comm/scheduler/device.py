"""Waiting for CUDA work from the event loop, without a thread and without burning a core.

A CUDA event is cheap to query (about 1 µs) and a query from the loop sees the
GPU finish within a few µs, while waking the loop from a thread (to_thread on
`synchronize`, or a host-function callback) costs 70-80 µs. So waits poll: they
busy-poll (querying between loop iterations, so every other task and every
transport keeps running) while the work is expected to finish soon, and back off
to sleeping a loop tick (1 ms) at a time when it is not. The
expectation is learned: each wait key (a stream, or a name the caller gives)
remembers how long its recent waits took, and a wait busy-polls from shortly
before that time on. Nothing polls when nothing is in flight, so an idle process
uses no CPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

SPIN_MIN = 50e-6  # always busy-poll at least this long: most comm kernels finish within it
SPIN_MAX = 2e-3  # never busy-poll longer than this past the expected finish
TICK = 1e-3  # event loops sleep in whole milliseconds (epoll's unit): the shortest real sleep
EARLY = 0.8  # start busy-polling at this fraction of the expected duration
MAX_EARLY_SLEEP = 10e-3  # sleep at most this long at once before the busy-poll window
BURST = 10e-6  # busy-poll this long between two loop iterations (never longer: other tasks wait)


@dataclass
class WaitStats:
    """Counters of this process's device waits (for tests, `info` and tuning)."""

    waits: int = 0
    ready_at_once: int = 0  # already finished at the first query
    polls: int = 0  # event queries made by waits that were not ready at once
    sleeps: int = 0  # back-off sleeps taken
    seconds: float = 0.0  # total time spent in waits that were not ready at once
    expected: dict[str, float] = field(default_factory=dict)  # learned duration per key


stats = WaitStats()


def _torch() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        import torch  # a device wait implies the caller has torch
    return torch


def _learn(key: str, took: float) -> None:
    old = stats.expected.get(key)
    stats.expected[key] = took if old is None else 0.75 * old + 0.25 * took


def _burst(done: Callable[[], bool]) -> bool:
    """Query in a tight loop for BURST seconds: True as soon as `done()` is.

    A loop iteration costs several µs and a query about one, so a short burst
    between iterations sees the finish sooner, while holding the loop no longer
    than the burst.
    """
    end = time.perf_counter() + BURST
    while time.perf_counter() < end:
        stats.polls += 1
        if done():
            return True
    return False


async def poll_until(done: Callable[[], bool], *, key: str = "default", expected: float | None = None,
                     check: Callable[[], None] | None = None) -> None:
    """Return once `done()` is true, polling adaptively from the event loop.

    `expected` (seconds) overrides the learned duration for `key`. `check` runs on
    every poll and may raise to stop waiting (a lost peer, a broken group).
    """
    stats.waits += 1
    if done():
        stats.ready_at_once += 1
        return
    start = time.perf_counter()
    guess = expected if expected is not None else stats.expected.get(key, 0.0)
    spin_until = guess + max(SPIN_MIN, min(SPIN_MAX, guess))
    polls = 0
    try:
        while True:
            polls += 1
            if check is not None:
                check()
            now = time.perf_counter() - start
            if now < spin_until:
                ahead = EARLY * guess - now  # time before the busy-poll window opens
                if ahead > 2 * TICK:  # a sleep may overshoot by a tick: stop short of the window
                    stats.sleeps += 1
                    await anyio.sleep(min(ahead - TICK, MAX_EARLY_SLEEP))
                elif _burst(done):
                    break
                else:
                    await anyio.lowlevel.checkpoint()
            else:  # later than expected: park, one tick at a time
                stats.sleeps += 1
                await anyio.sleep(TICK)
            if done():
                break
    finally:
        took = time.perf_counter() - start
        stats.polls += polls
        stats.seconds += took
    _learn(key, took)


async def wait_event(event: Any, *, key: str | None = None, expected: float | None = None,
                     check: Callable[[], None] | None = None) -> None:
    """Await a recorded `torch.cuda.Event`: return once the GPU has passed it.

    Cancellable like any await (the GPU work goes on; only the wait ends).
    key: what to learn the usual duration under (default: one shared key).
    """
    await poll_until(event.query, key=key or "event", expected=expected, check=check)


async def wait_stream(stream: Any = None, *, expected: float | None = None) -> None:
    """Await everything queued so far on `stream` (default: the current stream)."""
    torch = _torch()
    stream = stream if stream is not None else torch.cuda.current_stream()
    event = torch.cuda.Event()
    event.record(stream)
    await poll_until(event.query, key=f"stream {stream.device}:{stream.stream_id}", expected=expected)


def new_comm_stream(device: Any, priority: int = 0) -> Any:
    """A new stream for communication work on `device`.

    priority 1 ("high") gets CUDA's highest stream priority, so its kernels and
    copies are scheduled before queued work of ordinary streams.
    """
    torch = _torch()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.Stream(device=index, priority=-1 if priority > 0 else 0)  # lower is higher in CUDA


_comm_streams: dict[tuple[int, int], Any] = {}


def comm_stream(device: Any, priority: int = 0) -> Any:
    """This process's shared communication stream for `device`, one per priority level.

    Communicators use streams of their own (`new_comm_stream`); this one is for user
    code that wants a side stream for transfers, like a KV offload.
    """
    key = (device.index if device.index is not None else _torch().cuda.current_device(), priority)
    stream = _comm_streams.get(key)
    if stream is None:
        stream = _comm_streams[key] = new_comm_stream(device, priority)
    return stream
