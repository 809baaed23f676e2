"""Unit tests of sagellm_comm.buffers: views over numpy/torch memory, op checks, scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sagellm_comm as sc
from sagellm_comm.buffers import (
    DTYPES,
    REDUCE_OPS,
    Buffer,
    ScratchPool,
    as_buffer,
    check_op,
    empty_like,
    reduce_into,
    scale_avg,
    view_elements,
)

NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
TORCH_DTYPES = [*NUMPY_DTYPES, "bfloat16"]
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2,
            "int32": 4, "int64": 8, "uint8": 1, "bool": 1}
KIND = {"float16": "f", "bfloat16": "f", "float32": "f", "float64": "f", "int8": "i", "int16": "i",
        "int32": "i", "int64": "i", "uint8": "u", "bool": "b"}
FLOAT_OPS = ["sum", "prod", "min", "max", "avg"]
INT_OPS = ["sum", "prod", "min", "max", "band", "bor", "bxor"]


def test_dtype_table_is_what_the_docs_promise() -> None:
    assert set(DTYPES) == set(TORCH_DTYPES)
    for name, d in DTYPES.items():
        assert d.name == name
        assert d.itemsize == ITEMSIZE[name]
        assert d.kind == KIND[name]
        if name == "bfloat16":
            assert d.numpy is None
        else:
            assert d.numpy == np.dtype(name)
            assert d.numpy.itemsize == d.itemsize


# -- as_buffer on numpy ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_buffer_every_dtype(dtype: str) -> None:
    arr = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    buf = as_buffer(arr)
    assert buf.obj is arr
    assert buf.dtype is DTYPES[dtype]
    assert buf.shape == (3, 4)
    assert buf.numel == 12
    assert buf.nbytes == 12 * ITEMSIZE[dtype] == arr.nbytes
    assert not buf.is_torch
    assert len(buf.raw) == arr.nbytes
    assert buf.raw.format == "B"
    assert not buf.raw.readonly
    assert bytes(buf.raw) == arr.tobytes()
    assert isinstance(buf.elements, np.ndarray)
    assert buf.elements.shape == (12,)
    assert buf.elements.dtype == arr.dtype
    # raw and elements alias the caller's memory
    src = (np.arange(12) % 2).astype(dtype)
    buf.raw[:] = src.tobytes()
    np.testing.assert_array_equal(arr.reshape(-1), src)
    buf.elements[0] = np.ones(1, dtype=dtype)[0]
    assert arr[0, 0] == np.ones(1, dtype=dtype)[0]
    assert "numpy.ndarray" in buf.describe() and dtype in buf.describe()


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_buffer_every_dtype(dtype: str) -> None:
    tdt = getattr(torch, dtype)
    t = (torch.arange(12) % 3).to(tdt).reshape(3, 4)
    buf = as_buffer(t)
    assert buf.is_torch
    assert buf.dtype is DTYPES[dtype]
    assert buf.shape == (3, 4)
    assert buf.numel == 12
    assert buf.nbytes == 12 * ITEMSIZE[dtype] == t.numel() * t.element_size()
    assert len(buf.raw) == buf.nbytes
    assert buf.raw.format == "B"
    assert not buf.raw.readonly
    if dtype == "bfloat16":
        assert isinstance(buf.elements, torch.Tensor)
        assert buf.elements.dtype == torch.bfloat16
    else:
        assert isinstance(buf.elements, np.ndarray)
        assert buf.elements.dtype == np.dtype(dtype)
    assert buf.elements.shape == (12,)
    # the byte view aliases the tensor
    before = t.clone()
    assert bytes(buf.raw) == before.reshape(-1).view(torch.uint8).numpy().tobytes()
    src = (torch.arange(12) % 2).to(tdt)
    buf.raw[:] = src.view(torch.uint8).numpy().tobytes()
    assert torch.equal(t.reshape(-1), src)
    assert "torch.Tensor" in buf.describe()


def test_torch_tensor_requiring_grad_is_accepted_and_aliased() -> None:
    t = torch.zeros(4, requires_grad=True)
    buf = as_buffer(t)
    buf.raw[:] = np.arange(4, dtype=np.float32).tobytes()
    assert t.detach().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_zero_dim_and_empty_buffers() -> None:
    s = np.array(7, dtype=np.int32)
    buf = as_buffer(s)
    assert buf.shape == ()
    assert buf.numel == 1 and buf.nbytes == 4
    buf.raw[:] = np.array(9, dtype=np.int32).tobytes()
    assert int(s) == 9

    e = np.empty((0, 3), dtype=np.float32)
    eb = as_buffer(e)
    assert eb.shape == (0, 3) and eb.numel == 0 and eb.nbytes == 0 and len(eb.raw) == 0

    te = torch.empty(0, dtype=torch.bfloat16)
    teb = as_buffer(te)
    assert teb.numel == 0 and teb.nbytes == 0 and len(teb.raw) == 0


def test_buffer_passthrough_and_rows() -> None:
    arr = np.arange(12, dtype=np.int16).reshape(4, 3)
    buf = as_buffer(arr)
    assert as_buffer(buf) is buf
    rows = buf.rows(1, 3)
    assert isinstance(rows, Buffer)
    assert rows.shape == (2, 3)
    assert rows.nbytes == 2 * 3 * 2
    np.testing.assert_array_equal(rows.elements, np.arange(3, 9, dtype=np.int16))
    rows.raw[:] = np.full(6, -1, dtype=np.int16).tobytes()
    np.testing.assert_array_equal(arr, [[0, 1, 2], [-1, -1, -1], [-1, -1, -1], [9, 10, 11]])
    with pytest.raises(sc.InvalidArgument):
        as_buffer(np.array(1.0)).rows(0, 1)


@pytest.mark.fault("read-only array as a buffer to be written",
                   "UnsupportedBuffer 'read-only'; accepted where it is only read")
def test_read_only_array_allowed_when_not_written() -> None:
    arr = np.arange(4, dtype=np.float32)
    arr.flags.writeable = False
    with pytest.raises(sc.UnsupportedBuffer, match="read-only"):
        as_buffer(arr)
    buf = as_buffer(arr, writable=False)
    assert bytes(buf.raw) == arr.tobytes()


# -- as_buffer errors ----------------------------------------------------------------------------


NON_CONTIGUOUS = pytest.mark.fault("non-contiguous numpy array or torch tensor as a buffer (strided, transposed, "
                                   "Fortran-order, a sliced middle dimension or column)",
                                   "UnsupportedBuffer naming 'contiguous'")


@NON_CONTIGUOUS
@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(10, dtype=np.float32)[::2],
        lambda: np.arange(12, dtype=np.int32).reshape(3, 4).T,
        lambda: np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        lambda: np.arange(24, dtype=np.int8).reshape(2, 3, 4)[:, 1],
    ],
    ids=["strided", "transposed", "fortran", "sliced-middle"],
)
def test_non_contiguous_numpy_rejected(make) -> None:  # type: ignore[no-untyped-def]
    arr = make()
    with pytest.raises(sc.UnsupportedBuffer, match="contiguous"):
        as_buffer(arr)
    with pytest.raises(sc.UnsupportedBuffer, match="contiguous"):
        as_buffer(arr, writable=False)


@NON_CONTIGUOUS
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(10, dtype=torch.float32)[::2],
        lambda: torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        lambda: torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)[:, 1],
    ],
    ids=["strided", "transposed", "column"],
)
def test_non_contiguous_torch_rejected(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sc.UnsupportedBuffer, match="contiguous"):
        as_buffer(make())


UNSUPPORTED_DTYPE = pytest.mark.fault(
    "array of an unsupported dtype as a buffer (complex, uint16/32/64, longdouble, object, str, datetime, "
    "big-endian, structured; torch complex, uint16/32, float8)", "UnsupportedBuffer")


@UNSUPPORTED_DTYPE
@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(3, dtype=np.complex64),
        np.zeros(3, dtype=np.complex128),
        np.zeros(3, dtype=np.uint16),
        np.zeros(3, dtype=np.uint32),
        np.zeros(3, dtype=np.uint64),
        np.zeros(3, dtype=np.longdouble),
        np.zeros(3, dtype=object),
        np.zeros(3, dtype="U3"),
        np.zeros(3, dtype="datetime64[s]"),
        np.zeros(3, dtype=">i4"),
        np.zeros(3, dtype=">f8"),
        np.zeros(3, dtype=[("a", np.int32)]),
    ],
    ids=lambda a: str(a.dtype),
)
def test_unsupported_numpy_dtypes_rejected(arr: np.ndarray) -> None:
    with pytest.raises(sc.UnsupportedBuffer):
        as_buffer(arr)


@UNSUPPORTED_DTYPE
@pytest.mark.parametrize("dtype", ["complex64", "complex128", "uint16", "uint32", "float8_e4m3fn"])
def test_unsupported_torch_dtypes_rejected(dtype: str) -> None:
    tdt = getattr(torch, dtype, None)
    if tdt is None:
        pytest.skip(f"this torch has no {dtype}")
    with pytest.raises(sc.UnsupportedBuffer, match="not supported"):
        as_buffer(torch.zeros(3, dtype=tdt))


@pytest.mark.fault("not an array as a buffer (list, tuple, bytes, bytearray, memoryview, int, float, None, str)",
                   "UnsupportedBuffer naming numpy.ndarray or torch.Tensor")
@pytest.mark.parametrize(
    "obj",
    [[1, 2, 3], (1.0, 2.0), b"abc", bytearray(b"abc"), memoryview(b"abc"), 3, 1.5, None, "x"],
    ids=lambda o: type(o).__name__,
)
def test_wrong_types_rejected(obj: object) -> None:
    with pytest.raises(sc.UnsupportedBuffer, match=r"numpy\.ndarray or torch\.Tensor"):
        as_buffer(obj)
    with pytest.raises(sc.UnsupportedBuffer):
        as_buffer(obj, writable=False)


def test_error_types_are_also_builtin_types() -> None:
    assert issubclass(sc.UnsupportedBuffer, TypeError)
    assert issubclass(sc.InvalidArgument, ValueError)
    assert issubclass(sc.UnsupportedBuffer, sc.CommError)
    assert issubclass(sc.InvalidArgument, sc.CommError)


# -- empty_like / view_elements / reductions -----------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_empty_like_keeps_library_and_dtype(dtype: str) -> None:
    t = torch.zeros(3, dtype=getattr(torch, dtype))
    out = empty_like(as_buffer(t), (2, 3))
    assert isinstance(out.obj, torch.Tensor)
    assert out.obj.dtype == t.dtype and tuple(out.obj.shape) == (2, 3)
    assert out.dtype is DTYPES[dtype]
    if dtype != "bfloat16":
        a = np.zeros(3, dtype=dtype)
        nout = empty_like(as_buffer(a), (4, 3))
        assert isinstance(nout.obj, np.ndarray)
        assert nout.obj.dtype == a.dtype and nout.obj.shape == (4, 3)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_view_elements_round_trip(dtype: str) -> None:
    t = (torch.arange(6) - 2).to(getattr(torch, dtype))
    raw = memoryview(bytearray(t.view(torch.uint8).numpy().tobytes()))
    el = view_elements(raw, DTYPES[dtype])
    if dtype == "bfloat16":
        assert torch.equal(el, t)
    else:
        np.testing.assert_array_equal(el, t.numpy())
    assert len(view_elements(memoryview(bytearray(0)), DTYPES[dtype])) == 0


@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
@pytest.mark.parametrize("lib", ["numpy", "torch-bfloat16"])
def test_reduce_into_and_scale_avg(op: str, lib: str) -> None:
    a = np.array([1.0, -2.0, 3.0, 4.0], dtype=np.float32)
    b = np.array([2.0, 5.0, -3.0, 0.5], dtype=np.float32)
    ref = {"sum": a + b, "avg": (a + b) / 2, "prod": a * b, "min": np.minimum(a, b),
           "max": np.maximum(a, b)}[op]
    if lib == "numpy":
        acc = a.copy()
        reduce_into(acc, b, op)
        if op == "avg":
            scale_avg(acc, 2)
        np.testing.assert_array_equal(acc, ref)
    else:
        acc_t = torch.from_numpy(a).to(torch.bfloat16)
        reduce_into(acc_t, torch.from_numpy(b).to(torch.bfloat16), op)
        if op == "avg":
            scale_avg(acc_t, 2)
        np.testing.assert_array_equal(acc_t.float().numpy(), ref)


@pytest.mark.parametrize("op", ["band", "bor", "bxor"])
@pytest.mark.parametrize("dtype", ["int8", "int32", "uint8", "bool"])
def test_reduce_into_bitwise(op: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2 if dtype == "bool" else 100, 16).astype(dtype)
    b = rng.integers(0, 2 if dtype == "bool" else 100, 16).astype(dtype)
    ref = {"band": a & b, "bor": a | b, "bxor": a ^ b}[op]
    acc = a.copy()
    reduce_into(acc, b, op)
    np.testing.assert_array_equal(acc, ref)


# -- check_op ------------------------------------------------------------------------------------


@pytest.mark.fault("reduce op not defined for the dtype (bitwise on floats, avg on integers or bool)",
                   "InvalidArgument naming the op")
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_check_op_matrix(dtype: str) -> None:
    d = DTYPES[dtype]
    ok = FLOAT_OPS if d.kind == "f" else INT_OPS
    for op in REDUCE_OPS:
        if op in ok:
            check_op(op, d)
        else:
            with pytest.raises(sc.InvalidArgument, match=op):
                check_op(op, d)


@pytest.mark.fault("reduce op not defined for the dtype (bitwise on floats, avg on integers or bool)",
                   "InvalidArgument naming the op")
@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "bool"])
def test_avg_rejected_on_integers_and_bool(dtype: str) -> None:
    with pytest.raises(sc.InvalidArgument, match="avg"):
        check_op("avg", DTYPES[dtype])


@pytest.mark.fault("unknown reduce op name ('mean', 'SUM', '', 'add', 'and', 'xor', 'sum ')",
                   "InvalidArgument 'unknown reduce op', for every dtype")
@pytest.mark.parametrize("op", ["mean", "SUM", "", "add", "and", "xor", "sum "])
def test_unknown_ops_rejected(op: str) -> None:
    for d in DTYPES.values():
        with pytest.raises(sc.InvalidArgument, match="unknown reduce op"):
            check_op(op, d)


# -- ScratchPool ---------------------------------------------------------------------------------


def test_scratch_pool_sizes() -> None:
    pool = ScratchPool()
    for n in (0, 1, 100, 4096, 4097, 10_000, 1 << 20, (1 << 20) + 1):
        block = pool.acquire(n)
        assert block.dtype == np.uint8
        assert block.ndim == 1
        assert block.nbytes >= max(n, 1)
        assert block.nbytes >= 4096
        assert block.nbytes & (block.nbytes - 1) == 0  # a power of two
        assert block.nbytes < 2 * max(n, 4096)


def test_scratch_pool_reuses_released_blocks() -> None:
    pool = ScratchPool()
    a = pool.acquire(5000)
    b = pool.acquire(5000)
    assert a is not b
    pool.release(a)
    again = pool.acquire(6000)  # same size class (8192)
    assert again is a
    fresh = pool.acquire(6000)
    assert fresh is not a and fresh is not b
    pool.release(b)
    other = pool.acquire(100)  # another size class: b (8 KiB) is not handed out
    assert other is not b and other.nbytes == 4096
    assert pool.acquire(8192) is b


def test_scratch_pool_respects_cache_limit() -> None:
    pool = ScratchPool(max_cached_bytes=8192)
    a, b = pool.acquire(8192), pool.acquire(8192)
    pool.release(a)
    pool.release(b)  # over the limit: dropped
    assert pool.acquire(8192) is a
    c = pool.acquire(8192)
    assert c is not b and c is not a
    # after handing a out again, there is room for one more block
    pool.release(c)
    assert pool.acquire(8192) is c
