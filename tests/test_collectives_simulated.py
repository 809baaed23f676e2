"""Collectives on simulated worlds: every op x dtype x world size, numpy and torch, against numpy.

Data are small integers so that float sums and products are exact whatever the
reduction order; the reference is computed with the same numpy ufuncs (torch for
the bfloat16 average's final division).
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm.collectives import select
from sagellm_comm.testing import run_ranks

pytestmark = pytest.mark.anyio

NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
TORCH_DTYPES = [*NUMPY_DTYPES, "bfloat16"]
CASES = [("numpy", d) for d in NUMPY_DTYPES] + [("torch", d) for d in TORCH_DTYPES]
CASE_IDS = [f"{lib}-{d}" for lib, d in CASES]
WORLD_SIZES = [1, 2, 3, 4, 5]
FLOATS = {"float16", "bfloat16", "float32", "float64"}
FLOAT_OPS = ["sum", "prod", "min", "max", "avg"]
INT_OPS = ["sum", "prod", "min", "max", "band", "bor", "bxor"]
UFUNC = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum,
         "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}

LARGE = 300_007  # > 64 KiB for every dtype: ring; odd, so ring segments are uneven
LARGE_CASES = [("numpy", "float32"), ("numpy", "int8"), ("numpy", "float16"), ("numpy", "int64"),
               ("numpy", "bool"), ("torch", "bfloat16"), ("torch", "int32"), ("torch", "float64")]
LARGE_IDS = [f"{lib}-{d}" for lib, d in LARGE_CASES]


def ops_for(dtype: str) -> list[str]:
    return FLOAT_OPS if dtype in FLOATS else INT_OPS


def ref_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype that reference data live in (bfloat16 data are exact in float32)."""
    return np.dtype("float32" if dtype == "bfloat16" else dtype)


def make(rank: int, shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Deterministic small integer data for `rank`, as a numpy array (reference dtype)."""
    rng = np.random.default_rng([seed, rank, 12345])
    if dtype == "bool":
        vals = rng.integers(0, 2, shape).astype(bool)
    elif dtype == "uint8":
        vals = rng.integers(0, 7, shape)
    else:
        vals = rng.integers(-3, 4, shape)
    return np.asarray(vals).astype(ref_dtype(dtype))


def to_lib(arr: np.ndarray, lib: str, dtype: str) -> Any:
    if lib == "numpy":
        return arr.copy()
    return torch.from_numpy(arr.copy()).to(getattr(torch, dtype))


def to_np(obj: Any, lib: str, dtype: str) -> np.ndarray:
    """A numpy copy of `obj`, checking it is of the library and dtype the caller passed."""
    if lib == "numpy":
        assert isinstance(obj, np.ndarray), type(obj)
        assert obj.dtype == np.dtype(dtype)
        return obj.copy()
    assert isinstance(obj, torch.Tensor), type(obj)
    assert obj.dtype == getattr(torch, dtype)
    if dtype == "bfloat16":
        return obj.float().numpy().copy()
    return obj.numpy().copy()


def reference(arrs: list[np.ndarray], op: str, dtype: str) -> np.ndarray:
    ufunc = UFUNC[op]
    acc = functools.reduce(lambda a, b: ufunc(a, b), arrs)
    assert acc.dtype == ref_dtype(dtype)
    if op == "avg":
        n = len(arrs)
        if dtype == "bfloat16":
            acc = (torch.from_numpy(acc).to(torch.bfloat16) / n).float().numpy()
        else:
            acc = np.divide(acc, acc.dtype.type(n))
    return acc


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# -- all_reduce ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_all_reduce_small(lib: str, dtype: str, ws: int) -> None:
    shape = (3, 5)
    ops = ops_for(dtype)

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, str]]:
        out = []
        for i, op in enumerate(ops):
            x = to_lib(make(comm.rank, shape, dtype, seed=i), lib, dtype)
            got = await comm.all_reduce(x, op=op)
            assert got is x  # in place
            rec = comm.stats.last("all_reduce")
            assert rec is not None and rec.ok
            out.append((to_np(x, lib, dtype), rec.algorithm))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    for i, op in enumerate(ops):
        want = reference([make(r, shape, dtype, seed=i) for r in range(ws)], op, dtype)
        for rank in range(ws):
            got, algo = results[rank][i]
            assert_same(got, want)
            assert algo == ("local" if ws == 1 else "recursive_doubling")


@pytest.mark.parametrize("ws", [2, 3, 4, 5])
@pytest.mark.parametrize(("lib", "dtype"), LARGE_CASES, ids=LARGE_IDS)
async def test_all_reduce_large_uses_ring(lib: str, dtype: str, ws: int) -> None:
    ops = ops_for(dtype)

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, str]]:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        out = []
        for i, op in enumerate(ops):
            x = to_lib(make(comm.rank, (LARGE,), dtype, seed=i), lib, dtype)
            await comm.all_reduce(x, op=op)
            rec = comm.stats.last("all_reduce")
            assert rec is not None
            out.append((to_np(x, lib, dtype), rec.algorithm))
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body)
    for i, op in enumerate(ops):
        want = reference([make(r, (LARGE,), dtype, seed=i) for r in range(ws)], op, dtype)
        for rank in range(ws):
            got, algo = results[rank][i]
            nbytes = LARGE * (2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize)
            assert algo == select.all_reduce(nbytes, ws)[0] and (algo == "ring" or ws == 2)
            assert_same(got, want)


@pytest.mark.anyio
async def test_two_ranks_switch_to_the_ring_above_one_exchange() -> None:
    n = select.PAIR_EXCHANGE_BYTES // 4 + 1000  # float32 elements, just above the pair-exchange limit

    async def body(comm: sc.Communicator) -> tuple[np.ndarray, str]:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        x = np.arange(n, dtype=np.float32) * (comm.rank + 1)
        await comm.all_reduce(x)
        rec = comm.stats.last("all_reduce")
        assert rec is not None
        return x, rec.algorithm

    with anyio.fail_after(60):
        results = await run_ranks(2, body)
    for x, algo in results:
        assert algo == "ring"
        np.testing.assert_array_equal(x, np.arange(n, dtype=np.float32) * 3)


async def test_all_reduce_large_world_of_one_is_local() -> None:
    async def body(comm: sc.Communicator) -> tuple[np.ndarray, str]:
        x = make(0, (LARGE,), "float32")
        await comm.all_reduce(x, op="avg")
        rec = comm.stats.last("all_reduce")
        assert rec is not None
        return x, rec.algorithm

    with anyio.fail_after(10):
        [(got, algo)] = await run_ranks(1, body)
    assert algo == "local"
    assert_same(got, make(0, (LARGE,), "float32"))


@pytest.mark.parametrize("shape", [(), (1,), (7,), (2, 3, 4), (0,), (3, 0)], ids=str)
@pytest.mark.parametrize("ws", [2, 3])
async def test_all_reduce_shapes(shape: tuple[int, ...], ws: int) -> None:
    async def body(comm: sc.Communicator) -> tuple[np.ndarray, Any]:
        x = make(comm.rank, shape, "int64")
        t = torch.from_numpy(make(comm.rank, shape, "float32"))
        await comm.all_reduce(x)
        await comm.all_reduce(t, op="max")
        return x, t.numpy()

    with anyio.fail_after(10):
        results = await run_ranks(ws, body)
    want_x = reference([make(r, shape, "int64") for r in range(ws)], "sum", "int64")
    want_t = reference([make(r, shape, "float32") for r in range(ws)], "max", "float32")
    for x, t in results:
        assert_same(x, want_x)
        assert_same(t, want_t)


@pytest.mark.parametrize("size", [1000, LARGE], ids=["doubling", "ring"])
@pytest.mark.parametrize("chunk_bytes", [None, 4096])
@pytest.mark.parametrize("ws", [2, 3, 4, 5])
async def test_all_reduce_bitwise_identical_on_every_rank(size: int, chunk_bytes: int | None,
                                                         ws: int) -> None:
    """Random float32 data: results depend on reduction order, yet every rank agrees bitwise."""

    def data(rank: int, op: str) -> np.ndarray:
        rng = np.random.default_rng([rank, len(op), 99])
        return rng.standard_normal(size).astype(np.float32)

    ops = ["sum", "avg", "prod"]

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, str]]:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        out = []
        for op in ops:
            x = data(comm.rank, op)
            await comm.all_reduce(x, op=op)
            rec = comm.stats.last("all_reduce")
            assert rec is not None
            out.append((x, rec.algorithm))
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body, chunk_bytes=chunk_bytes)
    expected_algo = select.all_reduce(size * 4, ws)[0]  # 2 ranks: one exchange up to 4 MiB
    for i, op in enumerate(ops):
        arrs = [data(r, op).astype(np.float64) for r in range(ws)]
        want = functools.reduce(UFUNC[op], arrs)
        if op == "avg":
            want = want / ws
        first = results[0][i][0]
        for rank in range(ws):
            got, algo = results[rank][i]
            assert algo == expected_algo
            assert got.dtype == np.float32
            assert got.view(np.uint32).tobytes() == first.view(np.uint32).tobytes(), (op, rank)
        np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-5)


# -- reduce_scatter ------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_reduce_scatter_small(lib: str, dtype: str, ws: int) -> None:
    shape = (2 * ws, 3)
    ops = ops_for(dtype)

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, np.ndarray, str]]:
        out = []
        for i, op in enumerate(ops):
            src = make(comm.rank, shape, dtype, seed=i)
            x = to_lib(src, lib, dtype)
            got = await comm.reduce_scatter(x, op=op)
            assert got is not x
            assert_same(to_np(x, lib, dtype), src)  # input not modified
            rec = comm.stats.last("reduce_scatter")
            assert rec is not None
            out.append((to_np(got, lib, dtype), to_np(x, lib, dtype), rec.algorithm))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    for i, op in enumerate(ops):
        full = reference([make(r, shape, dtype, seed=i) for r in range(ws)], op, dtype)
        for rank in range(ws):
            got, _, algo = results[rank][i]
            assert_same(got, full[2 * rank : 2 * rank + 2])
            assert algo == ("local" if ws == 1 else "direct")


@pytest.mark.parametrize("ws", [2, 3, 4, 5])
@pytest.mark.parametrize(("lib", "dtype"), LARGE_CASES, ids=LARGE_IDS)
async def test_reduce_scatter_large_uses_ring(lib: str, dtype: str, ws: int) -> None:
    shape = (ws * 20_000, 3)
    ops = [*ops_for(dtype)[:3], "avg" if dtype in FLOATS else "bxor"]

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, str]]:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        out = []
        for i, op in enumerate(ops):
            src = make(comm.rank, shape, dtype, seed=i)
            x = to_lib(src, lib, dtype)
            got = await comm.reduce_scatter(x, op=op)
            assert_same(to_np(x, lib, dtype), src)
            rec = comm.stats.last("reduce_scatter")
            assert rec is not None
            out.append((to_np(got, lib, dtype), rec.algorithm))
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body, chunk_bytes=16 * 1024)
    for i, op in enumerate(ops):
        full = reference([make(r, shape, dtype, seed=i) for r in range(ws)], op, dtype)
        for rank in range(ws):
            got, algo = results[rank][i]
            assert algo == "ring"
            assert_same(got, full[20_000 * rank : 20_000 * (rank + 1)])


# -- all_gather ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_all_gather_small(lib: str, dtype: str, ws: int) -> None:
    shape = (2, 3)

    async def body(comm: sc.Communicator) -> tuple[np.ndarray, np.ndarray, str]:
        src = make(comm.rank, shape, dtype)
        x = to_lib(src, lib, dtype)
        got = await comm.all_gather(x)
        rec = comm.stats.last("all_gather")
        assert rec is not None
        return to_np(got, lib, dtype), to_np(x, lib, dtype), rec.algorithm

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    want = np.stack([make(r, shape, dtype) for r in range(ws)])
    for rank, (got, x, algo) in enumerate(results):
        assert_same(got, want)
        assert_same(x, make(rank, shape, dtype))
        assert algo == ("local" if ws == 1 else "direct")


@pytest.mark.parametrize("ws", [2, 3, 5])
@pytest.mark.parametrize(("lib", "dtype"), LARGE_CASES, ids=LARGE_IDS)
async def test_all_gather_large_uses_ring(lib: str, dtype: str, ws: int) -> None:
    shape = (70_001,)

    async def body(comm: sc.Communicator) -> tuple[np.ndarray, str]:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        got = await comm.all_gather(to_lib(make(comm.rank, shape, dtype), lib, dtype))
        rec = comm.stats.last("all_gather")
        assert rec is not None
        return to_np(got, lib, dtype), rec.algorithm

    with anyio.fail_after(30):
        results = await run_ranks(ws, body, chunk_bytes=8192)
    want = np.stack([make(r, shape, dtype) for r in range(ws)])
    for got, algo in results:
        assert algo == "ring"
        assert_same(got, want)


async def test_all_gather_accepts_read_only_input() -> None:
    async def body(comm: sc.Communicator) -> np.ndarray:
        x = np.full(4, comm.rank, dtype=np.int32)
        x.flags.writeable = False
        return await comm.all_gather(x)

    with anyio.fail_after(10):
        results = await run_ranks(3, body)
    for got in results:
        assert_same(got, np.repeat(np.arange(3, dtype=np.int32)[:, None], 4, axis=1))


# -- broadcast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_broadcast_small_every_root(lib: str, dtype: str, ws: int) -> None:
    shape = (4, 3)

    async def body(comm: sc.Communicator) -> list[tuple[np.ndarray, str]]:
        out = []
        for root in range(ws):
            x = to_lib(make(comm.rank, shape, dtype, seed=root), lib, dtype)
            got = await comm.broadcast(x, root=root)
            assert got is x
            rec = comm.stats.last("broadcast")
            assert rec is not None
            out.append((to_np(x, lib, dtype), rec.algorithm))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    for root in range(ws):
        want = make(root, shape, dtype, seed=root)
        for rank in range(ws):
            got, algo = results[rank][root]
            assert_same(got, want)
            assert algo == ("local" if ws == 1 else "binomial_tree")


@pytest.mark.parametrize("ws", [2, 3, 4, 5])
@pytest.mark.parametrize(("lib", "dtype"), [c for c in LARGE_CASES if c[1] != "bool"],
                         ids=[i for i in LARGE_IDS if not i.endswith("bool")])
async def test_broadcast_large_chunked(lib: str, dtype: str, ws: int) -> None:
    roots = sorted({0, ws - 1, ws // 2})

    async def body(comm: sc.Communicator) -> list[np.ndarray]:
        out = []
        for root in roots:
            x = to_lib(make(comm.rank, (LARGE,), dtype, seed=root), lib, dtype)
            await comm.broadcast(x, root=root)
            out.append(to_np(x, lib, dtype))
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body, chunk_bytes=4096 * 8)
    for i, root in enumerate(roots):
        want = make(root, (LARGE,), dtype, seed=root)
        for rank in range(ws):
            assert_same(results[rank][i], want)


# -- all_to_all ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
@pytest.mark.parametrize(("lib", "dtype"), CASES, ids=CASE_IDS)
async def test_all_to_all_small(lib: str, dtype: str, ws: int) -> None:
    shape = (2 * ws, 3)

    async def body(comm: sc.Communicator) -> tuple[np.ndarray, np.ndarray, str]:
        src = make(comm.rank, shape, dtype)
        x = to_lib(src, lib, dtype)
        got = await comm.all_to_all(x)
        assert got is not x
        rec = comm.stats.last("all_to_all")
        assert rec is not None
        return to_np(got, lib, dtype), to_np(x, lib, dtype), rec.algorithm

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    inputs = [make(r, shape, dtype) for r in range(ws)]
    for rank, (got, x, algo) in enumerate(results):
        want = np.concatenate([inputs[j][2 * rank : 2 * rank + 2] for j in range(ws)])
        assert_same(got, want)
        assert_same(x, inputs[rank])
        assert algo == ("local" if ws == 1 else "pairwise")


@pytest.mark.parametrize("ws", [2, 3, 4, 5])
@pytest.mark.parametrize(("lib", "dtype"), [("numpy", "int16"), ("torch", "bfloat16")],
                         ids=["numpy-int16", "torch-bfloat16"])
async def test_all_to_all_large(lib: str, dtype: str, ws: int) -> None:
    rows = 50_000
    shape = (rows * ws,)

    async def body(comm: sc.Communicator) -> np.ndarray:
        return to_np(await comm.all_to_all(to_lib(make(comm.rank, shape, dtype), lib, dtype)),
                     lib, dtype)

    with anyio.fail_after(30):
        results = await run_ranks(ws, body)
    inputs = [make(r, shape, dtype) for r in range(ws)]
    for rank, got in enumerate(results):
        want = np.concatenate([inputs[j][rows * rank : rows * (rank + 1)] for j in range(ws)])
        assert_same(got, want)


# -- barrier -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
async def test_barrier_waits_for_the_last_rank(ws: int) -> None:
    entered: dict[int, float] = {}

    async def body(comm: sc.Communicator) -> float:
        for round_ in range(2):
            if comm.rank == (ws - 1 + round_) % ws:
                await anyio.sleep(0.1)
            entered[comm.rank * 10 + round_] = anyio.current_time()
            await comm.barrier()
            left = anyio.current_time()
            # nobody leaves round `round_` before every rank entered it
            assert all(k % 10 != round_ or t <= left for k, t in entered.items())
            assert sum(1 for k in entered if k % 10 == round_) == ws
        rec = comm.stats.last("barrier")
        assert rec is not None
        return rec.algorithm

    with anyio.fail_after(10):
        algos = await run_ranks(ws, body)
    assert algos == ["local" if ws == 1 else "dissemination"] * ws


# -- sub-groups ----------------------------------------------------------------------------------


async def test_split_renumbers_ranks_and_runs_collectives() -> None:
    async def body(comm: sc.Communicator) -> Any:
        sub = comm.split([2, 0])
        if comm.rank in (1, 3):
            assert sub is None
            x = make(comm.rank, (5,), "int32")
            await comm.all_reduce(x)
            return x
        assert sub is not None
        assert sub.world_size == 2
        assert sub.rank == [2, 0].index(comm.rank)
        assert sub.global_ranks == [2, 0]
        assert sub.group_id != comm.group_id
        y = make(comm.rank, (5,), "int32", seed=1)
        await sub.all_reduce(y)
        gathered = await sub.all_gather(np.array([comm.rank], dtype=np.int64))
        x = make(comm.rank, (5,), "int32")
        await comm.all_reduce(x)
        return x, y, gathered

    with anyio.fail_after(10):
        results = await run_ranks(4, body)
    want_world = reference([make(r, (5,), "int32") for r in range(4)], "sum", "int32")
    want_sub = make(2, (5,), "int32", seed=1) + make(0, (5,), "int32", seed=1)
    for rank in (1, 3):
        assert_same(results[rank], want_world)
    for rank in (0, 2):
        x, y, gathered = results[rank]
        assert_same(x, want_world)
        assert_same(y, want_sub)
        assert gathered.reshape(-1).tolist() == [2, 0]  # row i is sub-rank i


@pytest.mark.parametrize("size", [64, LARGE], ids=["small", "large"])
async def test_split_collectives_concurrent_with_parent(size: int) -> None:
    """A sub-group's collectives run alongside the parent's without mixing up messages."""
    ws = 4
    members = [3, 1, 2]

    async def body(comm: sc.Communicator) -> tuple[np.ndarray, np.ndarray | None]:
        sub = comm.split(members)
        world_x = make(comm.rank, (size,), "float32", seed=0)
        sub_x = make(comm.rank, (size,), "float32", seed=1) if sub is not None else None
        async with anyio.create_task_group() as tg:
            tg.start_soon(comm.all_reduce, world_x)
            if sub is not None:
                tg.start_soon(sub.all_reduce, sub_x, "max")
        return world_x, sub_x

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    want_world = reference([make(r, (size,), "float32", seed=0) for r in range(ws)], "sum", "float32")
    want_sub = reference([make(r, (size,), "float32", seed=1) for r in members], "max", "float32")
    for rank, (wx, sx) in enumerate(results):
        assert_same(wx, want_world)
        if rank in members:
            assert sx is not None
            assert_same(sx, want_sub)
        else:
            assert sx is None


async def test_two_different_splits_and_repeated_split() -> None:
    ws = 5

    async def body(comm: sc.Communicator) -> dict[str, Any]:
        evens = comm.split([0, 2, 4])
        odds = comm.split([1, 3])
        again_a = comm.split([0, 1])
        again_b = comm.split([0, 1])  # same ranks, second split: a separate group
        out: dict[str, Any] = {}
        mine = evens if comm.rank % 2 == 0 else odds
        assert mine is not None
        assert (evens is None) == (comm.rank % 2 == 1)
        assert (odds is None) == (comm.rank % 2 == 0)
        async with anyio.create_task_group() as tg:
            x = make(comm.rank, (9,), "int16")
            out["parity"] = x
            tg.start_soon(mine.all_reduce, x)
            if again_a is not None and again_b is not None:
                assert again_a.group_id != again_b.group_id
                a = make(comm.rank, (7,), "int64", seed=2)
                b = make(comm.rank, (7,), "int64", seed=3)
                out["a"], out["b"] = a, b
                tg.start_soon(again_b.all_reduce, b, "max")
                tg.start_soon(again_a.all_reduce, a, "min")
            else:
                assert again_a is None and again_b is None
        # nested split: ranks renumbered twice
        nested = mine.split(list(reversed(range(mine.world_size))))
        assert nested is not None
        assert nested.rank == mine.world_size - 1 - mine.rank
        out["nested"] = await nested.all_gather(np.array([comm.rank], dtype=np.int32))
        return out

    with anyio.fail_after(20):
        results = await run_ranks(ws, body)
    evens_ref = reference([make(r, (9,), "int16") for r in (0, 2, 4)], "sum", "int16")
    odds_ref = reference([make(r, (9,), "int16") for r in (1, 3)], "sum", "int16")
    a_ref = reference([make(r, (7,), "int64", seed=2) for r in (0, 1)], "min", "int64")
    b_ref = reference([make(r, (7,), "int64", seed=3) for r in (0, 1)], "max", "int64")
    for rank, out in enumerate(results):
        assert_same(out["parity"], evens_ref if rank % 2 == 0 else odds_ref)
        if rank in (0, 1):
            assert_same(out["a"], a_ref)
            assert_same(out["b"], b_ref)
        assert out["nested"].reshape(-1).tolist() == ([4, 2, 0] if rank % 2 == 0 else [3, 1])


async def test_split_non_member_gets_none() -> None:
    async def body(comm: sc.Communicator) -> Any:
        return comm.split([1]), comm.split([0, 2])

    with anyio.fail_after(10):
        results = await run_ranks(3, body)
    assert results[0][0] is None and results[2][0] is None
    assert results[1][1] is None
    solo = results[1][0]
    assert solo is not None and solo.world_size == 1 and solo.rank == 0
    assert results[0][1].rank == 0 and results[2][1].rank == 1


async def test_split_of_one_runs_locally() -> None:
    async def body(comm: sc.Communicator) -> np.ndarray:
        solo = comm.split([comm.rank])
        assert solo is not None and solo.world_size == 1
        x = make(comm.rank, (4,), "float32")
        await solo.all_reduce(x, op="avg")
        return x

    with anyio.fail_after(10):
        results = await run_ranks(2, body)
    for rank, x in enumerate(results):
        assert_same(x, make(rank, (4,), "float32"))


# -- concurrency -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", [2, 3, 4])
async def test_concurrent_collectives_from_a_task_group(ws: int) -> None:
    """Several collectives in flight at once, issued in the same order on every rank."""
    n_small = 6

    async def body(comm: sc.Communicator) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def issue(name: str, fn: Any, *args: Any) -> Any:
            async def task(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                task_status.started()  # the op takes its sequence number before it first awaits
                out[name] = await fn(*args)
            return task

        async with anyio.create_task_group() as tg:
            for i in range(n_small):
                x = make(comm.rank, (8,), "int32", seed=i)
                await tg.start(issue(f"small{i}", comm.all_reduce, x, "sum"))
            await tg.start(issue("large", comm.all_reduce, make(comm.rank, (LARGE,), "float32"), "max"))
            await tg.start(issue("gather", comm.all_gather, make(comm.rank, (3,), "uint8")))
            await tg.start(issue("bcast", comm.broadcast, make(comm.rank, (5,), "int8"), ws - 1))
            await tg.start(issue("rs", comm.reduce_scatter, make(comm.rank, (ws * 2,), "float64"), "sum"))
            await tg.start(issue("a2a", comm.all_to_all, make(comm.rank, (ws,), "int64")))
            await tg.start(issue("barrier", comm.barrier))
        return out

    with anyio.fail_after(30):
        results = await run_ranks(ws, body)
    for rank, out in enumerate(results):
        for i in range(n_small):
            want = reference([make(r, (8,), "int32", seed=i) for r in range(ws)], "sum", "int32")
            assert_same(out[f"small{i}"], want)
        assert_same(out["large"],
                    reference([make(r, (LARGE,), "float32") for r in range(ws)], "max", "float32"))
        assert_same(out["gather"], np.stack([make(r, (3,), "uint8") for r in range(ws)]))
        assert_same(out["bcast"], make(ws - 1, (5,), "int8"))
        rs = reference([make(r, (ws * 2,), "float64") for r in range(ws)], "sum", "float64")
        assert_same(out["rs"], rs[2 * rank : 2 * rank + 2])
        assert_same(out["a2a"], np.array([make(j, (ws,), "int64")[rank] for j in range(ws)]))
        assert out["barrier"] is None


async def test_stats_record_every_op() -> None:
    async def body(comm: sc.Communicator) -> Any:
        comm.cost_model = None  # the size rules this test was written for (the model's choices: test_cost_model.py)
        await comm.all_reduce(np.zeros(10, dtype=np.float32))
        await comm.all_reduce(np.zeros(LARGE, dtype=np.float32))
        await comm.barrier()
        return comm.stats

    with anyio.fail_after(10):
        results = await run_ranks(3, body)
    for stats in results:
        c = stats.counters["all_reduce"]
        assert c.calls == 2 and c.errors == 0
        assert c.bytes == 40 + 4 * LARGE
        assert c.algorithms == {"recursive_doubling": 1, "ring": 1}
        rec = stats.last("all_reduce")
        assert rec.ok and rec.nbytes == 4 * LARGE and rec.seq == 1 and rec.seconds >= 0
        assert rec.transport == "inproc" and rec.group == "world"
        assert stats.last().op == "barrier"
        d = stats.to_dict()
        assert d["counters"]["barrier"]["calls"] == 1
