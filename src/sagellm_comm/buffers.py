"""One view over numpy arrays and torch CPU tensors, and the reduce ops.

Every op works on a `Buffer`: the caller's object, its canonical dtype and shape,
a flat writable byte view (what transports read into and write from, without
copies) and a flat element view (what reductions run on). Reductions run in
place on the caller's memory; nothing here allocates per call except the scratch
pool, which hands out reused blocks so that large receives never land in fresh
(page-faulting) memory.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgument, UnsupportedBuffer

REDUCE_OPS = ("sum", "prod", "min", "max", "avg", "band", "bor", "bxor")


@dataclass(frozen=True)
class DType:
    """A dtype every rank names the same way, whatever library holds the data."""

    name: str
    itemsize: int
    kind: str  # "f" float, "i" signed, "u" unsigned, "b" bool

    @property
    def numpy(self) -> np.dtype[Any] | None:
        """The numpy dtype, or None where numpy has none (bfloat16)."""
        return None if self.name == "bfloat16" else np.dtype(self.name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float16", 2, "f"),
        DType("bfloat16", 2, "f"),
        DType("float32", 4, "f"),
        DType("float64", 8, "f"),
        DType("int8", 1, "i"),
        DType("int16", 2, "i"),
        DType("int32", 4, "i"),
        DType("int64", 8, "i"),
        DType("uint8", 1, "u"),
        DType("bool", 1, "b"),
    )
}

_NP_UFUNC = {
    "sum": np.add,
    "avg": np.add,
    "prod": np.multiply,
    "min": np.minimum,
    "max": np.maximum,
    "band": np.bitwise_and,
    "bor": np.bitwise_or,
    "bxor": np.bitwise_xor,
}


def _torch() -> Any:
    """torch, if the caller already imported it (we never import it for them)."""
    return sys.modules.get("torch")


def is_torch_tensor(obj: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


class Buffer:
    """A contiguous host buffer seen as bytes and as a flat array of elements.

    `raw` and `elements` alias the caller's memory: writing through them writes
    the caller's array or tensor.
    """

    __slots__ = ("dtype", "elements", "nbytes", "numel", "obj", "raw", "shape")

    def __init__(self, obj: Any, dtype: DType, shape: tuple[int, ...], elements: Any, raw: memoryview):
        self.obj = obj
        self.dtype = dtype
        self.shape = shape
        self.elements = elements  # 1-D np.ndarray, or 1-D torch.Tensor for bfloat16
        self.raw = raw  # flat, format "B", writable
        self.numel = math.prod(shape)
        self.nbytes = self.numel * dtype.itemsize

    @property
    def is_torch(self) -> bool:
        return is_torch_tensor(self.obj)

    def rows(self, start: int, stop: int) -> Buffer:
        """The rows [start, stop) of dim 0 as a Buffer over the same memory."""
        if not self.shape:
            raise InvalidArgument("a 0-d buffer has no dim 0 to split")
        row = self.numel // self.shape[0] if self.shape[0] else 0
        lo, hi = start * row, stop * row
        isz = self.dtype.itemsize
        return Buffer(
            self.obj[start:stop],
            self.dtype,
            (stop - start, *self.shape[1:]),
            self.elements[lo:hi],
            self.raw[lo * isz : hi * isz],
        )

    def describe(self) -> str:
        lib = "torch.Tensor" if self.is_torch else "numpy.ndarray"
        return f"{lib}(dtype={self.dtype.name}, shape={self.shape})"


def bytes_view(arr: np.ndarray[Any, Any]) -> memoryview:
    """A flat writable byte view of a contiguous array (numpy's stubs lack the buffer protocol)."""
    return memoryview(arr).cast("B")  # type: ignore[arg-type]


_NUMPY_DTYPES: dict[np.dtype[Any], DType] = {
    np.dtype(d.name): d for d in DTYPES.values() if d.name != "bfloat16"
}


def _numpy_buffer(arr: np.ndarray[Any, Any], writable: bool) -> Buffer:
    dtype = _NUMPY_DTYPES.get(arr.dtype)
    if dtype is None or arr.dtype.byteorder == ">":
        raise UnsupportedBuffer(
            f"dtype {arr.dtype} is not supported; use one of {', '.join(DTYPES)}"
        )
    if not arr.flags.c_contiguous:
        raise UnsupportedBuffer(
            f"array of shape {arr.shape} is not C-contiguous; pass np.ascontiguousarray(x)"
        )
    if writable and not arr.flags.writeable:
        raise UnsupportedBuffer("array is read-only but this op writes into it")
    flat = arr.reshape(-1)
    raw = bytes_view(flat.view(np.uint8)) if flat.size else memoryview(bytearray(0))
    return Buffer(arr, dtype, arr.shape, flat, raw)


def _torch_buffer(t: Any) -> Buffer:
    torch = _torch()
    assert torch is not None
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedBuffer(f"dtype {t.dtype} is not supported; use one of {', '.join(DTYPES)}")
    if t.device.type != "cpu":
        raise UnsupportedBuffer(
            f"tensor on device {t.device} is not supported yet; only CPU tensors are"
        )
    if not t.is_contiguous():
        raise UnsupportedBuffer(
            f"tensor of shape {tuple(t.shape)} is not contiguous; pass t.contiguous()"
        )
    flat = t.detach().reshape(-1)
    raw_np = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    elements = flat if name == "bfloat16" else flat.numpy()
    return Buffer(t, DTYPES[name], tuple(t.shape), elements, bytes_view(raw_np))


def as_buffer(obj: Any, *, writable: bool = True) -> Buffer:
    """View `obj` (numpy array or torch CPU tensor) as a Buffer, or raise why not."""
    if isinstance(obj, Buffer):
        return obj
    if isinstance(obj, np.ndarray):
        return _numpy_buffer(obj, writable)
    if is_torch_tensor(obj):
        return _torch_buffer(obj)
    raise UnsupportedBuffer(
        f"expected a numpy.ndarray or torch.Tensor, got {type(obj).__module__}.{type(obj).__name__}"
    )


def empty_like(buf: Buffer, shape: tuple[int, ...]) -> Buffer:
    """A new buffer of the same library and dtype as `buf`, of `shape`."""
    if buf.is_torch:
        torch = _torch()
        return as_buffer(torch.empty(shape, dtype=buf.obj.dtype))
    np_dtype = buf.dtype.numpy
    assert np_dtype is not None
    return as_buffer(np.empty(shape, dtype=np_dtype))


def check_op(op: str, dtype: DType) -> None:
    """Raise if `op` is unknown or undefined for `dtype` (avg of ints, bitwise of floats)."""
    if op not in REDUCE_OPS:
        raise InvalidArgument(f"unknown reduce op {op!r}; use one of {', '.join(REDUCE_OPS)}")
    if op == "avg" and dtype.kind != "f":
        raise InvalidArgument(f"op 'avg' needs a floating dtype, got {dtype.name}")
    if op.startswith("b") and dtype.kind == "f":
        raise InvalidArgument(f"bitwise op {op!r} needs an integer or bool dtype, got {dtype.name}")


def view_elements(raw: memoryview, dtype: DType) -> Any:
    """Elements over raw bytes (scratch or a received chunk), for reductions."""
    np_dtype = dtype.numpy
    if np_dtype is not None:
        return np.frombuffer(raw, dtype=np_dtype)
    torch = _torch()
    if torch is None:
        raise UnsupportedBuffer("bfloat16 needs torch")
    if len(raw) == 0:
        return torch.empty(0, dtype=torch.bfloat16)
    return torch.frombuffer(raw, dtype=torch.bfloat16)


def reduce_into(acc: Any, other: Any, op: str) -> None:
    """acc = acc (op) other, elementwise, in place. `avg` sums; call `scale_avg` after."""
    if isinstance(acc, np.ndarray):
        _NP_UFUNC[op](acc, other, out=acc)
        return
    torch = _torch()
    fn = {"sum": torch.add, "avg": torch.add, "prod": torch.mul,
          "min": torch.minimum, "max": torch.maximum}[op]
    with _one_torch_thread(torch):
        fn(acc, other, out=acc)


@contextmanager
def _one_torch_thread(torch: Any) -> Iterator[None]:
    """Run torch's CPU ops in this thread only, like numpy's.

    torch's intra-op threads spin while they wait, and with a rank per core they took
    the cores the other ranks needed: a 16 MiB bfloat16 all_reduce between 2
    processes on 2 cores took 20 ms with them and 3.5 ms without. Switching costs
    0.2 us.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scale_avg(acc: Any, world_size: int) -> None:
    """Finish an `avg` reduction: divide the summed elements by the number of ranks."""
    if isinstance(acc, np.ndarray):
        np.divide(acc, acc.dtype.type(world_size), out=acc)
    else:
        with _one_torch_thread(_torch()):
            acc.div_(world_size)



class DeviceBytes:
    """A flat byte range of a CUDA tensor, for transports that move device memory themselves.

    The shared-memory transport copies these with the GPU's copy engines straight
    into and out of its (page-locked) rings; everything else asks for host bytes.
    `stream` is where those copies run; it must already be ordered after the
    caller's work on the tensor.
    """

    __slots__ = ("stream", "t")

    def __init__(self, t: Any, stream: Any) -> None:
        self.t = t  # 1-D torch.uint8 view on the device
        self.stream = stream

    @classmethod
    def of(cls, tensor: Any, stream: Any) -> DeviceBytes:
        torch = _torch()
        return cls(tensor.detach().reshape(-1).view(torch.uint8), stream)

    def __len__(self) -> int:
        return int(self.t.numel())

    def __getitem__(self, s: slice) -> DeviceBytes:
        return DeviceBytes(self.t[s], self.stream)

    def __setitem__(self, s: slice, src: Any) -> None:
        """Copy host bytes in (small pieces: a header's read-ahead, a message that came early)."""
        torch = _torch()
        host = torch.frombuffer(memoryview(src).cast("B"), dtype=torch.uint8) if len(src) else None
        if host is not None:
            with torch.cuda.stream(self.stream):
                self.t[s].copy_(host)
            self.stream.synchronize()

    def to_host(self) -> memoryview:
        """The bytes, copied to host memory (a receive withdrawn part-way keeps them)."""
        with _torch().cuda.stream(self.stream):
            host = self.t.cpu()
        return bytes_view(host.numpy())


def as_host_bytes(view: Any) -> Any:
    """`view` itself, or its bytes copied to the host if it is device memory."""
    return view.to_host() if isinstance(view, DeviceBytes) else view


class Pieces:
    """One message made of several host memory ranges, sent or received without gathering them.

    KV blocks of a layer sit wherever the cache allocator put them; a message
    listing them piece by piece goes straight from the sender's cache to the
    receiver's, with no copy into a contiguous buffer on either side. Frames never
    cross a piece boundary (`window`), so transports see ordinary memoryviews.
    """

    __slots__ = ("_ends", "_views", "nbytes", "watch")

    def __init__(self, views: Sequence[memoryview], watch: Callable[[int, int], None] | None = None) -> None:
        # watch(start, end): called just before bytes [start, end) are sent, or just after they landed, so
        # the owner can checksum them while they are in the CPU's cache
        self.watch = watch
        self._views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views if len(v)]
        self._ends: list[int] = []
        total = 0
        for v in self._views:
            total += len(v)
            self._ends.append(total)
        self.nbytes = total

    def __len__(self) -> int:
        return self.nbytes

    def _locate(self, offset: int) -> int:
        return bisect.bisect_right(self._ends, offset)

    def window(self, start: int, end: int) -> memoryview:
        """The longest contiguous view from `start` towards `end` (stops at a piece boundary)."""
        i = self._locate(start)
        base = self._ends[i] - len(self._views[i])
        return self._views[i][start - base : min(end, self._ends[i]) - base]

    def __getitem__(self, s: slice) -> Any:
        """A contiguous view where `s` lies in one piece, else a copy of the bytes."""
        start, stop, _ = s.indices(self.nbytes)
        if stop <= start:
            return memoryview(b"")
        first = self.window(start, stop)
        if len(first) == stop - start:
            return first
        out = bytearray(stop - start)
        at = 0
        while at < len(out):
            w = self.window(start + at, stop)
            out[at : at + len(w)] = w
            at += len(w)
        return memoryview(out)

    def __setitem__(self, s: slice, src: Any) -> None:
        start, stop, _ = s.indices(self.nbytes)
        data = memoryview(src).cast("B")
        if len(data) != stop - start:
            raise ValueError(f"cannot write {len(data)} bytes into {stop - start}")
        at = 0
        while at < len(data):
            w = self.window(start + at, stop)
            w[:] = data[at : at + len(w)]
            at += len(w)


class ScratchPool:
    """Reused byte blocks for receives that cannot land in the caller's memory.

    Blocks come in power-of-two size classes and go back on `release`, so a
    steady workload allocates nothing after warm-up. At most `max_cached_bytes`
    are kept; the rest is freed. `alloc(nbytes)` makes a new block (a numpy uint8
    array by default; page-locked torch tensors for CUDA staging), `min_block` is
    the smallest class.
    """

    def __init__(self, max_cached_bytes: int = 1 << 30, *, alloc: Callable[[int], Any] | None = None,
                 min_block: int = 4096) -> None:
        self._free: dict[int, list[Any]] = {}
        self._cached = 0
        self._max = max_cached_bytes
        self._alloc = alloc or (lambda n: np.empty(n, dtype=np.uint8))
        self._min = min_block

    def _size_class(self, nbytes: int) -> int:
        return max(self._min, 1 << (max(nbytes, 1) - 1).bit_length())

    def acquire(self, nbytes: int) -> Any:
        """A uint8 block of at least `nbytes`; slice it to the length you need."""
        cls = self._size_class(nbytes)
        blocks = self._free.get(cls)
        if blocks:
            self._cached -= cls
            return blocks.pop()
        return self._alloc(cls)

    def release(self, block: Any) -> None:
        cls = len(block)
        if self._cached + cls > self._max:
            return
        self._free.setdefault(cls, []).append(block)
        self._cached += cls
