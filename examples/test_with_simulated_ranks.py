"""Testing your own multi-rank code with simulated ranks, under pytest-trio. Copy this file and adapt it.

    pip install 'sagellm-comm[trio]' pytest pytest-trio
    pytest examples/test_with_simulated_ranks.py

`sagellm_comm.testing.run_ranks(n, body, *args)` runs `body(comm, *args)` on n
simulated ranks: n tasks of the running event loop, each with a real
`Communicator` (the same collectives, matching, heartbeats and failure handling as
across processes) over in-memory links. A test of multi-rank code is then an
ordinary async test: no processes, no ports, a few milliseconds per world. A
`FaultPlan` breaks the world on purpose (a rank dies, a rank is slow, a link goes
silent), the same way every run, so the failure paths of your code can be tested too.

The tests here are marked `@pytest.mark.trio` (pytest-trio runs them on trio).
The same tests run on asyncio with `@pytest.mark.anyio` instead (anyio's pytest
plugin; the `anyio_backend` fixture picks the backends): `run_ranks` works on both.
The two plugins coexist as long as each test has one of the two marks and
pytest-trio's `trio_mode` is off (its default).

Every test is bounded with `anyio.fail_after`: a multi-rank bug very often shows as
a hang (a rank that waits for a message nobody sends), and a bounded test turns it
into a failure with a traceback instead of a stuck CI job.

The `fault_plan` and `free_port` fixtures come from sagellm-comm's pytest plugin,
registered when the package is installed (nothing to add to conftest.py).
"""

from __future__ import annotations

import math

import anyio
import numpy as np
import pytest

import sagellm_comm as sc
from sagellm_comm.testing import FaultPlan, RankKilled, run_ranks

# ================================================================================================
# The code under test: your own multi-rank functions (here in the test file; normally imported).
# ================================================================================================


async def sharded_mean(comm: sc.Communicator, shard: np.ndarray, *, timeout: float | None = None) -> float:
    """The mean of a data set split over the ranks; `shard` is this rank's part (sizes may differ)."""
    acc = np.array([shard.sum(), shard.size], dtype=np.float64)
    await comm.all_reduce(acc, timeout=timeout)  # [sum over ranks, count over ranks] on every rank
    return float(acc[0] / acc[1])


class RowParallelLinear:
    """y = x @ W with the rows of W (the input features) split over the ranks.

    Each rank multiplies its columns of x by its rows of W; the partial products sum to
    the full product, which one all_reduce gives every rank.
    """

    def __init__(self, weight: np.ndarray, rank: int, world: int) -> None:
        bounds = np.linspace(0, weight.shape[0], world + 1).astype(int)
        self.features = slice(bounds[rank], bounds[rank + 1])
        self.weight = weight[self.features].copy()

    async def __call__(self, comm: sc.Communicator, x: np.ndarray) -> np.ndarray:
        partial = x[:, self.features] @ self.weight
        await comm.all_reduce(partial)
        return partial


def shards(world: int, n: int = 1001) -> tuple[np.ndarray, list[np.ndarray]]:
    """A data set and its split over `world` ranks (uneven: 1001 values)."""
    data = np.random.default_rng(0).standard_normal(n)
    return data, np.array_split(data, world)


# ================================================================================================
# 1. The happy path: the result, on every rank, equals the single-process answer.
# ================================================================================================


@pytest.mark.trio
@pytest.mark.parametrize("world", [1, 2, 3, 4])
async def test_sharded_mean_is_the_mean_of_all_the_data(world: int) -> None:
    data, parts = shards(world)

    async def body(comm: sc.Communicator) -> float:
        # each simulated rank sees only its own shard, as a real rank would
        return await sharded_mean(comm, parts[comm.rank])

    with anyio.fail_after(10):
        results = await run_ranks(world, body)  # the bodies' return values, by rank
    assert len(set(results)) == 1  # every rank got bitwise the same value (all_reduce guarantees it)
    assert math.isclose(results[0], float(data.mean()), rel_tol=1e-12)


@pytest.mark.trio
@pytest.mark.parametrize("world", [2, 3])
async def test_row_parallel_linear_equals_the_full_matmul(world: int) -> None:
    rng = np.random.default_rng(1)
    # small integers: every sum is exact in float64, so the check can be exact equality
    weight = rng.integers(-4, 5, (12, 5)).astype(np.float64)
    x = rng.integers(-4, 5, (3, 12)).astype(np.float64)

    async def body(comm: sc.Communicator) -> np.ndarray:
        layer = RowParallelLinear(weight, comm.rank, comm.world_size)  # each rank holds only its rows
        return await layer(comm, x)

    with anyio.fail_after(10):
        results = await run_ranks(world, body)
    for y in results:
        np.testing.assert_array_equal(y, x @ weight)


# ================================================================================================
# 2. Faults. Ops are counted per rank from 0 (every collective, send and recv counts one), so
#    "rank 2 dies at its op 1" is the same instant in every run.
# ================================================================================================


async def three_means(comm: sc.Communicator, parts: list[np.ndarray], timeout: float | None = None) -> list[float]:
    """Three calls of the code under test: ops 0, 1 and 2 of this rank."""
    return [await sharded_mean(comm, parts[comm.rank], timeout=timeout) for _ in range(3)]


@pytest.mark.trio
async def test_a_killed_rank_makes_every_other_rank_raise_peer_lost() -> None:
    _, parts = shards(4)
    plan = FaultPlan().kill(rank=2, at_op=1)  # rank 2 dies as it starts its second all_reduce

    with anyio.fail_after(10):
        # return_exceptions: each rank's error comes back in its slot instead of being raised
        results = await run_ranks(4, three_means, parts, faults=plan, return_exceptions=True)
    assert isinstance(results[2], RankKilled)  # the victim's slot holds what killed it
    for r in (0, 1, 3):
        # a dead process's links reset, so its peers know at once: no timeout needed
        assert isinstance(results[r], sc.PeerLost), results[r]
        assert "rank 2 is gone" in str(results[r])


@pytest.mark.trio
async def test_without_return_exceptions_the_errors_come_as_an_exception_group(fault_plan: FaultPlan) -> None:
    """The same fault, written with the plugin's `fault_plan` fixture, and rank errors raised together."""
    _, parts = shards(3)
    fault_plan.kill(rank=0, at_op=0)

    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        await run_ranks(3, three_means, parts, faults=fault_plan)
    # the killed rank is not an error of the run (it was the plan); ranks 1 and 2 are
    assert len(info.value.exceptions) == 2
    assert all(isinstance(e, sc.PeerLost) for e in info.value.exceptions)
    # each error carries a note naming its rank, for the test report
    assert any("simulated rank 1 of 3" in note for note in info.value.exceptions[0].__notes__)


@pytest.mark.trio
async def test_a_slow_rank_changes_the_timing_not_the_result() -> None:
    data, parts = shards(3)
    plan = FaultPlan().delay(rank=1, seconds=0.05)  # every message rank 1 sends arrives 50 ms late

    t0 = anyio.current_time()
    with anyio.fail_after(10):
        results = await run_ranks(3, three_means, parts, faults=plan)
    assert anyio.current_time() - t0 >= 3 * 0.05  # the delay applied: three ops wait on rank 1
    for means in results:
        assert all(math.isclose(m, float(data.mean()), rel_tol=1e-12) for m in means)


@pytest.mark.trio
async def test_a_rank_slower_than_the_timeout_gives_comm_timeout() -> None:
    """An op's `timeout=` bounds it whatever the cause; the rank whose limit expired raises CommTimeout
    (a TimeoutError), the others learn the op was abandoned (CollectiveAborted)."""
    _, parts = shards(3)
    plan = FaultPlan().delay(rank=1, seconds=1.0)

    with anyio.fail_after(10):
        results = await run_ranks(3, three_means, parts, 0.2, faults=plan, return_exceptions=True)
    kinds = {type(r) for r in results}
    assert kinds <= {sc.CommTimeout, sc.CollectiveAborted}, results
    assert sc.CommTimeout in kinds
    assert all(isinstance(r, TimeoutError) for r in results if isinstance(r, sc.CommTimeout))


@pytest.mark.trio
async def test_a_silently_cut_link_is_found_by_heartbeats() -> None:
    """A cut link loses bytes without closing anything (a pulled cable, a frozen host): only the
    heartbeats notice. A short heartbeat timeout keeps the test short."""
    _, parts = shards(3)
    plan = FaultPlan().drop_link(0, 1, at_op=1)  # the 0-1 link goes dead as rank 0 starts its op 1

    with anyio.fail_after(10):
        results = await run_ranks(3, three_means, parts, faults=plan, heartbeat_interval=0.05,
                                  heartbeat_timeout=0.3, return_exceptions=True)
    # every rank of the group hears of it; the two ends name each other
    assert all(isinstance(r, sc.PeerLost) for r in results), results
    assert results[0].peer == 1 and results[1].peer == 0
    assert any("heartbeat timeout" in str(results[r]) for r in (0, 1))  # found by silence, not by a reset


@pytest.mark.trio
async def test_a_cut_link_with_a_short_op_timeout_is_comm_timeout() -> None:
    """The same cut with a long heartbeat timeout and a short op timeout: the op's clock runs out first.
    Which error you get says which limit fired; code that retries should handle both."""
    _, parts = shards(3)
    plan = FaultPlan().drop_link(0, 1, at_op=1)

    with anyio.fail_after(10):
        results = await run_ranks(3, three_means, parts, 0.3, faults=plan, heartbeat_timeout=30,
                                  return_exceptions=True)
    kinds = {type(r) for r in results}
    assert kinds <= {sc.CommTimeout, sc.CollectiveAborted} and sc.CommTimeout in kinds, results


@pytest.mark.trio
async def test_a_rank_that_never_calls_times_out_the_caller() -> None:
    """A bug where one rank skips a collective: without a timeout, the others would wait forever."""

    async def body(comm: sc.Communicator) -> float | None:
        if comm.rank == 1:
            await anyio.sleep(1.0)  # alive, but never calls the all_reduce
            return None
        with pytest.raises(sc.CommTimeout, match="all_reduce"):
            await sharded_mean(comm, np.ones(4), timeout=0.2)
        return 0.0

    with anyio.fail_after(10):
        results = await run_ranks(2, body)
    assert results == [0.0, None]


# ================================================================================================
# 3. The fix-up: after a failure the group is broken; the survivors split off a new group and go on.
# ================================================================================================


@pytest.mark.trio
async def test_survivors_split_off_a_new_group_and_continue() -> None:
    data, parts = shards(4)
    survivors = [0, 1, 3]

    async def body(comm: sc.Communicator) -> tuple[float, float]:
        first = await sharded_mean(comm, parts[comm.rank])  # op 0: all four ranks
        try:
            await sharded_mean(comm, parts[comm.rank])  # op 1: rank 2 dies here
            raise AssertionError("rank 2 was killed: this op cannot succeed")
        except sc.PeerLost as e:
            assert e.peer in (2, None)  # None where a rank only heard of it from another
        # the old group stays broken (every later collective raises); split needs no messages
        sub = comm.split(survivors)
        assert sub is not None and sub.world_size == 3 and sub.rank == survivors.index(comm.rank)
        # the same code runs on the new group: the mean of the survivors' data
        return first, await sharded_mean(sub, parts[comm.rank])

    with anyio.fail_after(10):
        results = await run_ranks(4, body, faults=FaultPlan().kill(rank=2, at_op=1), return_exceptions=True)
    assert isinstance(results[2], RankKilled)
    kept = np.concatenate([parts[r] for r in survivors])
    for r in survivors:
        first, after = results[r]
        assert math.isclose(first, float(data.mean()), rel_tol=1e-12)
        assert math.isclose(after, float(kept.mean()), rel_tol=1e-12)


# ================================================================================================
# 4. The same code over real sockets: two ranks in this process, rendezvous on a free port.
#    (Real processes: start them with subprocess, or torchrun, and bound them with a timeout;
#    see docs/testing.md.)
# ================================================================================================


@pytest.mark.trio
async def test_the_same_code_over_tcp(free_port: int) -> None:
    data, parts = shards(2)
    means: dict[int, float] = {}

    async def rank(r: int) -> None:
        url = f"tcp://127.0.0.1:{free_port}"
        async with sc.init_process_group(url, rank=r, world_size=2, timeout=10) as comm:
            means[r] = await sharded_mean(comm, parts[r])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rank, 0)
            tg.start_soon(rank, 1)
    assert means[0] == means[1] and math.isclose(means[0], float(data.mean()), rel_tol=1e-12)
