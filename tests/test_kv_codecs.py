"""KV codecs: "none" is bitwise exact, fp8/int8 stay within the bound their format gives, rows stand alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sagellm_comm.errors import InvalidArgument, UnsupportedBuffer  # noqa: E402
from sagellm_comm.kv import KVLayout  # noqa: E402
from sagellm_comm.kv.codecs import e4m3_as_float16, get_codec, measure_error, sample_blocks  # noqa: E402

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DTYPES = ["bfloat16", "float16", "float32"]
QMAX = {"fp8": 448.0, "int8": 127.0}
SMALL = KVLayout(num_layers=2, num_kv_heads=4, head_dim=32, block_size=4)  # block_shape (4, 4, 32)
ISSUE = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")


def _encode(name: str | None, x: Any) -> Any:
    codec = get_codec(name)
    _, bs, heads, dim = x.shape
    layout = KVLayout(1, heads, dim, bs, str(x.dtype).removeprefix("torch."))
    rows = torch.full((x.shape[0], codec.encoded_block_bytes(layout)), 0xAB, dtype=torch.uint8, device=x.device)
    codec.encode(x, rows)
    return rows


def _decode(name: str | None, rows: Any, like: Any) -> Any:
    out = torch.full_like(like, float("nan"))
    get_codec(name).decode(rows, out)
    return out


def _varied(n: int, dtype: str, device: str, seed: int = 0) -> Any:
    """Normal blocks whose (block, head) magnitudes span 10^-3..10^3, with a few values deep in e4m3's subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *SMALL.block_shape), generator=g)
    x *= 10.0 ** (torch.rand((n, 1, SMALL.num_kv_heads, 1), generator=g) * 6 - 3)
    x[:, 0, :, :4] *= 1e-4  # below amax * 2^-15: e4m3 subnormals after scaling
    return x.to(device=device, dtype=getattr(torch, dtype))


def _scales(rows: Any, heads: int) -> Any:
    """The float32 scales at the end of each row, read as little-endian independently of the codec."""
    tail = rows[:, -4 * heads :].cpu().contiguous().numpy()
    return torch.from_numpy(np.frombuffer(tail.tobytes(), dtype="<f4").astype(np.float32).reshape(len(tail), heads))


def _amax(x: Any) -> Any:
    return x.float().abs().amax(dim=(1, 3))


def _format_bound(name: str, x: Any, scales: Any) -> Any:
    """Largest |x - decoded| the format allows: fp8 2^-4|x| + s 2^-10 (subnormal half step), int8 s/2.

    Plus the cast back into x's dtype (half an ulp, also of its subnormals) and
    float32 rounding of x/s and q*s.
    """
    xf = x.double().abs()
    s = scales.double().to(x.device)[:, None, :, None]
    fmt = 2.0**-4 * xf + s * 2.0**-10 if name == "fp8" else s / 2
    fmt = fmt * (1 + 1e-4) + 2.0**-22 * xf
    fi = torch.finfo(x.dtype)
    return fmt + fi.eps / 2 * (xf + fmt) + fi.tiny * fi.eps / 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_none_is_the_raw_bytes_and_roundtrips_bitwise(dtype: str, device: str) -> None:
    x = _varied(6, dtype, device)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    rows = _encode(None, x)
    assert rows.shape == (6, SMALL.block_elements * x.element_size())
    assert torch.equal(rows, x.view(6, -1).view(torch.uint8))
    y = _decode("none", rows, x)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_error_within_the_format_bound(name: str, dtype: str, device: str) -> None:
    x = _varied(16, dtype, device, seed=1)
    before = x.clone()
    rows = _encode(name, x)
    assert torch.equal(x, before), "encode must not touch its input"
    y = _decode(name, rows, x)
    scales = _scales(rows, SMALL.num_kv_heads)
    err = (y.double() - x.double()).abs()
    assert bool(torch.isfinite(y).all())
    assert bool((err <= _format_bound(name, x, scales)).all())
    assert float((err.amax(dim=(1, 3)) / _amax(x).double()).max()) <= (1 / 16 if name == "fp8" else 1 / 254) + 2**-8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_rows_match_a_per_block_per_head_reference(name: str, device: str) -> None:
    """Row j = block j quantized in its [block_size, heads, dim] order, then heads float32 scales (amax/qmax)."""
    x = _varied(5, "bfloat16", device, seed=2)
    rows = _encode(name, x).cpu()
    qdtype = torch.float8_e4m3fn if name == "fp8" else torch.int8
    for j in range(x.shape[0]):
        q = torch.empty(SMALL.block_shape, dtype=qdtype)
        scales = []
        for h in range(SMALL.num_kv_heads):
            v = x[j, :, h, :].float().cpu()
            s = v.abs().max() / QMAX[name]
            t = v / s
            t = t.clamp(-448, 448) if name == "fp8" else t.round().clamp(-127, 127)
            q[:, h, :] = t.to(qdtype)
            scales.append(float(s))
        want = q.view(torch.uint8).flatten().numpy().tobytes() + np.array(scales, dtype="<f4").tobytes()
        assert rows[j].numpy().tobytes() == want, f"row {j}"
        decoded = (q.float() * torch.tensor(scales)[None, :, None]).to(x.dtype)  # one rounding, into the dtype
        assert torch.equal(_decode(name, rows[j : j + 1].to(device), x[j : j + 1]).cpu()[0], decoded), f"row {j}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_cuda_and_cpu_write_the_same_bytes(name: str) -> None:
    """A CPU sender and a CUDA receiver (or the reverse) agree bit for bit."""
    x = sample_blocks(ISSUE, 32, seed=5, distribution="outliers")
    rows = _encode(name, x)
    assert torch.equal(_encode(name, x.cuda()).cpu(), rows)
    assert torch.equal(_decode(name, rows.cuda(), x.cuda()).cpu(), _decode(name, rows, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_zero_blocks_and_heads_decode_to_exact_zeros(name: str, device: str) -> None:
    x = _varied(3, "bfloat16", device)
    x[0] = 0
    x[1, :, 2, :] = 0
    rows = _encode(name, x)
    codes = rows[:, : SMALL.block_elements].view(3, *SMALL.block_shape)
    assert not bool(codes[0].any()) and not bool(codes[1, :, 2, :].any()), "zeros must encode as the code of +0"
    y = _decode(name, rows, x)
    zeros = torch.cat([y[0].flatten(), y[1, :, 2, :].flatten()])
    assert bool((zeros == 0).all()) and not bool(torch.signbit(zeros).any())
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(_scales(rows, SMALL.num_kv_heads)).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_scales_are_per_block_and_head(name: str, device: str) -> None:
    """A huge head changes nothing else: not the block's other heads, not other blocks."""
    x = sample_blocks(SMALL, 4, seed=3, device=device)
    loud = x.clone()
    loud[1, :, 0, :] *= 1e4
    quiet_y = _decode(name, _encode(name, x), x)
    loud_y = _decode(name, _encode(name, loud), loud)
    others = torch.ones(4, SMALL.num_kv_heads, dtype=torch.bool)
    others[1, 0] = False
    assert torch.equal(loud_y.permute(0, 2, 1, 3)[others], quiet_y.permute(0, 2, 1, 3)[others])
    rel = (quiet_y.float() - x.float()).abs().amax(dim=(1, 3)) / _amax(x)
    assert float(rel.max()) <= (1 / 16 if name == "fp8" else 1 / 254) + 2**-8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["none", "fp8", "int8"])
def test_rows_are_self_contained(name: str, device: str) -> None:
    """Decoding some rows equals decoding all and selecting; rows may live in a bigger staging buffer."""
    x = sample_blocks(SMALL, 10, seed=4, distribution="outliers", device=device)
    enc = get_codec(name).encoded_block_bytes(SMALL)
    stage = torch.zeros((2, 16, enc), dtype=torch.uint8, device=device)
    get_codec(name).encode(x, stage[1, :10])
    assert torch.equal(stage[1, :10], _encode(name, x)) and not bool(stage[0].any())
    whole = _decode(name, stage[1, :10], x)
    pick = torch.tensor([7, 2, 5], device=device)
    part = _decode(name, stage[1, :10].index_select(0, pick), x[:3])
    assert torch.equal(part, whole.index_select(0, pick))
    big = torch.zeros((8, *SMALL.block_shape), dtype=x.dtype, device=device)
    get_codec(name).decode(stage[1, 7:10], big[2:5])  # out: a view into a bigger cache tensor
    assert torch.equal(big[2:5], whole[7:10]) and not bool(big[:2].any()) and not bool(big[5:].any())


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_issue_shape_halves_the_bytes(name: str) -> None:
    codec = get_codec(name)
    assert ISSUE.block_bytes == 32768
    assert codec.encoded_block_bytes(ISSUE) == 16 * 8 * 128 + 4 * 8
    assert not codec.lossless
    stats = measure_error(name, ISSUE, num_blocks=8)
    assert stats["compression_ratio"] == ISSUE.block_bytes / codec.encoded_block_bytes(ISSUE) >= 1.99


def test_none_codec_is_lossless_and_the_default() -> None:
    assert get_codec(None) is get_codec("none")
    assert get_codec(None).name == "none" and get_codec(None).lossless
    assert get_codec(None).encoded_block_bytes(ISSUE) == ISSUE.block_bytes
    assert [get_codec(n).name for n in ("fp8", "int8")] == ["fp8", "int8"]


@pytest.mark.fault("unknown KV codec name ('fp9', 'FP8', '', 'zstd', 8)", "InvalidArgument listing the codecs")
@pytest.mark.parametrize("name", ["fp9", "FP8", "", "zstd", 8])
def test_unknown_codec_names_the_choices(name: Any) -> None:
    with pytest.raises(InvalidArgument, match="'fp8', 'int8'"):
        get_codec(name)


@pytest.mark.fault("KV codec given encoded rows of the wrong size, count, dtype or layout, blocks of the wrong "
                   "shape, not a tensor or not contiguous, or an integer output",
                   "InvalidArgument or UnsupportedBuffer naming the problem")
@pytest.mark.parametrize("name", ["none", "fp8", "int8"])
def test_bad_shapes_and_dtypes_raise(name: str) -> None:
    codec = get_codec(name)
    x = sample_blocks(SMALL, 3)
    enc = codec.encoded_block_bytes(SMALL)
    good = torch.empty((3, enc), dtype=torch.uint8)
    with pytest.raises(InvalidArgument, match=r"\(3, " + str(enc)):
        codec.encode(x, torch.empty((3, enc - 1), dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="one row per block"):
        codec.encode(x, torch.empty((2, enc), dtype=torch.uint8))
    with pytest.raises(UnsupportedBuffer, match="uint8"):
        codec.encode(x, torch.empty((3, enc), dtype=torch.int8))
    with pytest.raises(UnsupportedBuffer, match="contiguous"):
        codec.encode(x, torch.empty((enc, 3), dtype=torch.uint8).t())
    with pytest.raises(InvalidArgument, match="block_size, kv_heads, head_dim"):
        codec.encode(x[0], good[:1])
    with pytest.raises(UnsupportedBuffer, match="torch tensor"):
        codec.encode(x.float().numpy() if name == "fp8" else list(x), good)
    with pytest.raises(UnsupportedBuffer, match="contiguous"):
        codec.encode(x.transpose(1, 2), good)
    codec.encode(x, good)
    with pytest.raises(InvalidArgument, match="encoded has shape"):
        codec.decode(good[:, :-1], torch.empty_like(x))
    with pytest.raises(UnsupportedBuffer, match="floating"):
        codec.decode(good, torch.empty(x.shape, dtype=torch.int16))


@pytest.mark.fault("fp8 or int8 codec for a float8 KV cache", "UnsupportedBuffer naming float8_e4m3fn")
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_quantizing_codecs_refuse_8_bit_caches(name: str) -> None:
    with pytest.raises(UnsupportedBuffer, match="float8_e4m3fn"):
        get_codec(name).encoded_block_bytes(KVLayout(1, 4, 32, 4, dtype="float8_e4m3fn"))


def test_e4m3_bit_move_equals_the_torch_cast() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    got = e4m3_as_float16(codes).float() * 256
    finite = ~want.isnan()
    assert int(finite.sum()) == 254
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))  # -0.0 stays -0.0


@pytest.mark.parametrize("distribution", ["normal", "outliers"])
def test_measure_error_reports_bounded_errors(distribution: str) -> None:
    layout = KVLayout(1, 8, 128, 16, "bfloat16")
    fp8 = measure_error("fp8", layout, num_blocks=16, distribution=distribution)
    int8 = measure_error("int8", layout, num_blocks=16, distribution=distribution)
    none = measure_error(None, layout, num_blocks=16, distribution=distribution)
    assert none["compression_ratio"] == 1.0 and none["max_abs_error"] == 0.0 and none["rel_rms_error"] == 0.0
    assert 0 < fp8["max_rel_error_per_block"] <= 1 / 16 + 2**-8
    assert 0 < int8["max_rel_error_per_block"] <= 1 / 254 + 2**-8
    assert 0 < fp8["mean_abs_error"] <= fp8["max_abs_error"]
    assert 0.01 < fp8["rel_rms_error"] < 0.04  # e4m3: ~2.6% on Gaussian data
    assert int8["rel_rms_error"] < (0.012 if distribution == "normal" else 0.04)
    with pytest.raises(InvalidArgument, match="distribution"):
        measure_error("fp8", layout, distribution="uniform")
