"""The device waits' polling policy, on any machine: `poll_until` with a condition of our own.

CUDA events only answer `query()`; so does the condition here, which turns true
when another task says so. That checks what the policy promises without a GPU:
other tasks run while a wait polls, cancellation ends it at once, `check` can stop
it, the usual duration is learned per key, and a wait that knows it has long to
go sleeps instead of spinning. (tests/test_cuda.py does the same with real events.)
"""

from __future__ import annotations

import time

import anyio
import pytest

import sagellm_comm as sc
from sagellm_comm.device_ops import priority_level
from sagellm_comm.scheduler import device

pytestmark = pytest.mark.anyio


class Flag:
    def __init__(self) -> None:
        self.up = False
        self.queries = 0

    def done(self) -> bool:
        self.queries += 1
        return self.up


async def raise_after(flag: Flag, seconds: float) -> None:
    await anyio.sleep(seconds)
    flag.up = True


async def test_wait_returns_once_done_and_other_tasks_run_meanwhile() -> None:
    flag = Flag()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not flag.up:
            ticks += 1
            await anyio.sleep(0.002)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(raise_after, flag, 0.05)
            t0 = time.perf_counter()
            await device.poll_until(flag.done, key="test other tasks")
            took = time.perf_counter() - t0
    assert flag.up and 0.045 < took < 1.0
    assert ticks >= 5


async def test_already_done_returns_without_waiting() -> None:
    before = device.stats.ready_at_once
    with anyio.fail_after(5):
        await device.poll_until(lambda: True, key="test ready")
    assert device.stats.ready_at_once == before + 1


@pytest.mark.fault("device-event wait (poll_until) cancelled", "ends within 0.5 s")
async def test_cancelled_wait_ends_at_once() -> None:
    flag = Flag()
    t0 = time.perf_counter()
    with anyio.move_on_after(0.02) as scope:
        await device.poll_until(flag.done, key="test cancel")
    assert scope.cancelled_caught and time.perf_counter() - t0 < 0.5
    assert not flag.up


@pytest.mark.fault("peer lost while a device-event wait polls (its check raises PeerLost)",
                   "the wait raises PeerLost")
async def test_check_stops_the_wait_with_its_error() -> None:
    flag = Flag()
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise sc.PeerLost("rank 1 is gone", peer=1)

    with anyio.fail_after(5), pytest.raises(sc.PeerLost):
        await device.poll_until(flag.done, key="test check", check=check)


async def test_usual_duration_is_learned_and_long_waits_sleep_instead_of_spinning() -> None:
    key = "test learn"
    device.stats.expected.pop(key, None)
    for _ in range(4):
        flag = Flag()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(raise_after, flag, 0.03)
                await device.poll_until(flag.done, key=key)
    assert 0.02 < device.stats.expected[key] < 0.5
    # knowing the wait takes ~30 ms, it sleeps most of it: far fewer queries than a spin would make
    flag = Flag()
    sleeps = device.stats.sleeps
    c0 = time.process_time()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(raise_after, flag, 0.03)
            await device.poll_until(flag.done, key=key)
    cpu = time.process_time() - c0
    assert device.stats.sleeps > sleeps
    assert cpu < 0.03  # a busy-poll for the whole wait would burn about the wait itself


async def test_an_unexpected_long_wait_parks_in_loop_ticks() -> None:
    key = "test park"
    device.stats.expected.pop(key, None)
    flag = Flag()
    c0, t0 = time.process_time(), time.perf_counter()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(raise_after, flag, 0.3)
            await device.poll_until(flag.done, key=key)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert took >= 0.3
    assert flag.queries < 2000  # about one query per 1 ms tick, not a spin
    assert cpu < 0.6 * took


def test_priority_names() -> None:
    assert [priority_level(p) for p in ("high", "normal", "low")] == [1, 0, -1]
    with pytest.raises(sc.InvalidArgument, match="priority"):
        priority_level("urgent")


@pytest.mark.fault("unknown backend ('mpi') for init_process_group; unknown priority ('urgent') for an all_reduce",
                   "InvalidArgument naming the backend / the priority; the communicator still works")
async def test_bad_priority_and_backend_are_refused() -> None:
    import numpy as np

    with anyio.fail_after(30):
        with pytest.raises(sc.InvalidArgument, match="backend"):
            async with sc.init_process_group("tcp://127.0.0.1:0", rank=0, world_size=1, backend="mpi"):
                pass
        async with sc.init_process_group("tcp://127.0.0.1:0", rank=0, world_size=1) as comm:
            with pytest.raises(sc.InvalidArgument, match="priority"):
                await comm.all_reduce(np.ones(3, np.float32), priority="urgent")
            x = np.ones(3, np.float32)
            await comm.all_reduce(x, priority="high")
            assert (x == 1).all()
