"""Codecs that shrink KV blocks on the wire: "none" (the raw bytes), "fp8" (e4m3) and "int8".

Why one scale per (block, kv head). A receiver writes whole blocks, and attention
reads one head of a block at a time. Scaling each (block, head) pair by its own
absolute maximum keeps every encoded row self-contained (a row is the block's
quantized bytes followed by its scales, so any subset of rows decodes without the
others) and keeps one head with large values, or one block of outlier tokens, from
costing precision anywhere else. The error is then bounded by the format and that
local maximum alone (x a value, x' its decoded value, amax its (block, head) maximum):

- fp8, e4m3 with 3 mantissa bits: scale = amax / 448 (the largest finite e4m3),
  |x - x'| <= 2^-4 |x| + scale 2^-10, the second term being half the spacing of
  e4m3's subnormals (values under 2^-6 scale). So |x - x'| <= amax / 16.
- int8, symmetric, round to nearest: scale = amax / 127, |x - x'| <= scale / 2 = amax / 254.

Decoding rounds once more into the cache's dtype (bf16: 2^-8 |x|). A head of zeros
decodes to exact zeros. Inputs must be finite: an inf or NaN spoils its head's scale.

The scales cost 4 bytes per (block, head): for bf16 at block 16, 8 kv heads, head
dim 128 a 32768-byte block becomes 16384 + 32 bytes, a 1.996x smaller transfer.
Everything is vectorized over the n blocks of a call and computed in float32 with
torch ops only, so the same code runs on CPU and CUDA tensors; encode and decode
write into the caller's `out` (typically a staging slot) in place.
"""

from __future__ import annotations

import statistics
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgument, UnsupportedBuffer
from .layout import KVLayout, _torch

_SCALE_BYTES = 4  # one float32 per (block, kv head)
_QUANTIZABLE = ("bfloat16", "float16", "float32", "float64")


class Codec(ABC):
    """How one block of one of K/V of one layer becomes a row of `encoded_block_bytes` bytes, and back."""

    name: str
    lossless: bool

    @abstractmethod
    def encoded_block_bytes(self, layout: KVLayout) -> int:
        """Wire bytes of one block of one of K/V of one layer."""

    @abstractmethod
    def encode(self, blocks: Any, out: Any) -> None:
        """Write blocks [n, block_size, kv_heads, head_dim] into the uint8 rows `out` [n, encoded_block_bytes]."""

    @abstractmethod
    def decode(self, encoded: Any, out: Any) -> None:
        """Write the uint8 rows `encoded` [n, encoded_block_bytes] back into blocks `out` [n, block_size, ...]."""

    def __repr__(self) -> str:
        return f"<kv codec {self.name}>"


class RawCodec(Codec):
    """The identity: row j holds block j's bytes as they sit in the cache."""

    name = "none"
    lossless = True

    def encoded_block_bytes(self, layout: KVLayout) -> int:
        return layout.block_bytes

    def encode(self, blocks: Any, out: Any) -> None:
        _check_blocks(self.name, "encode", blocks, "blocks")
        _check_rows(self.name, "encode", out, "out", blocks, _raw_row_bytes(blocks))
        if blocks.shape[0]:
            out.copy_(_as_rows(blocks))

    def decode(self, encoded: Any, out: Any) -> None:
        _check_blocks(self.name, "decode", out, "out")
        _check_rows(self.name, "decode", encoded, "encoded", out, _raw_row_bytes(out))
        if out.shape[0]:
            _as_rows(out).copy_(encoded)


class ScaledCodec(Codec):
    """Symmetric quantization with one float32 scale per (block, kv head): amax over tokens and head_dim / qmax.

    Row j: the block_size * kv_heads * head_dim quantized bytes in the block's own
    [block_size, kv_heads, head_dim] order, then kv_heads float32 scales, little-endian.
    Subclasses say how values already divided by their scale become bytes, and back.
    """

    lossless = False
    qmax: float

    @abstractmethod
    def _quantize(self, x: Any, out: Any) -> None:
        """Write float32 `x` (already divided by its scale; may be clobbered) into uint8 `out` of its shape."""

    @abstractmethod
    def _dequantize(self, raw: Any) -> tuple[Any, float]:
        """The uint8 codes `raw` as float32 values exactly factor times smaller, and that factor."""

    def encoded_block_bytes(self, layout: KVLayout) -> int:
        if layout.dtype not in _QUANTIZABLE:
            raise UnsupportedBuffer(f"kv codec {self.name!r} compresses caches of {', '.join(_QUANTIZABLE)}, "
                                    f"not {layout.dtype}")
        return layout.block_elements + _SCALE_BYTES * layout.num_kv_heads

    def encode(self, blocks: Any, out: Any) -> None:
        torch = _torch()
        self._check_dtype("encode", blocks, "blocks")
        n, bs, heads, dim = blocks.shape
        _check_rows(self.name, "encode", out, "out", blocks, _scaled_row_bytes(blocks))
        if n == 0:
            return
        x = torch.empty(blocks.shape, dtype=torch.float32, device=blocks.device)
        x.copy_(blocks)  # always a copy, even of float32 blocks: x is divided in place
        scales = _scales(x, self.qmax)
        x.div_(scales[:, None, :, None])
        elems = bs * heads * dim
        self._quantize(x, out[:, :elems].view(n, bs, heads, dim))
        out[:, elems:].copy_(_le_bytes(scales))

    def decode(self, encoded: Any, out: Any) -> None:
        self._check_dtype("decode", out, "out")
        n, bs, heads, dim = out.shape
        _check_rows(self.name, "decode", encoded, "encoded", out, _scaled_row_bytes(out))
        if n == 0:
            return
        elems = bs * heads * dim
        scales = _from_le_bytes(encoded[:, elems:])
        x, factor = self._dequantize(encoded[:, :elems].view(n, bs, heads, dim))
        if factor != 1.0:
            scales.mul_(factor)  # a power of two: exact, so x * scale is the same float32 product
        # one dtype per op: CPU torch runs mixed-dtype elementwise ops (int8 * float32 -> bf16) unvectorized
        out.copy_(x.mul_(scales[:, None, :, None]))

    def _check_dtype(self, op: str, t: Any, what: str) -> None:
        _check_blocks(self.name, op, t, what)
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in _QUANTIZABLE:
            raise UnsupportedBuffer(f"kv codec {self.name!r} {op}: {what} is {dt}; it compresses "
                                    f"{', '.join(_QUANTIZABLE)} blocks")


class Fp8Codec(ScaledCodec):
    """e4m3 (torch.float8_e4m3fn): 3 mantissa bits, so at most 2^-4 relative error over a wide range."""

    name = "fp8"
    qmax = 448.0  # the largest finite e4m3fn value

    def _quantize(self, x: Any, out: Any) -> None:
        torch = _torch()
        x.clamp_(-self.qmax, self.qmax)  # a guard: x/scale is within a rounding step of 448; the cast NaNs >= 464
        out.view(torch.float8_e4m3fn).copy_(x)  # the cast rounds to nearest even

    def _dequantize(self, raw: Any) -> tuple[Any, float]:
        torch = _torch()
        if raw.device.type != "cpu":
            return raw.view(torch.float8_e4m3fn).to(torch.float32), 1.0
        return e4m3_as_float16(raw).to(torch.float32), 256.0


class Int8Codec(ScaledCodec):
    """Symmetric int8: a uniform step of amax/127, so at most half a step of absolute error."""

    name = "int8"
    qmax = 127.0  # -128 is left out, so that -x encodes as the negation of x

    def _quantize(self, x: Any, out: Any) -> None:
        torch = _torch()
        x.round_().clamp_(-self.qmax, self.qmax)  # round first: a float -> int cast truncates
        out.view(torch.int8).copy_(x)

    def _dequantize(self, raw: Any) -> tuple[Any, float]:
        torch = _torch()
        return raw.view(torch.int8).to(torch.float32), 1.0


def e4m3_as_float16(raw: Any) -> Any:
    """The e4m3fn codes `raw` (uint8) as float16 values exactly 2^8 times smaller, by moving bits.

    CPU torch converts float8 one element at a time, several times slower than
    these three integer passes. The code s.eeee.mmm placed into float16's
    s.eeeee.mmmmmmmmmm as s.0eeee.mmm0000000 keeps its mantissa and lowers its
    exponent by 15 - 7 = 8; subnormals too, since both formats' subnormals are the
    mantissa times their smallest step. Read as int8 and widened, the code's sign
    fills the high byte; times 2^7 it lands in place with bit 14 set for negative
    codes, which the mask 0xBF80 clears. The NaN codes (never written) come out finite.
    """
    torch = _torch()
    bits = raw.view(torch.int8).to(torch.int16).mul_(1 << 7).bitwise_and_(0xBF80 - (1 << 16))
    return bits.view(torch.float16)


def _scales(x: Any, qmax: float) -> Any:
    """float32 [n, heads]: amax over (tokens, head_dim) / qmax, floored so that all-zero heads decode to zeros.

    The floor (the smallest normal float32) only matters where amax is 0 or under
    about 1e-36; such values round to 0, an error below that amax.
    """
    torch = _torch()
    dims = (1, 3)
    amax = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg_())  # on CPU faster than abs() then amax
    # qmax as a tensor: CUDA divides by a Python number as a multiply by its rounded reciprocal, and the
    # scales (so the bytes on the wire) would then differ from those a CPU sender writes
    return amax.div_(amax.new_full((), qmax)).clamp_min_(torch.finfo(torch.float32).tiny)


def _le_bytes(scales: Any) -> Any:
    """uint8 [n, 4*heads]: float32 scales as little-endian bytes, whatever the host's byte order."""
    torch = _torch()
    raw = scales.contiguous().view(torch.uint8).view(*scales.shape, _SCALE_BYTES)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host to run on
        raw = raw.flip(-1)
    return raw.reshape(scales.shape[0], -1)


def _from_le_bytes(raw: Any) -> Any:
    """float32 [n, heads] from little-endian scale bytes, copied out first: a row's tail need not be aligned."""
    torch = _torch()
    n = raw.shape[0]
    tail = torch.empty((n, raw.shape[1] // _SCALE_BYTES, _SCALE_BYTES), dtype=torch.uint8, device=raw.device)
    tail.copy_(raw.view(n, -1, _SCALE_BYTES))
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host to run on
        tail = tail.flip(-1).contiguous()
    return tail.view(torch.float32).view(n, -1)


def _as_rows(blocks: Any) -> Any:
    """A contiguous [n, ...] tensor's bytes as uint8 [n, bytes per block] (a view)."""
    torch = _torch()
    return blocks.view(blocks.shape[0], -1).view(torch.uint8)


def _raw_row_bytes(blocks: Any) -> int:
    _, bs, heads, dim = blocks.shape
    return int(bs * heads * dim * blocks.element_size())


def _scaled_row_bytes(blocks: Any) -> int:
    _, bs, heads, dim = blocks.shape
    return int(bs * heads * dim + _SCALE_BYTES * heads)


def _check_blocks(codec: str, op: str, t: Any, what: str) -> None:
    """`t` must be a contiguous [n, block_size, kv_heads, head_dim] floating tensor."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} must be a torch tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise InvalidArgument(f"kv codec {codec!r} {op}: {what} has shape {tuple(t.shape)}; blocks are "
                              f"[n, block_size, kv_heads, head_dim]")
    if not t.is_floating_point():
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} is {t.dtype}, not a floating KV cache dtype")
    if not t.is_contiguous():
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} is not contiguous")


def _check_rows(codec: str, op: str, rows: Any, what: str, blocks: Any, row_bytes: int) -> None:
    """`rows` must be uint8 [n, row_bytes] on the blocks' device; when written to (`out`), contiguous too."""
    torch = _torch()
    if not isinstance(rows, torch.Tensor):
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} must be a torch tensor, got {type(rows).__name__}")
    if rows.dtype != torch.uint8:
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} is {rows.dtype}; encoded rows are torch.uint8")
    want = (int(blocks.shape[0]), row_bytes)
    if tuple(rows.shape) != want:
        raise InvalidArgument(f"kv codec {codec!r} {op}: {what} has shape {tuple(rows.shape)}; {blocks.shape[0]} "
                              f"blocks of shape {tuple(blocks.shape[1:])} need {want}, one row per block")
    if rows.device != blocks.device:
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: {what} is on {rows.device}, the blocks on {blocks.device}")
    if what == "out" and not rows.is_contiguous():
        raise UnsupportedBuffer(f"kv codec {codec!r} {op}: out is not contiguous")


_CODECS: dict[str, Codec] = {"none": RawCodec(), "fp8": Fp8Codec(), "int8": Int8Codec()}


def get_codec(name: str | None) -> Codec:
    """The codec called `name`; None means "none". Unknown names raise InvalidArgument listing the valid ones."""
    if name is None:
        return _CODECS["none"]
    codec = _CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise InvalidArgument(f"unknown KV codec {name!r}; choose one of None, {', '.join(map(repr, _CODECS))}")
    return codec


def sample_blocks(layout: KVLayout, num_blocks: int, *, seed: int = 0, distribution: str = "normal",
                  device: Any = "cpu") -> Any:
    """Random blocks shaped like one layer's K, in the layout's dtype: standard normal, or with outlier channels.

    "outliers": in every kv head, 4 of the head_dim channels (the same ones in
    every token, as real keys show) are 10x larger than the rest. Seeded on the
    CPU, so a seed gives the same data on every device.
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_blocks, *layout.block_shape), generator=gen, dtype=torch.float32)
    if distribution == "outliers":
        for h in range(layout.num_kv_heads):
            x[:, :, h, torch.randperm(layout.head_dim, generator=gen)[:4]] *= 10.0
    elif distribution != "normal":
        raise InvalidArgument(f"distribution must be 'normal' or 'outliers', got {distribution!r}")
    return x.to(device=device, dtype=layout.torch_dtype)


def measure_error(codec_name: str | None, layout: KVLayout, *, num_blocks: int = 64, seed: int = 0,
                  distribution: str = "normal", device: Any = "cpu") -> dict[str, Any]:
    """Encode and decode random blocks of `layout`: the compression ratio and the error, after the cast back.

    max_rel_error_per_block is the largest |error| in a (block, head) over that
    pair's amax, the quantity the format bounds (fp8: 2^-4, int8: 1/254, each
    plus the cache dtype's own rounding).
    """
    torch = _torch()
    codec = get_codec(codec_name)
    x = sample_blocks(layout, num_blocks, seed=seed, distribution=distribution, device=device)
    rows = torch.empty((num_blocks, codec.encoded_block_bytes(layout)), dtype=torch.uint8, device=x.device)
    codec.encode(x, rows)
    y = torch.empty_like(x)
    codec.decode(rows, y)
    xf = x.double()
    err = (y.double() - xf).abs()
    amax = xf.abs().amax(dim=(1, 3)).clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "codec": codec.name,
        "dtype": layout.dtype,
        "distribution": distribution,
        "num_blocks": num_blocks,
        "block_bytes": layout.block_bytes,
        "encoded_block_bytes": codec.encoded_block_bytes(layout),
        "compression_ratio": layout.block_bytes / codec.encoded_block_bytes(layout),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "rel_rms_error": float(err.square().mean().sqrt() / xf.square().mean().sqrt()),
        "max_rel_error_per_block": float((err.amax(dim=(1, 3)) / amax).max()),
    }


def measure_throughput(codec_name: str | None, layout: KVLayout, *, num_blocks: int = 256, repeats: int = 7,
                       seed: int = 0, device: Any = "cpu") -> dict[str, Any]:
    """Median encode and decode speed over `repeats` runs, in GB/s (1e9 bytes) of raw blocks in the layout dtype."""
    torch = _torch()
    codec = get_codec(codec_name)
    x = sample_blocks(layout, num_blocks, seed=seed, device=device)
    rows = torch.empty((num_blocks, codec.encoded_block_bytes(layout)), dtype=torch.uint8, device=x.device)
    y = torch.empty_like(x)
    raw = num_blocks * layout.block_bytes
    enc = _median_seconds(lambda: codec.encode(x, rows), repeats, x.device)
    dec = _median_seconds(lambda: codec.decode(rows, y), repeats, x.device)
    return {"codec": codec.name, "device": str(x.device), "threads": torch.get_num_threads(), "raw_bytes": raw,
            "encode_gb_per_s": raw / enc / 1e9, "decode_gb_per_s": raw / dec / 1e9}


def _median_seconds(fn: Callable[[], None], repeats: int, dev: Any) -> float:
    torch = _torch()
    cuda = dev.type == "cuda"
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
