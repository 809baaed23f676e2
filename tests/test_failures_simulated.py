"""Failures on simulated worlds: dead ranks, cut links, slow ranks, mismatches, timeouts,
cancellation and bad arguments, and rebuilding a group afterwards.

Semantics under test (errors.py, group.py, scheduler/engine.py):
- a lost peer fails every op waiting on it with `PeerLost` and breaks every group it is in;
  the other members are told (Abort, cause "peer_lost") and raise `PeerLost` too;
- ranks that disagree on a collective all raise `CollectiveMismatch` naming both sides;
- a timeout raises `CommTimeout` on the rank whose limit expired, a cancellation ends the op on
  its rank; either way the group is broken and the other ranks raise `CollectiveAborted`;
- a broken group's later collectives raise at once; `split` on it builds a working group;
- bad arguments raise before the op takes a sequence number, so nothing breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm.testing import FaultPlan, RankKilled, run_ranks

pytestmark = pytest.mark.anyio

LARGE = 300_007


def make(rank: int, n: int = 16, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, rank, 777])
    return rng.integers(-3, 4, n).astype(dtype)


def total(ranks: list[int] | range, n: int = 16, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    return sum((make(r, n, dtype, seed) for r in ranks), np.zeros(n, dtype=dtype))


def ring_when_large(comm: sc.Communicator, n: int) -> None:
    """The cost model picks all_reduce's algorithm by predicted time, and on simulated (inproc)
    links it may pick recursive doubling at LARGE too: force the ring there, whose failure paths
    the tests with id "ring" are about."""
    if n >= LARGE and comm.cost_model is not None:
        comm.cost_model = comm.cost_model.forcing("all_reduce", "ring")


async def checked_all_reduce(comm: sc.Communicator, n: int = 16, seed: int = 0) -> np.ndarray:
    """all_reduce(sum) of this rank's `make` data, checked against the numpy sum."""
    x = make(comm.global_ranks[comm.rank], n, seed=seed)
    await comm.all_reduce(x)
    np.testing.assert_array_equal(x, total(comm.global_ranks, n, seed=seed))
    return x


class Outcome:
    """What one rank saw: the ops that completed, then the error that ended it (if any)."""

    def __init__(self) -> None:
        self.done: list[Any] = []
        self.error: BaseException | None = None
        self.elapsed: float | None = None
        self.started_at: float | None = None  # anyio.current_time() when the failing op started
        self.after: BaseException | None = None  # error of the next op on the same group
        self.rebuilt: Any = None

    @property
    def failed_at(self) -> float:
        """anyio.current_time() when the error was raised."""
        assert self.started_at is not None and self.elapsed is not None, self
        return self.started_at + self.elapsed

    def __repr__(self) -> str:
        return f"Outcome(done={len(self.done)}, error={self.error!r}, elapsed={self.elapsed})"


async def run_until_error(comm: sc.Communicator, n_ops: int, n: int = 16, late: tuple[int, int] = (-1, -1),
                          hold: float = 0.0, starts: dict[tuple[int, int], float] | None = None) -> Outcome:
    """Run `n_ops` all_reduces, recording results and the first error with its latency.

    `late` = (rank, op): that rank enters that op 0.15 s after the others, so that when it
    fails (a kill fires as it starts the op) every other rank is already waiting in it.
    `hold` keeps the communicator open that long after the error (peers may still need it).
    `starts`, if given, gets each op's start time by (rank, op): a fault plan's kill or cut fires then.
    """
    out = Outcome()
    ring_when_large(comm, n)
    for i in range(n_ops):
        x = make(comm.rank, n, seed=i)
        if (comm.rank, i) == late:
            await anyio.sleep(0.15)
        t0 = anyio.current_time()
        if starts is not None:
            starts[comm.rank, i] = t0
        out.started_at = t0
        try:
            await comm.all_reduce(x)
        except RankKilled:
            raise
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
            try:
                await comm.all_reduce(make(comm.rank, n), timeout=5)
            except sc.CommError as e2:
                out.after = e2
            await anyio.sleep(hold)
            return out
        out.done.append(x)
    return out


def check_done(outcomes: list[Any], ranks: list[int], ws: int, n: int = 16) -> None:
    for rank in ranks:
        for i, got in enumerate(outcomes[rank].done):
            np.testing.assert_array_equal(got, total(range(ws), n, seed=i))


# -- killed ranks -------------------------------------------------------------------------------


@pytest.mark.fault("rank killed as it enters an all_reduce the others wait in, 2-5 simulated ranks "
                   "(recursive doubling and ring)",
                   "PeerLost ('rank N is gone') on every survivor within 1.5 s; the ops before it correct; "
                   "the next collective raises PeerLost (group broken)")
@pytest.mark.parametrize("n", [16, LARGE], ids=["doubling", "ring"])
@pytest.mark.parametrize(("ws", "victim", "at_op"), [(2, 1, 0), (3, 0, 2), (4, 2, 1), (5, 4, 3), (5, 1, 2)])
async def test_killed_rank_fails_survivors_with_peer_lost(ws: int, victim: int, at_op: int, n: int,
                                                          detected: Callable[[float], None]) -> None:
    plan = FaultPlan().kill(victim, at_op=at_op)
    starts: dict[tuple[int, int], float] = {}
    with anyio.fail_after(20):
        results = await run_ranks(ws, run_until_error, at_op + 2, n, (victim, at_op), 0.0, starts, faults=plan,
                                  return_exceptions=True)
    assert isinstance(results[victim], RankKilled)
    assert f"rank {victim}" in str(results[victim])
    survivors = [r for r in range(ws) if r != victim]
    for r in survivors:
        out = results[r]
        assert isinstance(out, Outcome), out
        assert len(out.done) == at_op, out  # the ops before the kill completed ...
        assert type(out.error) is sc.PeerLost, out  # ... the pending one lost the peer
        assert f"rank {victim} is gone" in str(out.error)
        # which rank: see test_peer_lost_names_rank_zero / test_broken_group_later_ops_...
        assert out.error.peer in (victim, None)
        assert out.elapsed is not None and out.elapsed < 1.5  # a reset link is seen at once
        assert type(out.after) is sc.PeerLost  # the group stays broken
        assert "broken" in str(out.after)
    check_done(results, survivors, ws, n)
    # the kill fires as the victim starts op `at_op`
    detected(max(results[r].failed_at for r in survivors) - starts[victim, at_op])


@pytest.mark.fault("rank 0 killed during an all_reduce, 3 simulated ranks (rank 2 hears of it only through rank 1)",
                   "PeerLost on ranks 1 and 2, both naming rank 0")
async def test_peer_lost_names_rank_zero() -> None:
    """ws=3, rank 0 dies: rank 1 (its fold partner) sees it; rank 2 only hears of it from rank 1."""
    plan = FaultPlan().kill(0, at_op=1)
    with anyio.fail_after(20):
        results = await run_ranks(3, run_until_error, 2, 16, (0, 1), faults=plan, return_exceptions=True)
    assert isinstance(results[0], RankKilled)
    for r in (1, 2):
        assert type(results[r].error) is sc.PeerLost
    assert results[1].error.peer == 0
    assert results[2].error.peer == 0  # once None


@pytest.mark.fault("collective on a group already broken by a killed rank, 2 simulated ranks",
                   "PeerLost naming the killed rank, for the pending op and for the next one")
async def test_broken_group_later_ops_still_name_the_lost_peer() -> None:
    plan = FaultPlan().kill(1, at_op=1)
    with anyio.fail_after(20):
        results = await run_ranks(2, run_until_error, 3, 16, (1, 1), faults=plan, return_exceptions=True)
    out = results[0]
    assert type(out.error) is sc.PeerLost and out.error.peer == 1
    assert type(out.after) is sc.PeerLost
    assert out.after.peer == 1  # once None


@pytest.mark.fault("rank killed during an all_reduce, then the 3 survivors split off a new group, 4 simulated ranks",
                   "PeerLost on the survivors; the new group's all_reduces (small and ring) are correct")
async def test_survivors_rebuild_with_split_after_a_kill() -> None:
    ws, victim = 4, 1
    survivors = [0, 2, 3]

    async def body(comm: sc.Communicator) -> Outcome:
        out = await run_until_error(comm, 3, late=(victim, 1))
        assert isinstance(out.error, sc.PeerLost)
        sub = comm.split(survivors)
        assert sub is not None and sub.world_size == 3
        assert sub.rank == survivors.index(comm.rank)
        out.rebuilt = [await checked_all_reduce(sub, seed=s) for s in range(2)]
        out.rebuilt.append(await checked_all_reduce(sub, n=LARGE))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body, faults=FaultPlan().kill(victim, at_op=1),
                                  return_exceptions=True)
    assert isinstance(results[victim], RankKilled)
    for r in survivors:
        out = results[r]
        assert isinstance(out, Outcome), out
        assert len(out.done) == 1
        np.testing.assert_array_equal(out.rebuilt[0], total(survivors))
        np.testing.assert_array_equal(out.rebuilt[2], total(survivors, LARGE))


@pytest.mark.fault("rank killed during an all_reduce, then send/recv between two survivors, 3 simulated ranks",
                   "PeerLost from the all_reduce; the send/recv between survivors still delivers")
async def test_point_to_point_between_survivors_still_works() -> None:
    """A collective's failure breaks the group for collectives only; p2p between live ranks goes on."""

    async def body(comm: sc.Communicator) -> Any:
        out = await run_until_error(comm, 1, late=(2, 0))
        assert isinstance(out.error, sc.PeerLost)
        if comm.rank == 0:
            await comm.send(np.arange(5, dtype=np.int64), 1, tag=3)
            return None
        buf = np.zeros(5, dtype=np.int64)
        await comm.recv(buf, 0, tag=3, timeout=5)
        return buf

    with anyio.fail_after(20):
        results = await run_ranks(3, body, faults=FaultPlan().kill(2, at_op=0), return_exceptions=True)
    assert isinstance(results[2], RankKilled)
    assert results[0] is None
    np.testing.assert_array_equal(results[1], np.arange(5))


@pytest.mark.fault("recv from a rank killed as it starts the matching send, 2 simulated ranks",
                   "PeerLost naming the killed rank within 1.5 s")
async def test_recv_from_a_killed_rank_raises_peer_lost(detected: Callable[[float], None]) -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            await comm.send(np.zeros(4, dtype=np.float32), 1)  # op 0: killed here
            return None
        t0 = anyio.current_time()
        with pytest.raises(sc.PeerLost) as info:
            await comm.recv(np.zeros(4, dtype=np.float32), 0, timeout=10)
        assert info.value.peer == 0
        return anyio.current_time() - t0

    with anyio.fail_after(20):
        results = await run_ranks(2, body, faults=FaultPlan().kill(0, at_op=0))
    assert isinstance(results[0], RankKilled)
    assert results[1] < 1.5
    detected(results[1])  # rank 0 is killed as it starts, in the same instant rank 1 posts its recv


# -- cut links -----------------------------------------------------------------------------------


@pytest.mark.fault("link between two ranks silently cut (bytes dropped) during an all_reduce, 2-4 simulated ranks, "
                   "heartbeat timeout 0.5 s",
                   "PeerLost on every rank within 2.5 s, the two ends naming each other, one for a heartbeat "
                   "timeout; the next collective raises PeerLost")
@pytest.mark.parametrize(("ws", "a", "b"), [(2, 0, 1), (3, 2, 1), (4, 0, 1), (4, 3, 1)])
async def test_dropped_link_detected_by_heartbeats(ws: int, a: int, b: int, detected: Callable[[float], None]) -> None:
    hb_timeout = 0.5
    plan = FaultPlan().drop_link(a, b, at_op=1)
    starts: dict[tuple[int, int], float] = {}
    with anyio.fail_after(20):
        results = await run_ranks(ws, run_until_error, 3, 16, (-1, -1), 0.0, starts, faults=plan,
                                  heartbeat_interval=0.05,
                                  heartbeat_timeout=hb_timeout, return_exceptions=True)
    for r in range(ws):
        out = results[r]
        assert isinstance(out, Outcome), out
        # a rank whose op 1 did not need the cut link (or got its data through before the cut)
        # may have finished it, and then fails in op 2
        assert len(out.done) in (1, 2), out
        # the silent link is declared dead: every rank of the group hears of the lost peer
        assert type(out.error) is sc.PeerLost, out
        if r == a:
            assert out.error.peer == b
        elif r == b:
            assert out.error.peer == a
        else:
            assert out.error.peer in (a, b, None)  # None: see test_peer_lost_names_rank_zero
        assert out.elapsed is not None and out.elapsed < hb_timeout + 2.0
        assert isinstance(out.after, sc.PeerLost)
    assert min(len(results[a].done), len(results[b].done)) == 1  # the cut link stopped op 1
    # a or b declared the other lost for its silence (the other then sees the link reset)
    assert any("heartbeat timeout" in str(results[r].error) for r in (a, b))
    check_done(results, list(range(ws)), ws)
    detected(max(out.failed_at for out in results) - starts[a, 1])  # the cut happens as rank a starts op 1


@pytest.mark.fault("link between two idle ranks silently cut, 2 simulated ranks, heartbeat timeout 0.5 s",
                   "both ranks' next barrier raises PeerLost")
async def test_dropped_link_between_idle_ranks_is_noticed(detected: Callable[[float], None]) -> None:
    """A link cut while nobody uses it still ends the ranks' next op (heartbeats stop)."""
    plan = FaultPlan().drop_link(0, 1, at_op=1)
    times: dict[str, float] = {}

    async def body(comm: sc.Communicator) -> Any:
        await checked_all_reduce(comm)
        if comm.rank == 0:
            times["cut"] = anyio.current_time()
            try:
                await comm.barrier(timeout=10)  # op 1: the link goes dead here
            finally:
                times["failed"] = anyio.current_time()
        else:
            await anyio.sleep(0.8)
            await comm.barrier(timeout=10)

    with anyio.fail_after(20):
        results = await run_ranks(2, body, faults=plan, heartbeat_interval=0.1, heartbeat_timeout=0.5,
                                  return_exceptions=True)
    assert all(type(r) is sc.PeerLost for r in results), results
    detected(times["failed"] - times["cut"])  # rank 0, waiting in its barrier since the cut


# -- slow ranks ----------------------------------------------------------------------------------


@pytest.mark.fault("every message of one rank arrives 50 ms late (slow rank or link), 2-5 simulated ranks",
                   "every collective and send/recv still gives exact results")
@pytest.mark.parametrize(("ws", "slow"), [(2, 0), (3, 1), (5, 4)])
async def test_delayed_rank_still_gives_correct_results(ws: int, slow: int) -> None:
    async def body(comm: sc.Communicator) -> Any:
        small = await checked_all_reduce(comm)
        large = await checked_all_reduce(comm, n=LARGE)
        g = await comm.all_gather(make(comm.rank, 4, "int32"))
        np.testing.assert_array_equal(g, np.stack([make(r, 4, "int32") for r in range(ws)]))
        b = make(comm.rank, 8, "int8")
        await comm.broadcast(b, root=slow)
        np.testing.assert_array_equal(b, make(slow, 8, "int8"))
        await comm.barrier()
        if comm.rank == slow:
            await comm.send(make(comm.rank, 32), (slow + 1) % ws, tag=5)
        elif comm.rank == (slow + 1) % ws:
            buf = np.zeros(32, dtype=np.float32)
            await comm.recv(buf, slow, tag=5)
            np.testing.assert_array_equal(buf, make(slow, 32))
        return small, large

    plan = FaultPlan().delay(slow, 0.05)
    t0 = anyio.current_time()
    with anyio.fail_after(30):
        results = await run_ranks(ws, body, faults=plan)
    assert anyio.current_time() - t0 >= 0.05 * 4  # the delay really applied
    for small, large in results:
        np.testing.assert_array_equal(small, total(range(ws)))
        np.testing.assert_array_equal(large, total(range(ws), LARGE))


# -- mismatches ----------------------------------------------------------------------------------


MM_SHAPE = "ranks disagree on a collective's shape ((4,)/(5,), (2, 3)/(3, 2), ring-sized), 2-4 simulated ranks"
MM_DTYPE = "ranks disagree on a collective's dtype (numpy float32/int32, torch float16/bfloat16), 2-4 simulated ranks"
MM_OP = 'ranks disagree on the reduce op (all_reduce sum/max, reduce_scatter bor/bxor), 2-4 simulated ranks'
MM_KIND = 'ranks call different collectives (all_reduce vs all_gather or broadcast), 2-4 simulated ranks'
MM_ROOT = "ranks disagree on a broadcast's root, 2-4 simulated ranks"


def mismatch(fault: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(fault, "CollectiveMismatch on every rank within 2 s, naming both sides; the next "
                                    "collective raises CollectiveMismatch (group broken); a split of all ranks works")


def _mismatch_cases() -> list[Any]:
    f32 = np.float32

    async def shape(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.all_reduce(np.ones(5 if odd else 4, f32))

    async def shape_2d(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.all_reduce(np.ones((3, 2) if odd else (2, 3), f32))

    async def shape_large(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.all_reduce(np.ones(LARGE + (1 if odd else 0), f32))

    async def dtype(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.all_reduce(np.ones(4, np.int32 if odd else f32))

    async def lib_dtype(comm: sc.Communicator, odd: bool) -> Any:
        t = torch.ones(4, dtype=torch.bfloat16 if odd else torch.float16)
        return await comm.all_reduce(t)

    async def op(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.all_reduce(np.ones(4, f32), op="max" if odd else "sum")

    async def kind(comm: sc.Communicator, odd: bool) -> Any:
        x = np.ones(4, f32)
        return await (comm.all_gather(x) if odd else comm.all_reduce(x))

    async def kind_bcast(comm: sc.Communicator, odd: bool) -> Any:
        x = np.ones(4, f32)
        return await (comm.broadcast(x, root=0) if odd else comm.all_reduce(x))

    async def root(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.broadcast(np.ones(4, f32), root=1 if odd else 0)

    async def rs_op(comm: sc.Communicator, odd: bool) -> Any:
        return await comm.reduce_scatter(np.ones(12, np.int64), op="bxor" if odd else "bor")

    return [
        pytest.param(shape, ["shape=(4,)", "shape=(5,)"], id="shape", marks=mismatch(MM_SHAPE)),
        pytest.param(shape_2d, ["shape=(2, 3)", "shape=(3, 2)"], id="shape-2d", marks=mismatch(MM_SHAPE)),
        pytest.param(shape_large, [f"shape=({LARGE},)", f"shape=({LARGE + 1},)"], id="shape-ring",
                     marks=mismatch(MM_SHAPE)),
        pytest.param(dtype, ["dtype=float32", "dtype=int32"], id="dtype", marks=mismatch(MM_DTYPE)),
        pytest.param(lib_dtype, ["dtype=float16", "dtype=bfloat16"], id="dtype-torch", marks=mismatch(MM_DTYPE)),
        pytest.param(op, ["op=sum", "op=max"], id="op", marks=mismatch(MM_OP)),
        pytest.param(kind, ["all_reduce", "all_gather"], id="kind", marks=mismatch(MM_KIND)),
        pytest.param(kind_bcast, ["all_reduce", "broadcast"], id="kind-broadcast", marks=mismatch(MM_KIND)),
        pytest.param(root, ["root=0", "root=1"], id="root", marks=mismatch(MM_ROOT)),
        pytest.param(rs_op, ["op=bor", "op=bxor"], id="reduce-scatter-op", marks=mismatch(MM_OP)),
    ]


@pytest.mark.parametrize("ws", [2, 3, 4])
@pytest.mark.parametrize(("call", "names"), _mismatch_cases())
async def test_mismatch_raises_on_every_rank_naming_both_sides(call: Any, names: list[str], ws: int,
                                                               detected: Callable[[float], None]) -> None:
    odd_rank = ws - 1

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        await checked_all_reduce(comm)  # the group works before the mismatch
        if comm.rank == odd_rank:
            # the odd one out comes last, so the others are all waiting in the op when it
            # does (see test_mismatch_found_while_sending_still_fails_the_op for the other case)
            await anyio.sleep(0.15)
        t0 = out.started_at = anyio.current_time()
        try:
            await call(comm, comm.rank == odd_rank)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        try:
            await comm.all_reduce(make(comm.rank), timeout=5)
        except sc.CommError as e:
            out.after = e
        # survivors rebuild: every rank is alive, so a split of all of them works
        sub = comm.split(list(range(comm.world_size)))
        assert sub is not None
        out.rebuilt = await checked_all_reduce(sub, n=64, seed=3)
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body, timeout=3, return_exceptions=True)
    for r, out in enumerate(results):
        assert isinstance(out, Outcome), out
        assert type(out.error) is sc.CollectiveMismatch, (r, out)
        msg = str(out.error)
        for name in names:
            assert name in msg, (r, msg)
        assert out.elapsed is not None and out.elapsed < 2.0
        assert type(out.after) is sc.CollectiveMismatch  # the group is broken afterwards
        assert "broken" in str(out.after)
        np.testing.assert_array_equal(out.rebuilt, total(range(ws), 64, seed=3))
    # from the odd rank's call (the others already wait in the op) to the last rank's error
    detected(max(out.failed_at for out in results) - results[odd_rank].started_at)


@pytest.mark.fault("both ranks call broadcast as its root while one is slow (each write takes 0.3 s), "
                   "2 simulated ranks",
                   "CollectiveMismatch on both ranks, the slow one within 1 s")
async def test_mismatch_found_while_sending_still_fails_the_op(detected: Callable[[float], None]) -> None:
    """ws=2 broadcast, both ranks think they are root; rank 1 is slow (every write takes 0.3 s).

    Rank 1 sees rank 0's frame (root=0) at once, while its own send is still under way and it
    has no receive posted; after the send it posts the closing agreement round's receive.
    """

    finished = anyio.Event()

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        t0 = out.started_at = anyio.current_time()
        try:
            await comm.broadcast(np.ones(4, np.float32), root=comm.rank, timeout=1.2)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        if comm.rank == 1:
            finished.set()
        with anyio.move_on_after(10):
            await finished.wait()  # stay connected: rank 1 must not learn of it from a closing peer
        return out

    with anyio.fail_after(20):
        results = await run_ranks(2, body, faults=FaultPlan().delay(1, 0.3), return_exceptions=True)
    assert type(results[0].error) is sc.CollectiveMismatch
    assert type(results[1].error) is sc.CollectiveMismatch, results[1]  # once CommTimeout after 1.2 s
    assert results[1].elapsed < 1.0
    detected(max(out.elapsed for out in results))  # both ranks call at once, each the wrong way


@pytest.mark.fault("a rank's timeout (0.15 s) aborts an all_reduce while a slow peer (0.3 s per write) is "
                   "still sending and another rank never calls, 4 simulated ranks",
                   "CommTimeout on the timing-out rank; CollectiveAborted on the others, the slow one within 1.2 s")
async def test_abort_while_sending_still_fails_the_op(detected: Callable[[float], None]) -> None:
    """ws=4 doubling all_reduce; rank 1 is slow; rank 2 never calls; rank 3 times out at 0.15 s.

    When rank 3's Abort reaches rank 1, rank 1 has received round 0 and is still sending its own
    round-0 data (0.3 s); it then posts round 1's receive from rank 3, who will never answer.
    """
    finished = anyio.Event()

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        t0 = out.started_at = anyio.current_time()
        try:
            if comm.rank == 1:
                try:
                    await comm.all_reduce(make(1), timeout=1.5)
                finally:
                    finished.set()
            elif comm.rank == 3:
                await comm.all_reduce(make(3), timeout=0.15)
            elif comm.rank == 0:
                await comm.all_reduce(make(0), timeout=10)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        with anyio.move_on_after(10):
            await finished.wait()  # stay connected: rank 1 must not learn of it from a closing peer
        return out

    with anyio.fail_after(20):
        results = await run_ranks(4, body, faults=FaultPlan().delay(1, 0.3), return_exceptions=True)
    assert type(results[3].error) is sc.CommTimeout
    assert type(results[0].error) is sc.CollectiveAborted
    assert type(results[1].error) is sc.CollectiveAborted, results[1]  # once CommTimeout after 1.5 s
    assert results[1].elapsed < 1.2
    detected(results[1].failed_at - results[3].failed_at)  # from rank 3's timeout to the slow rank's abort


# -- timeouts ------------------------------------------------------------------------------------


@pytest.mark.fault("rank skips an all_reduce its peer calls with timeout=1 s, 2 simulated ranks",
                   "CommTimeout (a TimeoutError naming all_reduce) on the caller after 0.9-3 s; CollectiveAborted "
                   "('timed out') on the skipper's next collective; both then rebuild with split")
async def test_rank_skipping_a_collective_times_out_the_caller(detected: Callable[[float], None]) -> None:
    """ws=2: rank 0 calls with timeout=1, rank 1 skips: CommTimeout, then rank 1 finds the group broken."""
    failed = anyio.Event()

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        await checked_all_reduce(comm)
        t0 = out.started_at = anyio.current_time()
        try:
            if comm.rank == 0:
                try:
                    await comm.all_reduce(make(0), timeout=1)
                finally:
                    failed.set()
            else:
                await failed.wait()
                await anyio.sleep(0.2)  # its next collective comes later (the Abort is on its way)
                await comm.all_reduce(make(1), timeout=5)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        try:
            await comm.barrier(timeout=5)
        except sc.CommError as e:
            out.after = e
        sub = comm.split([1, 0])
        assert sub is not None
        out.rebuilt = await checked_all_reduce(sub, n=LARGE)
        return out

    with anyio.fail_after(20):
        results = await run_ranks(2, body, return_exceptions=True)
    caller, skipper = results
    assert type(caller.error) is sc.CommTimeout, caller
    assert isinstance(caller.error, TimeoutError)
    assert 0.9 <= caller.elapsed < 3.0
    assert "all_reduce" in str(caller.error)
    assert type(skipper.error) is sc.CollectiveAborted, skipper
    assert "timed out" in str(skipper.error)
    assert type(caller.after) is sc.CollectiveAborted
    assert type(skipper.after) is sc.CollectiveAborted
    for out in results:
        np.testing.assert_array_equal(out.rebuilt, total([1, 0], LARGE))
    detected(caller.elapsed)  # from the call (the skip is there from the start) to its CommTimeout


@pytest.mark.fault("rank skips an all_reduce that one rank calls with timeout=0.5 s and another with 10 s, "
                   "3 simulated ranks",
                   "CommTimeout on the 0.5 s caller; CollectiveAborted on the 10 s caller within 3 s and on the "
                   "skipper's next collective; a split rebuilds the group")
async def test_skipped_collective_with_three_ranks(detected: Callable[[float], None]) -> None:
    """Rank 0 (timeout=0.5) times out; rank 1 (timeout=10) is aborted by it; rank 2 skipped."""
    t_start: list[float] = []
    failed = anyio.Event()
    n_failed = 0

    async def body(comm: sc.Communicator) -> Outcome:
        nonlocal n_failed
        out = Outcome()
        await checked_all_reduce(comm)
        t0 = out.started_at = anyio.current_time()
        t_start.append(t0)
        try:
            if comm.rank < 2:
                try:
                    await comm.all_reduce(make(comm.rank), timeout=0.5 if comm.rank == 0 else 10)
                finally:
                    n_failed += 1
                    if n_failed == 2:
                        failed.set()
            else:
                await failed.wait()
                await anyio.sleep(0.2)
                await comm.broadcast(make(2), root=2, timeout=5)  # its next collective
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        sub = comm.split([2, 0, 1])
        assert sub is not None
        out.rebuilt = await checked_all_reduce(sub)
        return out

    with anyio.fail_after(20):
        results = await run_ranks(3, body, return_exceptions=True)
    assert type(results[0].error) is sc.CommTimeout, results[0]
    assert type(results[1].error) is sc.CollectiveAborted, results[1]
    assert results[1].elapsed < 3.0  # told by rank 0, long before its own 10 s
    assert type(results[2].error) is sc.CollectiveAborted, results[2]
    assert results[2].elapsed >= 0.45
    for out in results:
        np.testing.assert_array_equal(out.rebuilt, total([2, 0, 1]))
    detected(max(results[0].elapsed, results[1].elapsed))  # the callers: from the call to their error


@pytest.mark.fault("rank skips an all_reduce that two ranks call with timeout=0.5 s, 3 simulated ranks",
                   "each caller raises CommTimeout or CollectiveAborted after 0.45-2.5 s, at least one CommTimeout; "
                   "CollectiveAborted on the skipper's next collective")
async def test_all_callers_with_same_timeout_time_out(detected: Callable[[float], None]) -> None:
    """ws=3, ranks 0 and 1 call with timeout=0.5 (rank 2 skips): both raise CommTimeout or,
    if the other's abort arrives first, CollectiveAborted; at least one times out."""
    done = anyio.Event()
    count = 0

    async def body(comm: sc.Communicator) -> Outcome:
        nonlocal count
        out = Outcome()
        await checked_all_reduce(comm)
        t0 = out.started_at = anyio.current_time()
        try:
            if comm.rank < 2:
                try:
                    await comm.all_reduce(make(comm.rank), timeout=0.5)
                finally:
                    count += 1
                    if count == 2:
                        done.set()
            else:
                await done.wait()
                await anyio.sleep(0.2)
                await comm.all_reduce(make(2), timeout=5)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        return out

    with anyio.fail_after(20):
        results = await run_ranks(3, body, return_exceptions=True)
    kinds = [type(out.error) for out in results[:2]]
    assert all(k in (sc.CommTimeout, sc.CollectiveAborted) for k in kinds), results
    assert sc.CommTimeout in kinds
    assert all(0.45 <= out.elapsed < 2.5 for out in results[:2])
    assert type(results[2].error) is sc.CollectiveAborted
    detected(max(out.elapsed for out in results[:2]))  # the callers: from the call to their error


@pytest.mark.fault("peer alive but not calling an all_reduce, no timeout argument (world default 0.3 s), "
                   "2 simulated ranks",
                   "CommTimeout after 0.25-2 s")
async def test_default_timeout_from_run_ranks(detected: Callable[[float], None]) -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 0:
            t0 = anyio.current_time()
            with pytest.raises(sc.CommTimeout):
                await comm.all_reduce(make(0))
            return anyio.current_time() - t0
        await anyio.sleep(0.8)  # alive but not calling
        return None

    with anyio.fail_after(20):
        results = await run_ranks(2, body, timeout=0.3)
    assert 0.25 <= results[0] < 2.0
    detected(results[0])


@pytest.mark.fault("peer calls an all_reduce 0.5 s late; world default timeout 0.2 s, explicit timeout=5 s "
                   "on the waiting call, 2 simulated ranks",
                   "no timeout; both ranks get the right sum")
async def test_explicit_timeout_overrides_default() -> None:
    async def body(comm: sc.Communicator) -> Any:
        if comm.rank == 1:
            await anyio.sleep(0.5)
        # default 0.2 s would expire on rank 0; the explicit 5 s does not
        return await checked_all_reduce(comm, n=8) if comm.rank else \
            await _all_reduce_with_timeout(comm, 5)

    with anyio.fail_after(20):
        results = await run_ranks(2, body, timeout=0.2)
    for x in results:
        np.testing.assert_array_equal(x, total(range(2), 8))


async def _all_reduce_with_timeout(comm: sc.Communicator, timeout: float) -> np.ndarray:
    x = make(comm.rank, 8)
    await comm.all_reduce(x, timeout=timeout)
    return x


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.fault("all_reduce cancelled on one rank after 0.15 s (others waiting, one arriving later), "
                   "2-4 simulated ranks (recursive doubling and ring)",
                   "CollectiveAborted naming the cancel on every other rank within 3 s; the next collective raises "
                   "CollectiveAborted (group broken); a split rebuilds it")
@pytest.mark.parametrize("n", [16, LARGE], ids=["doubling", "ring"])
@pytest.mark.parametrize("ws", [2, 3, 4])
async def test_cancelled_collective_aborts_the_others(ws: int, n: int, detected: Callable[[float], None]) -> None:
    canceller, late = 1, 0
    cancelled = anyio.Event()
    cancelled_at: list[float] = []

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        ring_when_large(comm, n)
        await checked_all_reduce(comm, n=n)
        x = make(comm.rank, n, seed=1)
        t0 = out.started_at = anyio.current_time()
        try:
            if comm.rank == canceller:
                with anyio.move_on_after(0.15) as scope:
                    await comm.all_reduce(x)
                assert scope.cancelled_caught
                cancelled_at.append(anyio.current_time())
                out.done.append("cancelled")
                cancelled.set()
            elif comm.rank == late:
                await cancelled.wait()
                await anyio.sleep(0.2)  # (had it started before the Abort came, it could finish)
                await comm.all_reduce(x, timeout=5)
            else:
                await comm.all_reduce(x, timeout=10)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        try:
            await comm.all_reduce(make(comm.rank, n), timeout=5)
        except sc.CommError as e:
            out.after = e
        sub = comm.split(list(range(ws)))
        assert sub is not None
        out.rebuilt = await checked_all_reduce(sub, n=n, seed=2)
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body, return_exceptions=True)
    for r, out in enumerate(results):
        assert isinstance(out, Outcome), out
        if r == canceller:
            assert out.done == ["cancelled"] and out.error is None
        else:
            assert type(out.error) is sc.CollectiveAborted, (r, out)
            assert "cancel" in str(out.error)
            assert out.elapsed < 3.0
        assert type(out.after) is sc.CollectiveAborted, (r, out)
        np.testing.assert_array_equal(out.rebuilt, total(range(ws), n, seed=2))
    waiting = [out for r, out in enumerate(results) if r not in (canceller, late)]
    if waiting:  # ranks in the op when it was cancelled (ws >= 3); the late one only calls afterwards
        detected(max(out.failed_at for out in waiting) - cancelled_at[0])


@pytest.mark.fault("ring all_reduce cancelled on one rank after part of its data moved, 3 simulated ranks",
                   "CollectiveAborted naming the cancel on the other two, the waiting one within 1 s; a split "
                   "runs large all_reduces correctly")
async def test_cancel_mid_transfer_of_a_ring(detected: Callable[[float], None]) -> None:
    """Cancel a chunked ring all-reduce that has moved part of its data (rank 2 is late, so the
    ring stalls); the others abort, and a rebuilt group runs large all-reduces correctly."""
    ws = 3
    cancelled_at: list[float] = []

    async def body(comm: sc.Communicator) -> Outcome:
        out = Outcome()
        x = make(comm.rank, LARGE)
        t0 = out.started_at = anyio.current_time()
        try:
            if comm.rank == 0:
                with anyio.move_on_after(0.2) as scope:
                    await comm.all_reduce(x)
                assert scope.cancelled_caught
                cancelled_at.append(anyio.current_time())
            elif comm.rank == 2:
                await anyio.sleep(0.4)
                await comm.all_reduce(x, timeout=10)
            else:
                await comm.all_reduce(x, timeout=10)
        except sc.CommError as e:
            out.error, out.elapsed = e, anyio.current_time() - t0
        sub = comm.split(list(range(ws)))
        assert sub is not None
        out.rebuilt = [await checked_all_reduce(sub, n=LARGE, seed=s) for s in range(2)]
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body, chunk_bytes=4096, return_exceptions=True)
    assert results[0].error is None
    for out in results[1:]:
        assert type(out.error) is sc.CollectiveAborted, out
        assert "cancel" in str(out.error)
    assert results[1].elapsed < 1.0
    for out in results:
        np.testing.assert_array_equal(out.rebuilt[1], total(range(ws), LARGE, seed=1))
    detected(results[1].failed_at - cancelled_at[0])  # rank 1 was waiting in the op (rank 2 arrives later)


# -- closing -------------------------------------------------------------------------------------


@pytest.mark.fault("rank closes its communicator while its peer waits in an all_reduce, then calls all_reduce "
                   "and send on it, 2 simulated ranks",
                   "PeerLost ('closed its communicator') naming it on the peer; CommClosed for both calls on the "
                   "closed communicator")
async def test_closed_peer_is_lost_and_closed_comm_refuses_ops(detected: Callable[[float], None]) -> None:
    times: dict[str, float] = {}

    async def body(comm: sc.Communicator) -> Any:
        await checked_all_reduce(comm)
        if comm.rank == 0:
            await anyio.sleep(0.1)
            times["closed"] = anyio.current_time()
            await comm.aclose()
            assert comm.closed
            with pytest.raises(sc.CommClosed):
                await comm.all_reduce(make(0))
            with pytest.raises(sc.CommClosed):
                await comm.send(make(0), 1)
            return None
        with pytest.raises(sc.PeerLost, match="closed its communicator") as info:
            await comm.all_reduce(make(1), timeout=10)
        times["lost"] = anyio.current_time()
        return info.value.peer

    with anyio.fail_after(20):
        results = await run_ranks(2, body)
    assert results[1] == 0
    detected(times["lost"] - times["closed"])  # from rank 0's aclose to rank 1's PeerLost


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.fault("bad arguments to collectives on one rank: list/bytes/tuple, strided, transposed, complex, "
                   "read-only or uint32 buffers; op invalid for the dtype or unknown; uneven reduce_scatter/"
                   "all_to_all sizes, 0-d tensors; root out of range or not an int; bad split rank lists",
                   "UnsupportedBuffer (a TypeError) or InvalidArgument (a ValueError) at the call on that rank; "
                   "every rank's next all_reduce and reduce_scatter are correct")
async def test_bad_arguments_raise_typed_errors_and_leave_the_group_working() -> None:
    ws = 3

    async def body(comm: sc.Communicator) -> np.ndarray:
        if comm.rank == 0:  # only rank 0 errs: a bad call must not take a sequence number
            f = np.ones(2 * ws, np.float32)
            i = np.ones(2 * ws, np.int32)
            ro = np.ones(4, np.float32)
            ro.flags.writeable = False
            cases: list[tuple[type[Exception], Any]] = [
                (sc.UnsupportedBuffer, lambda: comm.all_reduce([1.0, 2.0])),
                (sc.UnsupportedBuffer, lambda: comm.all_reduce(np.ones(8, np.float32)[::2])),
                (sc.UnsupportedBuffer, lambda: comm.all_reduce(torch.ones(4, 4).t())),
                (sc.UnsupportedBuffer, lambda: comm.all_reduce(np.ones(4, np.complex64))),
                (sc.UnsupportedBuffer, lambda: comm.all_reduce(torch.ones(4, dtype=torch.complex64))),
                (sc.UnsupportedBuffer, lambda: comm.all_reduce(ro)),
                (sc.UnsupportedBuffer, lambda: comm.broadcast(ro)),
                (sc.UnsupportedBuffer, lambda: comm.all_gather((1, 2))),
                (sc.UnsupportedBuffer, lambda: comm.reduce_scatter(np.ones(6, np.uint32))),
                (sc.UnsupportedBuffer, lambda: comm.all_to_all(b"abcdef")),
                (sc.InvalidArgument, lambda: comm.all_reduce(i, op="avg")),
                (sc.InvalidArgument, lambda: comm.all_reduce(np.ones(3, bool), op="avg")),
                (sc.InvalidArgument, lambda: comm.all_reduce(f, op="band")),
                (sc.InvalidArgument, lambda: comm.all_reduce(f, op="mean")),
                (sc.InvalidArgument, lambda: comm.reduce_scatter(f, op="nope")),
                (sc.InvalidArgument, lambda: comm.reduce_scatter(i, op="avg")),
                (sc.InvalidArgument, lambda: comm.reduce_scatter(np.ones(2 * ws + 1, np.float32))),
                (sc.InvalidArgument, lambda: comm.reduce_scatter(np.array(1.0, np.float32))),
                (sc.InvalidArgument, lambda: comm.all_to_all(np.ones(ws + 1, np.float32))),
                (sc.InvalidArgument, lambda: comm.all_to_all(np.array(1, np.int64))),
                (sc.InvalidArgument, lambda: comm.broadcast(f, root=ws)),
                (sc.InvalidArgument, lambda: comm.broadcast(f, root=-1)),
                (sc.InvalidArgument, lambda: comm.broadcast(f, root="0")),
            ]
            for exc, call in cases:
                with pytest.raises(exc):
                    await call()
            for bad in ([], [0, 0], [ws], [-1], [0, ws + 3]):
                with pytest.raises(sc.InvalidArgument):
                    comm.split(bad)
            # exceptions are also the matching builtin types
            with pytest.raises(ValueError):
                await comm.all_reduce(i, op="avg")
            with pytest.raises(TypeError):
                await comm.all_reduce("not a tensor")
        x = await checked_all_reduce(comm)
        t = torch.from_numpy(make(comm.rank, 2 * ws, "float32"))
        chunk = await comm.reduce_scatter(t, op="avg")
        return x, chunk.numpy()

    with anyio.fail_after(20):
        results = await run_ranks(ws, body, timeout=5)
    avg = total(range(ws), 2 * ws) / np.float32(ws)
    for r, (x, chunk) in enumerate(results):
        np.testing.assert_array_equal(x, total(range(ws)))
        np.testing.assert_array_equal(chunk, avg[2 * r : 2 * r + 2])


@pytest.mark.fault("the link goes silent halfway through the payload of a single-frame message being received",
                   "the receive fails with PeerLost at the heartbeat timeout (it used to wait forever)")
async def test_peer_lost_mid_payload_of_a_one_frame_message_fails_the_receive(
        detected: Callable[[float], None]) -> None:
    """Regression: a message sent as one frame was not tracked while its payload streamed in, so a peer
    lost in the middle (cut link, heartbeat timeout) left the receive waiting forever."""
    from sagellm_comm import wire
    from sagellm_comm.scheduler.engine import Engine, EngineConfig
    from sagellm_comm.transports.inproc import connection_pair

    n = 1 << 20
    ours, theirs = connection_pair()
    engine = Engine(0, 2, {1: ours}, EngineConfig(heartbeat_interval=0.1, heartbeat_timeout=0.5))
    head = wire.encode(wire.Data(mid=0, offset=0, total=n, group="p2p", seq=-1, tag=7), n)
    dest = bytearray(n)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            engine.start(tg)
            recv = engine.post(1, ("p2p", -1, 7), memoryview(dest), None)
            await theirs._send_parts([memoryview(head), memoryview(b"\x01" * (n // 2))])  # then silence
            while ours.bytes_received < len(head) + n // 2:
                await anyio.sleep(0.01)
            t0 = anyio.current_time()
            with pytest.raises(sc.PeerLost, match="rank 1 is gone"):
                await recv.wait()
            detected(anyio.current_time() - t0)
            engine.abort()
            tg.cancel_scope.cancel()
    assert bytes(dest[: n // 2]) == b"\x01" * (n // 2)  # what arrived before the loss is where it belongs
