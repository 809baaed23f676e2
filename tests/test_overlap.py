"""`Communicator.overlap()`: span arithmetic on hand-made spans, then live tasks on simulated ranks."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import sagellm_comm as sc
from sagellm_comm.overlap import Overlap, intersection, length, report, union
from sagellm_comm.testing import run_ranks

# -- span arithmetic -------------------------------------------------------------------------


def test_union_merges_overlapping_and_touching_spans_in_any_order() -> None:
    assert union([]) == []
    assert union([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0), (2.0, 2.5)]) == [(0.0, 2.5), (3.0, 4.0)]
    assert union([(0.0, 10.0), (1.0, 2.0), (3.0, 4.0)]) == [(0.0, 10.0)]  # nested spans vanish
    assert union([(5.0, 6.0), (1.0, 2.0)]) == [(1.0, 2.0), (5.0, 6.0)]
    assert length(union([(0.0, 2.0), (1.0, 3.0), (1.5, 2.5)])) == 3.0  # not 2 + 2 + 1


def test_intersection_of_span_lists() -> None:
    assert intersection([(0.0, 2.0)], [(1.0, 4.0)]) == 1.0
    assert intersection([(0.0, 2.0), (3.0, 5.0)], [(1.0, 4.0)]) == 2.0
    assert intersection([(0.0, 10.0)], [(1.0, 2.0), (3.0, 4.0), (5.0, 6.5)]) == 3.5
    assert intersection([(1.0, 2.0), (3.0, 4.0), (5.0, 6.5)], [(0.0, 10.0)]) == 3.5  # symmetric
    assert intersection([(0.0, 1.0)], [(2.0, 3.0)]) == 0.0
    assert intersection([(0.0, 1.0)], [(1.0, 2.0)]) == 0.0  # touching is not overlapping
    assert intersection([], [(0.0, 1.0)]) == 0.0
    # equal ends: both lists must still be walked to the end
    assert intersection([(0.0, 2.0), (2.5, 3.0)], [(1.0, 2.0), (2.0, 4.0)]) == 1.5


def test_report_partial_overlap() -> None:
    rep = report([(0.0, 2.0)], [(1.0, 4.0)], wall=4.0)
    assert (rep.comm_s, rep.compute_s, rep.hidden_s, rep.wall_s) == (2.0, 3.0, 1.0, 4.0)
    assert rep.efficiency == pytest.approx(0.5)  # 1 s hidden of the shorter side's 2 s
    assert rep.to_dict() == {"comm_s": 2.0, "compute_s": 3.0, "wall_s": 4.0, "hidden_s": 1.0,
                             "efficiency": pytest.approx(0.5)}


def test_report_fully_nested_is_one_either_way() -> None:
    rep = report([(1.0, 2.0)], [(0.0, 4.0)], wall=4.0)
    assert rep.hidden_s == 1.0 and rep.efficiency == pytest.approx(1.0)
    rep = report([(0.0, 4.0)], [(1.0, 2.0), (2.5, 3.0)], wall=4.0)  # compute is the shorter side
    assert rep.compute_s == 1.5 and rep.hidden_s == 1.5 and rep.efficiency == pytest.approx(1.0)


def test_report_disjoint_is_zero() -> None:
    rep = report([(0.0, 1.0)], [(2.0, 3.0)], wall=3.0)
    assert rep.hidden_s == 0.0 and rep.efficiency == 0.0
    assert (rep.comm_s, rep.compute_s) == (1.0, 1.0)


def test_report_counts_overlapping_tasks_of_one_kind_once() -> None:
    # two comm tasks running together over [0, 3] and one compute task over [2, 5]
    rep = report([(0.0, 2.0), (1.0, 3.0)], [(2.0, 5.0)], wall=5.0)
    assert rep.comm_s == 3.0 and rep.hidden_s == 1.0
    assert rep.efficiency == pytest.approx(1.0 / 3.0)


def test_report_with_one_side_missing() -> None:
    rep = report([(0.0, 1.0)], [], wall=1.0)
    assert rep.comm_s == 1.0 and rep.compute_s == 0.0 and rep.efficiency == 0.0
    assert report([], [], wall=0.0).efficiency == 0.0


def test_starting_a_task_outside_the_block_is_an_error() -> None:
    ov = Overlap()
    with pytest.raises(RuntimeError, match="async with"):
        ov.start_comm(anyio.sleep, 0)


# -- live ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_comm_and_compute_overlap() -> None:
    async def body(comm: sc.Communicator) -> tuple[Any, np.ndarray]:
        x = np.full(8, comm.rank + 1, dtype=np.float32)

        async def communicate() -> None:
            await comm.all_reduce(x)
            await anyio.sleep(0.2)

        async with comm.overlap() as ov:
            ov.start_comm(communicate)
            ov.start_compute(anyio.sleep, 0.2)
        return ov.report, x, ov.spans()

    with anyio.fail_after(10):
        results = await run_ranks(2, body)
    for rep, x, spans in results:
        np.testing.assert_array_equal(x, np.full(8, 3, dtype=np.float32))  # the comm task really ran
        # one span of each kind, from the block's start, inside the block, and the report is their sum
        assert [len(spans["comm"]), len(spans["compute"])] == [1, 1], spans
        for kind, total in (("comm", rep.comm_s), ("compute", rep.compute_s)):
            (t0, t1), = spans[kind]
            assert 0 <= t0 < 0.05 and t1 <= rep.wall_s + 1e-6, spans
            assert t1 - t0 == pytest.approx(total, abs=1e-6)
        assert rep.comm_s >= 0.19 and rep.compute_s >= 0.19, rep
        assert rep.efficiency > 0.8, rep
        assert rep.hidden_s > 0.15, rep
        assert rep.wall_s < 0.35, rep
        assert rep.wall_s >= max(rep.comm_s, rep.compute_s) - 1e-3, rep


@pytest.mark.anyio
async def test_sequential_comm_and_compute_do_not_overlap() -> None:
    async def body(comm: sc.Communicator) -> list[Any]:
        x = np.ones(8, dtype=np.float32)

        # both kinds in one block, but the compute task is started only once comm has finished
        async with comm.overlap() as ov:

            async def communicate() -> None:
                await comm.all_reduce(x)
                await anyio.sleep(0.2)
                ov.start_compute(anyio.sleep, 0.2)

            ov.start_comm(communicate)
        # and one kind per block: neither block has anything to hide behind
        async with comm.overlap() as ov_comm:
            ov_comm.start_comm(comm.all_reduce, x)
        async with comm.overlap() as ov_compute:
            ov_compute.start_compute(anyio.sleep, 0.05)
        return [ov.report, ov_comm.report, ov_compute.report]

    with anyio.fail_after(10):
        results = await run_ranks(2, body)
    for one_block, rep_comm, rep_compute in results:
        assert one_block.comm_s >= 0.19 and one_block.compute_s >= 0.19, one_block
        assert one_block.hidden_s < 0.01 and one_block.efficiency < 0.05, one_block
        assert one_block.wall_s >= 0.39, one_block
        assert rep_comm.efficiency == 0.0 and rep_comm.comm_s > 0 and rep_comm.compute_s == 0.0
        assert rep_compute.efficiency == 0.0 and rep_compute.compute_s >= 0.045 and rep_compute.comm_s == 0.0


class Boom(Exception):
    pass


def flatten(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in flatten(sub)]
    return [e]


@pytest.mark.anyio
async def test_exception_in_a_task_propagates_and_cancels_the_others() -> None:
    async def body(comm: sc.Communicator) -> dict[str, Any]:
        cancelled = False

        async def long_compute() -> None:
            nonlocal cancelled
            try:
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                cancelled = True
                raise

        async def failing_comm() -> None:
            await anyio.sleep(0.05)
            raise Boom(f"link down on rank {comm.rank}")

        caught: BaseException | None = None
        t0 = anyio.current_time()
        try:
            async with comm.overlap() as ov:
                ov.start_compute(long_compute)
                ov.start_comm(failing_comm)
        except BaseException as e:  # a Boom, possibly wrapped in an ExceptionGroup by the task group
            caught = e
        return {"caught": caught, "cancelled": cancelled, "took": anyio.current_time() - t0,
                "report": ov.report}

    with anyio.fail_after(10):
        results = await run_ranks(2, body)
    for rank, res in enumerate(results):
        assert res["caught"] is not None, "the task's exception did not leave the block"
        leaves = flatten(res["caught"])
        assert [type(e) for e in leaves] == [Boom], leaves
        assert str(leaves[0]) == f"link down on rank {rank}"
        assert res["cancelled"] and res["took"] < 5, res
        # the report is still made, with both tasks' spans
        assert res["report"].comm_s >= 0.04 and res["report"].compute_s >= 0.04, res["report"]


@pytest.mark.anyio
async def test_exception_in_the_block_body_propagates() -> None:
    async def body(comm: sc.Communicator) -> bool:
        finished = False

        async def task() -> None:
            nonlocal finished
            await anyio.sleep(30)
            finished = True

        # like any anyio task group, the block may wrap the error in an ExceptionGroup
        with pytest.raises(BaseException) as ei:
            async with comm.overlap() as ov:
                ov.start_comm(task)
                raise Boom("step failed")
        leaves = flatten(ei.value)
        assert [type(e) for e in leaves] == [Boom], leaves
        assert ov.report.comm_s < 1.0  # the task was cancelled, not waited for
        return finished

    with anyio.fail_after(10):
        assert await run_ranks(2, body) == [False, False]
