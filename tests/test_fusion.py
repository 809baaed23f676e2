"""`Communicator.fuse()`: many queued all_reduces, one launch per (device, dtype, op) bucket.

Every check compares the fused results with what plain, unfused `all_reduce`
gives for copies of the same inputs (and with a numpy reference), and counts
launches both through `bucket.launches` and through the communicator's stats,
so a bucket that silently ran one all_reduce per tensor, or mixed up which
slice of the flattened bucket goes back to which tensor, fails.
Data are small integers, so sums are exact whatever the reduction order.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm import fusion
from sagellm_comm.testing import run_ranks

pytestmark = pytest.mark.anyio

WORLDS = [2, 3]


def data(rank: int, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic small integers for tensor `i` of `rank` (as float64, exact in every dtype used)."""
    rng = np.random.default_rng([rank, i, 777])
    return rng.integers(-4, 5, shape).astype(np.float64)


# (library, dtype, op, shape): queued in this order, keys deliberately interleaved;
# a 0-d array, 2-D shapes and a key with a single tensor (no flattening) included
SPECS: list[tuple[str, str, str, tuple[int, ...]]] = [
    ("numpy", "float32", "sum", (5,)),
    ("numpy", "int64", "max", (3, 4)),
    ("torch", "bfloat16", "sum", (7,)),
    ("numpy", "float32", "sum", (2, 3)),
    ("torch", "float32", "sum", (4,)),  # same dtype/op as the numpy ones but another device key
    ("numpy", "int64", "max", (1,)),
    ("numpy", "float32", "sum", ()),
    ("torch", "bfloat16", "sum", (2, 2)),
    ("numpy", "int64", "max", (6,)),
    ("torch", "int64", "min", (3,)),  # the only tensor of its key
    ("numpy", "float32", "sum", (11,)),
    ("torch", "float32", "sum", (3, 3)),
    ("torch", "bfloat16", "sum", (1,)),
]
KEYS = {(lib, dtype, op) for lib, dtype, op, _ in SPECS}


def make(lib: str, dtype: str, arr: np.ndarray) -> Any:
    if lib == "numpy":
        return arr.astype(dtype)
    return torch.from_numpy(arr.copy()).to(getattr(torch, dtype))


def to_np(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.copy()
    return t.float().numpy().copy() if t.dtype == torch.bfloat16 else t.numpy().copy()


def reference(i: int, op: str, shape: tuple[int, ...], world: int) -> np.ndarray:
    ufunc = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
    acc = data(0, i, shape)
    for r in range(1, world):
        acc = ufunc(acc, data(r, i, shape))
    return acc


def calls(comm: sc.Communicator) -> int:
    c = comm.stats.counters.get("all_reduce")
    return 0 if c is None else c.calls


@pytest.mark.parametrize("world", WORLDS)
async def test_fused_values_equal_unfused_with_one_launch_per_key(world: int) -> None:
    async def body(comm: sc.Communicator) -> dict[str, Any]:
        fused = [make(lib, dt, data(comm.rank, i, shape)) for i, (lib, dt, _, shape) in enumerate(SPECS)]
        plain = [make(lib, dt, data(comm.rank, i, shape)) for i, (lib, dt, _, shape) in enumerate(SPECS)]
        for t, (_, _, op, _) in zip(plain, SPECS, strict=True):
            await comm.all_reduce(t, op)
        before, nrec = calls(comm), len(comm.stats.records)
        async with comm.fuse() as bucket:
            for t, (_, _, op, _) in zip(fused, SPECS, strict=True):
                bucket.all_reduce(t, op)
            assert calls(comm) == before  # nothing runs before the block exits
        records = list(comm.stats.records)[nrec:]
        return {"fused": fused, "plain": plain, "launches": bucket.launches,
                "calls": calls(comm) - before, "records": records}

    with anyio.fail_after(30):
        results = await run_ranks(world, body)
    total_bytes = sum(int(np.prod(shape)) * (2 if dt == "bfloat16" else np.dtype(dt).itemsize)
                      for _, dt, _, shape in SPECS)
    for rank, res in enumerate(results):
        assert res["launches"] == len(KEYS) == 5, res["launches"]
        assert res["calls"] == len(KEYS), res["calls"]  # stats: one all_reduce per key, not per tensor
        assert [r.op for r in res["records"]] == ["all_reduce"] * len(KEYS)
        assert all(r.ok for r in res["records"])
        assert sum(r.nbytes for r in res["records"]) == total_bytes  # every tensor's bytes, once
        for i, (lib, dt, op, shape) in enumerate(SPECS):
            f, p = res["fused"][i], res["plain"][i]
            assert type(f) is type(p) and tuple(f.shape) == shape and f.dtype == p.dtype, (rank, i)
            got, want = to_np(f), to_np(p)
            np.testing.assert_array_equal(got, want, err_msg=f"rank {rank} tensor {i} ({lib} {dt} {op})")
            np.testing.assert_array_equal(got, reference(i, op, shape, world).astype(got.dtype),
                                          err_msg=f"rank {rank} tensor {i}")


@pytest.mark.parametrize("world", WORLDS)
async def test_fuse_bytes_splits_a_bucket_into_more_launches_with_the_same_values(
        world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fusion, "FUSE_BYTES", 100)
    # float32 sum: 40-byte tensors, two per launch (a third would make 120 > 100),
    # and one 400-byte tensor, bigger than the limit alone, which gets its own launch
    sizes = [10, 10, 10, 100, 10, 10]
    expected_float_launches = 4  # [10, 10] [10] [100] [10, 10]
    int_sizes = [3, 3, 3]  # int64 max: 24 bytes each, all three in one launch (72 <= 100)

    async def body(comm: sc.Communicator) -> dict[str, Any]:
        fl = [data(comm.rank, i, (n,)).astype(np.float32) for i, n in enumerate(sizes)]
        it = [torch.from_numpy(data(comm.rank, 100 + i, (n,))).to(torch.int64) for i, n in enumerate(int_sizes)]
        before = calls(comm)
        async with comm.fuse() as bucket:
            for a, b in zip(fl, it, strict=False):  # interleaved, keys still bucketed by key
                bucket.all_reduce(a, "sum")
                bucket.all_reduce(b, "max")
            for a in fl[len(it):]:
                bucket.all_reduce(a, "sum")
        return {"fl": fl, "it": it, "launches": bucket.launches, "calls": calls(comm) - before}

    with anyio.fail_after(30):
        results = await run_ranks(world, body)
    for res in results:
        assert res["launches"] == expected_float_launches + 1, res["launches"]
        assert res["calls"] == res["launches"]
        for i, (a, n) in enumerate(zip(res["fl"], sizes, strict=True)):
            np.testing.assert_array_equal(a, reference(i, "sum", (n,), world).astype(np.float32))
        for i, (b, n) in enumerate(zip(res["it"], int_sizes, strict=True)):
            np.testing.assert_array_equal(b.numpy(), reference(100 + i, "max", (n,), world).astype(np.int64))


@pytest.mark.parametrize("world", WORLDS)
async def test_bad_input_raises_at_queue_time_and_is_not_queued(world: int) -> None:
    async def body(comm: sc.Communicator) -> dict[str, Any]:
        good = np.full(4, comm.rank + 1, dtype=np.float32)
        non_contig = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
        int_avg_np = np.full(3, comm.rank, dtype=np.int64)
        int_avg_t = torch.full((3,), comm.rank, dtype=torch.int32)
        kept = (non_contig.clone(), int_avg_np.copy(), int_avg_t.clone())
        errors = []
        async with comm.fuse() as bucket:
            bucket.all_reduce(good)
            for bad, op in ((non_contig, "sum"), (int_avg_np, "avg"), (int_avg_t, "avg"), (good, "mean")):
                before = calls(comm)
                with pytest.raises((sc.InvalidArgument, sc.UnsupportedBuffer)) as ei:
                    bucket.all_reduce(bad, op)
                assert calls(comm) == before  # raised by the queue call itself, before any communication
                errors.append(str(ei.value))
        return {"good": good, "bad": (non_contig, int_avg_np, int_avg_t), "kept": kept,
                "launches": bucket.launches, "errors": errors}

    with anyio.fail_after(30):
        results = await run_ranks(world, body)
    for res in results:
        # the block went on: the good tensor was reduced, in one launch; the rejected ones untouched
        np.testing.assert_array_equal(res["good"], np.full(4, world * (world + 1) / 2, dtype=np.float32))
        assert res["launches"] == 1
        assert torch.equal(res["bad"][0], res["kept"][0])
        np.testing.assert_array_equal(res["bad"][1], res["kept"][1])
        assert torch.equal(res["bad"][2], res["kept"][2])
        assert "contiguous" in res["errors"][0]
        assert "avg" in res["errors"][1] and "avg" in res["errors"][2]
        assert "mean" in res["errors"][3]


async def test_non_contiguous_numpy_array_is_refused_at_queue_time() -> None:
    async def body(comm: sc.Communicator) -> None:
        bucket = comm.fuse()
        with pytest.raises(sc.CommError):
            bucket.all_reduce(np.zeros((4, 4), dtype=np.float32)[:, ::2])
        with pytest.raises(sc.CommError):
            bucket.all_reduce([1.0, 2.0])  # not a buffer at all

    with anyio.fail_after(10):
        await run_ranks(2, body)


class Boom(Exception):
    pass


@pytest.mark.parametrize("world", WORLDS)
async def test_exception_in_block_reduces_nothing_and_propagates(world: int) -> None:
    async def body(comm: sc.Communicator) -> dict[str, Any]:
        a = np.full(5, comm.rank + 1, dtype=np.float32)
        b = torch.full((3,), comm.rank + 1, dtype=torch.int64)
        before = calls(comm)
        with pytest.raises(Boom):
            async with comm.fuse() as bucket:
                bucket.all_reduce(a)
                bucket.all_reduce(b, "max")
                raise Boom("the step failed")
        unchanged = bool((a == comm.rank + 1).all() and (b == comm.rank + 1).all())
        ran = calls(comm) - before
        # the communicator is still in step on every rank: a later fused block works
        async with comm.fuse() as again:
            again.all_reduce(a)
            again.all_reduce(b, "max")
        return {"unchanged": unchanged, "ran": ran, "launches": bucket.launches,
                "a": a, "b": b, "again": again.launches}

    with anyio.fail_after(30):
        results = await run_ranks(world, body)
    for res in results:
        assert res["unchanged"] and res["ran"] == 0 and res["launches"] == 0, res
        np.testing.assert_array_equal(res["a"], np.full(5, world * (world + 1) / 2, dtype=np.float32))
        assert res["b"].tolist() == [world] * 3
        assert res["again"] == 2


async def test_empty_block_launches_nothing() -> None:
    async def body(comm: sc.Communicator) -> tuple[int, int]:
        before = calls(comm)
        async with comm.fuse() as bucket:
            pass
        return bucket.launches, calls(comm) - before

    with anyio.fail_after(10):
        assert await run_ranks(2, body) == [(0, 0), (0, 0)]
