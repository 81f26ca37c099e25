"""Numerics of the formats against independent references, bit for bit.

References (never our own code):
- ModelOpt 0.47 `NVFP4QTensor` / `FP8QTensor` run on CPU torch tensors (FORMATS.md section 2-3),
- torch's `float8_e4m3fn` cast of fp32 (round to nearest even),
- brute-force FP4 and E4M3 rounding written here from FORMATS.md section 1.
NVFP4's Quantizer has two paths for 16-bit inputs, a lookup table and a direct division; every
NVFP4 check below runs both (see `ours_nvfp4`) and asserts which one ran.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from shardquant import formats
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

from shardquant.errors import NumericError
from shardquant.formats import base, fp8, nvfp4

DTYPES = ("BF16", "F16", "F32")
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
NAME = "model.layers.0.mlp.down_proj.weight"
# nvfp4.Quantizer.quantize takes the table path iff the input is 16-bit and
# raw.size >= (1 << 16) * distinct_block_scales // 4.
LUT_ELEMS_PER_SCALE = 1 << 14
FP4_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FP4_MAGS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_ONE = 0x38  # E4M3 code of 1.0


# ---------------------------------------------------------------- conversions and references

def to_raw(w: torch.Tensor) -> np.ndarray:
    """The raw storage shardquant reads: bf16 as uint16 bits, f16 / f32 as themselves."""
    w = w.contiguous()
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16).numpy().view(np.uint16).copy()
    return w.numpy().copy()


def dtype_name(w: torch.Tensor) -> str:
    return {v: k for k, v in TORCH.items()}[w.dtype]


def exact_tensor(x: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of the given dtype holding exactly the float32 values x (asserted)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(TORCH[dtype])
    back = t.float().numpy()
    assert np.array_equal(back.view(np.uint32), np.asarray(x, np.float32).view(np.uint32)), (
        f"test construction: values not exact in {dtype}: {x[back != x][:8]}")
    return t


def from_bits(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor from raw bit patterns (uint16 for BF16/F16, uint32 for F32)."""
    if dtype == "BF16":
        return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
    if dtype == "F16":
        return torch.from_numpy(bits.astype(np.uint16).view(np.float16).copy())
    return torch.from_numpy(bits.astype(np.uint32).view(np.float32).copy())


def finite_bits_16(dtype: str) -> np.ndarray:
    """Every finite 16-bit pattern of BF16 or F16 (both have 5 or 8 exponent bits all-ones = Inf/NaN)."""
    allv = np.arange(1 << 16, dtype=np.uint32)
    top = 0x7F80 if dtype == "BF16" else 0x7C00
    return allv[(allv & 0x7FFF) < top].astype(np.uint16)


def fp4_ref_exact(v: float) -> int:
    """FORMATS.md section 1, in exact rationals: saturate above 6, else the nearest E2M1 magnitude,
    ties to the even code; sign bit only for v < 0."""
    q = Fraction(min(abs(v), 6.0))
    dist = [abs(q - Fraction(m)) for m in FP4_MAGS]
    best = min(dist)
    idx = [i for i, d in enumerate(dist) if d == best]
    code = idx[0] if len(idx) == 1 else next(i for i in idx if i % 2 == 0)
    return code | (8 if v < 0 else 0)


def fp4_ref(x: np.ndarray) -> np.ndarray:
    """Vectorised form of fp4_ref_exact. Exact: after clamping to 6, |v| - m is exact in float64
    whenever |v| >= 2^-28 (fp32 has 24 bits, m <= 6); below that the nearest is 0 by far."""
    x = np.asarray(x, np.float32)
    a = np.minimum(np.abs(x.astype(np.float64)), 6.0)
    dist = np.abs(a[..., None] - np.array(FP4_MAGS))
    best = dist.min(axis=-1, keepdims=True)
    tie = (dist == best)
    # among equal distances take the even code (at most two are equal: neighbours)
    even_first = np.where(tie & (np.arange(8) % 2 == 0), 0, np.where(tie, 1, 2))
    code = np.argmin(even_first * 16 + np.arange(8), axis=-1).astype(np.uint8)
    return code | ((x < 0).astype(np.uint8) << 3)


def modelopt_fp4(x: np.ndarray) -> np.ndarray:
    return NVFP4QTensor._cast_fp4(torch.from_numpy(np.array(x, np.float32))).numpy().astype(np.uint8)


def torch_e4m3(x: np.ndarray) -> np.ndarray:
    """torch's fp32 -> float8_e4m3fn cast (RNE), as codes. Caller clamps."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def e4m3_values() -> np.ndarray:
    """All finite non-negative E4M3 values, ascending (codes 0x00..0x7E)."""
    return np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def unpack(packed: np.ndarray) -> np.ndarray:
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes


# ---------------------------------------------------------------- NVFP4: runners and comparison

def modelopt_nvfp4(w: torch.Tensor, s2: np.float32) -> tuple[np.ndarray, np.ndarray]:
    q, sc, s2_out = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=torch.tensor(np.float32(s2)))
    assert float(s2_out) == float(s2) or (math.isnan(float(s2)) and math.isnan(float(s2_out)))
    return q._quantized_data.numpy(), sc.view(torch.uint8).numpy()


def lut_expected(raw: np.ndarray, dtype: str, scales: np.ndarray) -> bool:
    return dtype in ("BF16", "F16") and raw.size >= LUT_ELEMS_PER_SCALE * len(np.unique(scales))


def ours_nvfp4(raw, dtype, s2, path, q=None):
    """Our quantizer on raw, asserting which internal path it took ('lut' or 'direct')."""
    q = q if q is not None else nvfp4.Quantizer(np.float32(s2))
    before = dtype in q._lut
    packed, scales = q.quantize(raw, dtype, NAME)
    took = "lut" if lut_expected(raw, dtype, scales) else "direct"
    assert took == path, f"expected the {path} path, the size/scale condition gives {took}"
    if path == "lut":
        assert dtype in q._lut and q._built[dtype][np.unique(scales)].all(), "LUT path did not build its table"
    else:
        assert (dtype in q._lut) == before, "direct path touched the table"
    return packed, scales


def describe_mismatch(raw, dtype, s2, ours, ref) -> str:
    """Worst block, first differing element, both codes in bits and the block's input values."""
    (op, os_), (rp, rs) = ours, ref
    oc, rc = unpack(op), unpack(rp)
    rows, cols = oc.shape
    nb = cols // 16
    f = base.to_f32(raw, dtype)
    bad = (oc != rc).reshape(rows, nb, 16).sum(axis=2) + 16 * (os_ != rs)
    r, b = np.unravel_index(np.argmax(bad), bad.shape)
    lines = [f"{int((oc != rc).sum())} of {oc.size} codes and {int((os_ != rs).sum())} of {os_.size} "
             f"block scales differ; dtype {dtype}, s2 = {float(s2)!r} (0x{np.float32(s2).view(np.uint32):08x})"]
    diff = np.argwhere(oc != rc)
    if diff.size:
        i, j = diff[0]
        d = np.float32(np.uint8(rs[i, j // 16]).view(ml_dtypes.float8_e4m3fn)) * np.float32(s2)
        lines.append(f"first differing element [{i},{j}]: input {f[i, j]!r} "
                     f"(raw 0x{int(raw.view(base._UINT[dtype])[i, j]):x}), W / (modelopt scale * s2) = "
                     f"{f[i, j] / d!r}: ours 0b{oc[i, j]:04b} modelopt 0b{rc[i, j]:04b}")
    sl = slice(16 * b, 16 * b + 16)
    sv = lambda c: float(np.uint8(c).view(ml_dtypes.float8_e4m3fn))  # noqa: E731
    lines += [f"worst block [{r},{b}]: scale ours 0x{os_[r, b]:02x} ({sv(os_[r, b])}) "
              f"modelopt 0x{rs[r, b]:02x} ({sv(rs[r, b])})",
              f"  inputs   {[float(v) for v in f[r, sl]]}",
              f"  ours     {[f'{c:04b}' for c in oc[r, sl]]}",
              f"  modelopt {[f'{c:04b}' for c in rc[r, sl]]}"]
    return "\n".join(lines)


def assert_same_nvfp4(raw, dtype, s2, ours, ref, what=""):
    same = np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])
    assert same, f"{what}\n" + describe_mismatch(raw, dtype, s2, ours, ref)


def check_nvfp4(w: torch.Tensor, s2, *, table: bool = True):
    """Ours == ModelOpt for tensor w against s2, on every path our Quantizer has for its dtype.
    The direct path runs on w in row slices too small for a table; the table path (16-bit inputs,
    unless table=False) on w tiled along rows until the table pays off: ModelOpt's result for a
    given s2 is per block, so its result tiles too. Returns ModelOpt's (packed, scales)."""
    dtype = dtype_name(w)
    raw = to_raw(w)
    ref = modelopt_nvfp4(w, s2)
    rows, cols = raw.shape
    # direct path, on row slices below the table threshold
    step = max(1, (LUT_ELEMS_PER_SCALE - 1) // cols) if dtype != "F32" else rows
    parts = [ours_nvfp4(raw[a:a + step], dtype, s2, "direct") for a in range(0, rows, step)]
    ours = (np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts]))
    assert_same_nvfp4(raw, dtype, s2, ours, ref, "direct path")
    if dtype != "F32" and table:
        reps = -(-LUT_ELEMS_PER_SCALE * len(np.unique(ref[1])) // raw.size)
        tiled = np.tile(raw, (reps, 1))
        ref_t = (np.tile(ref[0], (reps, 1)), np.tile(ref[1], (reps, 1)))
        ours_t = ours_nvfp4(tiled, dtype, s2, "lut")
        assert_same_nvfp4(tiled, dtype, s2, ours_t, ref_t, "table path")
    return ref


def our_s2(w: torch.Tensor) -> np.float32:
    return nvfp4.global_scale(base.tensor_amax(to_raw(w), dtype_name(w), NAME))


def modelopt_s2(w: torch.Tensor) -> np.float32:
    return np.float32(NVFP4QTensor.get_weights_scaling_factor_2(w).item())


def randn(shape, scale, seed, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(TORCH[dtype])


# ================================================================ 1. NVFP4 against ModelOpt

@pytest.mark.parametrize("dtype", DTYPES)
def test_global_scale_matches_modelopt(dtype):
    mags = [1e-3, 1.0, 1e3] + ([1e-30, 1e30] if dtype != "F16" else [1e-6, 1e-7])
    for i, m in enumerate(mags):
        for shape in [(1, 16), (17, 272), (64, 256)]:
            w = randn(shape, m, 100 * i + shape[0], dtype)
            ref = NVFP4QTensor.get_weights_scaling_factor_2(w)
            ours = our_s2(w)
            assert ref.dtype == torch.float32
            assert np.float32(ref.item()).view(np.uint32) == ours.view(np.uint32), (dtype, m, shape, ref.item(), ours)


def test_global_scale_is_correctly_rounded_division():
    """s2 = amax / 2688 and the FP8 scale amax / 448, one correctly rounded fp32 division each;
    1.0 where that quotient would be subnormal (our documented rule: such weights are zero at
    this precision; ModelOpt keeps the subnormal or, for amax == 0, writes 0 and NaN scales)."""
    # fp32 a/b through float64 then rounded is correctly rounded (53 >= 2*24 + 2): an independent ref.
    def expect(a, div):
        q = np.float32(np.float64(a) / div)
        return np.float32(1.0) if q < np.float32(2.0**-126) else q

    rng = np.random.default_rng(1)
    bits = rng.integers(1, 0x7F800000, 4000, dtype=np.uint32)  # every positive finite fp32, subnormals too
    bits = np.concatenate([bits, np.arange(0, 64, dtype=np.uint32),
                           np.array([0x7F7FFFFF, 0x00800000], np.uint32)])
    normal = 0
    for a in bits.view(np.float32):
        assert nvfp4.global_scale(a).view(np.uint32) == expect(a, 2688.0).view(np.uint32), a
        assert fp8.global_scale(a).view(np.uint32) == expect(a, 448.0).view(np.uint32), a
        normal += expect(a, 2688.0) != np.float32(np.float64(a) / 2688.0)
    assert 50 < normal < 1000, "test construction: both regimes must be sampled"
    # and torch's CPU division, as ModelOpt runs it, on a 0-dim tensor (where s2 is normal)
    for a in bits[:400].view(np.float32):
        t = np.float32(NVFP4QTensor.get_weights_scaling_factor_2(torch.tensor([a])).item())
        if t >= np.float32(2.0**-126):
            assert t.view(np.uint32) == nvfp4.global_scale(a).view(np.uint32), a
        else:
            assert nvfp4.global_scale(a) == np.float32(1.0), a


SHAPES = [(1, 16), (3, 48), (17, 272), (33, 16), (33, 48), (2, 272)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mag", [1e-3, 1.0, 1e3, 1e-30])
def test_nvfp4_random_matches_modelopt(dtype, mag):
    if dtype == "F16" and mag == 1e-30:
        mag = 1e-5  # f16 cannot hold 1e-30: use its subnormal range instead
    for k, shape in enumerate(SHAPES):
        w = randn(shape, mag, k, dtype)
        assert torch.isfinite(w).all()
        check_nvfp4(w, our_s2(w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_mixed_outliers(dtype):
    for seed in range(3):
        w = randn((33, 272), 0.02, seed, "F32")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, w.numel(), (12,), generator=g)
        w.view(-1)[idx] *= torch.tensor([300.0, -1000.0, 50.0] * 4)
        w[5, 16:32] *= 1e-4  # a block of tiny values beside the outliers
        w = w.to(TORCH[dtype])
        check_nvfp4(w, our_s2(w))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_nvfp4_large_tensor_takes_table_path(dtype):
    """A realistic 512x4096 weight: the whole tensor goes through the table; row slices too small
    for a table go through the direct path; both equal ModelOpt."""
    w = randn((512, 4096), 0.02, 7, dtype)
    s2 = our_s2(w)
    raw = to_raw(w)
    ref = modelopt_nvfp4(w, s2)
    assert lut_expected(raw, dtype, ref[1]), "test construction: too many distinct scales for a table"
    assert_same_nvfp4(raw, dtype, s2, ours_nvfp4(raw, dtype, s2, "lut"), ref, "table path")
    check_nvfp4(w[:40], s2, table=False)  # direct path on slices of the same data


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_nvfp4_prewarmed_table_is_reused(dtype):
    """One Quantizer over several members of a logical quantizer: the second and third tensors
    reuse rows of the table built for the first and add their own."""
    a = randn((512, 2048), 0.02, 1, dtype)
    b = randn((512, 2048), 0.002, 2, dtype)  # smaller values: partly different block scales
    s2 = nvfp4.global_scale(max(base.tensor_amax(to_raw(t), dtype, NAME) for t in (a, b)))
    q = nvfp4.Quantizer(s2)
    for t in (a, b, a):
        raw = to_raw(t)
        ref = modelopt_nvfp4(t, s2)
        assert_same_nvfp4(raw, dtype, s2, ours_nvfp4(raw, dtype, s2, "lut", q=q), ref, "pre-warmed table")
    # and a small tensor through the same (warm) quantizer takes the direct path, still exact
    small = b[:2, :64]
    assert_same_nvfp4(to_raw(small), dtype, s2, ours_nvfp4(to_raw(small), dtype, s2, "direct", q=q),
                      modelopt_nvfp4(small, s2), "direct path beside a warm table")


def test_table_threshold_is_where_we_think():
    """The path condition as read from the code: one distinct block scale switches to the table
    at exactly 16384 elements. Both sides equal ModelOpt."""
    block = exact_tensor(np.array([6, 1, -2, 0.5, 3, -6, 4, 0, 1.5, -0.5, 2, 5, -3, 1, 0.25, 0.75], np.float32), "BF16")
    for n, path in [(16384 // 16, "lut"), (16384 // 16 - 1, "direct")]:
        w = block.repeat(n, 1)
        raw = to_raw(w)
        ref = modelopt_nvfp4(w, np.float32(1.0))
        assert len(np.unique(ref[1])) == 1
        assert_same_nvfp4(raw, "BF16", 1.0, ours_nvfp4(raw, "BF16", np.float32(1.0), path), ref, path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_zero_blocks_and_negative_zero(dtype):
    w = randn((5, 64), 1.0, 3, "F32")
    w[0, 0:16] = 0.0  # all-zero block: scale 1.0
    w[1, 16:32] = -0.0  # all negative-zero block: scale 1.0, codes 0
    w[2, :] = -0.0  # a whole row of -0.0
    w[3, 5] = -0.0
    w[4, 0:16] = torch.tensor([-0.0, 0.0] * 8)
    w = w.to(TORCH[dtype])
    pk, sc = check_nvfp4(w, our_s2(w))
    codes = unpack(pk)
    assert sc[0, 0] == E4M3_ONE and sc[1, 1] == E4M3_ONE and (sc[2] == E4M3_ONE).all()
    assert not codes[0, 0:16].any() and not codes[1, 16:32].any() and not codes[2].any()
    assert codes[3, 5] == 0 and not codes[4, 0:16].any(), "-0.0 must give code 0, not 8"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_zero_tensor_documented_behaviour(dtype):
    """amax == 0: we write s2 = 1.0, every code 0, every block scale 1.0 (E4M3 0x38). ModelOpt's
    own s2 is 0 there and its block scales NaN, which is why we deviate."""
    for sign in (0.0, -0.0):
        w = torch.full((3, 48), sign, dtype=TORCH[dtype])
        raw = to_raw(w)
        amax = base.tensor_amax(raw, dtype, NAME)
        assert amax == 0
        s2 = nvfp4.global_scale(amax)
        assert s2.dtype == np.float32 and s2.view(np.uint32) == np.float32(1.0).view(np.uint32)
        pk, sc = nvfp4.quantize(raw, dtype, s2, NAME)
        assert pk.shape == (3, 24) and sc.shape == (3, 3)
        assert not pk.any() and (sc == E4M3_ONE).all()
        check_nvfp4(w, s2)  # ModelOpt given our s2 = 1.0 agrees
        theirs = NVFP4QTensor.get_weights_scaling_factor_2(w)
        assert theirs.item() == 0.0
        _, their_sc, _ = NVFP4QTensor.quantize(w, 16)
        assert torch.isnan(their_sc.float()).all()


# Block scale S (an E4M3 value) and s2 pairs for which d = S * s2, 6d and bound * d are exact.
TIE_CASES = [(1.0, 1.0), (0.5, 1.0), (1.125, 2.0**-10), (448.0, 2.0**-12), (2.0**-9, 2.0**-10),
             (2.0**-7, 1.0), (0.875, 0.375), (3.0, 1.5 * 2.0**-8)]


def _nextafter_in(x: np.ndarray, dtype: str, direction: float) -> np.ndarray:
    """The neighbour of each value in the given input dtype (towards +inf or -inf)."""
    if dtype == "BF16":
        bits = exact_bf16_bits(x)
        up = (np.sign(x) == np.sign(direction)) | (x == 0)
        step = np.where(up, 1, -1).astype(np.int32)
        return ((bits.astype(np.int32) + step).astype(np.uint32) << 16).view(np.float32)
    npd = np.float16 if dtype == "F16" else np.float32
    return np.nextafter(x.astype(npd), npd(direction)).astype(np.float32)


def exact_bf16_bits(x: np.ndarray) -> np.ndarray:
    b = np.asarray(x, np.float32).view(np.uint32)
    assert not (b & 0xFFFF).any()
    return (b >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,s2", TIE_CASES)
def test_nvfp4_exact_ties_at_every_bound(dtype, S, s2):
    """Blocks whose max fixes the block scale exactly, so W / (scale * s2) lands exactly on every
    rounding bound; a second block one input-ulp either side of each bound."""
    S, s2 = np.float32(S), np.float32(s2)
    d = S * s2
    assert np.float64(d) == np.float64(S) * np.float64(s2)
    b = np.array(FP4_BOUNDS, np.float32)
    ties = np.concatenate([[6.0], b, -b, [-6.0]]).astype(np.float32) * d
    t = exact_tensor(ties, dtype)
    above = _nextafter_in(b * d, dtype, np.inf)
    below = _nextafter_in(b * d, dtype, -np.inf)
    near = np.concatenate([[6 * d], above, below, [-6 * d]]).astype(np.float32)
    w = torch.stack([t, exact_tensor(near, dtype), exact_tensor(-near, dtype)])
    raw = to_raw(w)
    q = base.to_f32(raw, dtype) / (S * s2)
    assert np.array_equal(q[0], np.concatenate([[6.0], b, -b, [-6.0]])), "test construction: quotients not exact"
    pk, sc = check_nvfp4(w, s2)
    assert (sc.view(ml_dtypes.float8_e4m3fn).astype(np.float32) == S).all()
    codes = unpack(pk)
    # exact ties: 0.25 1.25 2.5 5 round down, 0.75 1.75 3.5 round up, from FORMATS.md directly
    expect = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]
    assert codes[0].tolist() == expect
    for r in range(3):
        assert np.array_equal(codes[r], fp4_ref(q[r])), (r, q[r], codes[r], fp4_ref(q[r]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_tiny_negatives_keep_sign_bit(dtype):
    d = np.float32(2.0**-4)
    vals = np.array([6, -0.25, -0.125, -0.1875, -2.0**-10, 0.25, 0.125, 2.0**-10, -0.0, 0.0,
                     -0.2421875, -0.25, -0.2578125, -6, 1, -1], np.float32) * d
    w = exact_tensor(vals, dtype)[None, :]
    pk, _ = check_nvfp4(w, np.float32(1.0))
    got = unpack(pk)[0].tolist()
    assert got == [7, 8, 8, 8, 8, 0, 0, 0, 0, 0, 8, 8, 9, 15, 2, 10], got


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_saturation_above_five(dtype):
    # Block max 6 * 1.0625: the block scale 1.0625 ties and rounds to 1.0 (even), so the max
    # quotient is 6.375 and must saturate to 6 (code 7). Other values just above 5 go to 6.
    vals = np.array([6.375, 5.0625, 5.125, 5.5, 6.0, -6.375, -5.0625, 5.0, -5.0, 4.5, 4.75, 4.9375,
                     0, 1, 2, 3], np.float32)
    w = exact_tensor(vals, dtype)[None, :]
    pk, sc = check_nvfp4(w, np.float32(1.0))
    assert sc[0, 0] == E4M3_ONE, "test construction: block scale 1.0625 should round to 1.0"
    assert unpack(pk)[0].tolist() == [7, 7, 7, 7, 7, 15, 15, 6, 14, 6, 6, 6, 0, 2, 4, 5]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_block_scale_range_and_clamps(dtype):
    """Blocks whose unclamped scale sweeps 2^-14 .. 2^11 with s2 = 1: below 2^-9 clamps to the
    smallest subnormal, E4M3 subnormals, normals, E4M3 ties, and above 448 clamps to 448."""
    rng = np.random.default_rng(5)
    svals = np.concatenate([
        2.0 ** np.linspace(-14, 11, 180),
        np.arange(1, 16) * 2.0**-10,  # E4M3 subnormals and their midpoints
        [2.0**-9, 2.0**-9 * 0.75, 2.0**-9 * 1.5, 448, 449, 464, 465, 480, 1000],
    ])
    if dtype == "F16":
        svals = svals[(svals * 6 >= 2.0**-14) & (svals * 6 < 60000)]
    bamax = np.float32(6) * svals.astype(np.float32)
    blocks = bamax[:, None] * rng.uniform(-1, 1, (len(bamax), 16)).astype(np.float32)
    blocks[:, 3] = bamax
    blocks[::2, 7] = -bamax[::2]  # max reached by a negative value too
    x = blocks.reshape(-1, 64) if len(bamax) % 4 == 0 else blocks.reshape(1, -1)
    w = torch.from_numpy(x.astype(np.float32)).to(TORCH[dtype])
    _, sc = check_nvfp4(w, np.float32(1.0))
    got = set(np.unique(sc).tolist())
    assert {0x01, 0x7E} <= got, "both clamps must be hit"
    assert got & {0x02, 0x03, 0x04, 0x05, 0x06, 0x07}, "E4M3 subnormal scales must be hit"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [2.0**-20, 1e-3, 37.0, 2.0**30])
def test_nvfp4_deliberately_wrong_s2(dtype, factor):
    """s2 far below amax/2688 clamps block scales at 448 and quotients above 6 saturate; far above
    it clamps them at 2^-9 and most codes round to (signed) zero."""
    w = randn((17, 272), 1.0, 11, dtype)
    s2 = np.float32(our_s2(w) * np.float32(factor))
    pk, sc = check_nvfp4(w, s2)
    codes = unpack(pk)
    if factor < 1:
        assert (sc == 0x7E).mean() > 0.9
        assert ((codes & 7) == 7).mean() > 0.5  # saturated at 6
    elif factor > 1e3:
        assert (sc == 0x01).all()
        assert ((codes & 7) == 0).mean() > 0.9
    else:
        assert sc.view(ml_dtypes.float8_e4m3fn).astype(np.float32).max() <= 448 / factor * 1.07


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_subnormal_inputs(dtype):
    rng = np.random.default_rng(8)
    if dtype == "BF16":
        sub = np.arange(1, 0x80, dtype=np.uint32)
        sub = np.concatenate([sub, sub | 0x8000, [0x80, 0x8080]])  # plus the smallest normals
    elif dtype == "F16":
        sub = np.arange(1, 0x400, dtype=np.uint32)
        sub = np.concatenate([sub, sub | 0x8000, [0x400, 0x8400]])
    else:
        sub = rng.integers(1, 0x800000, 1020, dtype=np.uint32)
        sub = np.concatenate([sub, sub | 0x80000000, [0x800000, 0x80800000, 1, 0x80000001, 0x7FFFFF, 0x807FFFFF]])
    sub = sub[: len(sub) // 32 * 32]
    # (a) subnormals only. For BF16 / F32, amax / 2688 is subnormal too: we write s2 = 1.0
    # (documented), ModelOpt's s2 is that subnormal quotient. Both must agree given either.
    w = from_bits(rng.permutation(sub), dtype).reshape(-1, 16)
    pk, _ = check_nvfp4(w, our_s2(w))
    if dtype != "F16":
        assert our_s2(w) == np.float32(1.0) and modelopt_s2(w) < np.float32(2.0**-126)
        assert ((unpack(pk) & 7) == 0).all(), "subnormal weights against s2 = 1.0 are all (signed) zero"
    else:
        assert our_s2(w) == modelopt_s2(w)
    check_nvfp4(w, modelopt_s2(w))
    # (b) sorted, so blocks hold neighbouring subnormals; then against a small normal s2
    w = from_bits(np.sort(sub), dtype).reshape(-1, 32)
    check_nvfp4(w, modelopt_s2(w))
    check_nvfp4(w, np.float32(2.0**-30))
    # (c) subnormal blocks beside normal ones
    normal = randn((w.shape[0], 32), 1.0, 2, dtype)
    mixed = torch.cat([w, normal], dim=1)
    assert our_s2(mixed) == modelopt_s2(mixed)
    check_nvfp4(mixed, our_s2(mixed))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_nvfp4_every_finite_16bit_value(dtype):
    """Every finite BF16 / F16 value, in bit order (blocks of neighbours) and shuffled, against
    several s2 values."""
    bits = finite_bits_16(dtype).astype(np.uint32)
    bits = bits[: len(bits) // 512 * 512]
    perm = np.random.default_rng(0).permutation(bits)
    for arr, cols in [(bits, 256), (perm, 512)]:
        w = from_bits(arr, dtype).reshape(-1, cols)
        for s2 in [our_s2(w), np.float32(1.0), np.float32(2.0**-12 if dtype == "F16" else 2.0**-100)]:
            check_nvfp4(w, s2)


@pytest.mark.parametrize("dtype", ["F32"])
def test_nvfp4_f32_extremes(dtype):
    """fp32-only ranges: magnitudes near the fp32 limits and amax in the subnormal range."""
    for mag, seed in [(1e-30, 1), (1e-34, 2), (1e-36, 3), (1e30, 4), (1e34, 5), (1e-41, 6)]:
        w = randn((9, 48), mag, seed, dtype)
        check_nvfp4(w, our_s2(w))
        if our_s2(w) != modelopt_s2(w):  # s2 subnormal: we write 1.0 (documented), ModelOpt keeps it
            assert mag <= 1e-34 and our_s2(w) == np.float32(1.0) and modelopt_s2(w) < np.float32(2.0**-126)
            check_nvfp4(w, modelopt_s2(w))


# ================================================================ 2. fp4_codes against FORMATS.md

def _bound_neighbours() -> np.ndarray:
    vals = []
    for b in FP4_BOUNDS + (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0):
        x = np.float32(b)
        for direction in (np.inf, -np.inf):
            y = x
            for _ in range(4):
                y = np.nextafter(y, np.float32(direction))
                vals.append(y)
        vals.append(x)
    vals = np.array(vals, np.float32)
    return np.concatenate([vals, -vals])


def test_fp4_codes_at_and_beside_every_bound():
    x = _bound_neighbours()
    x = np.concatenate([x, np.float32([-0.0, 0.0, 1e-45, -1e-45, 7.0, -7.0, 1e30, -1e30, 3.4e38, -3.4e38])])
    got = nvfp4.fp4_codes(x.copy())
    exact = np.array([fp4_ref_exact(float(v)) for v in x], np.uint8)
    assert np.array_equal(fp4_ref(x), exact), "vectorised reference disagrees with the exact one"
    bad = np.flatnonzero(got != exact)
    assert not bad.size, [(float(x[i]), hex(x[i:i+1].view(np.uint32)[0]), int(got[i]), int(exact[i])) for i in bad[:10]]
    assert np.array_equal(got, modelopt_fp4(x))
    assert got[np.flatnonzero(x == np.float32(0.25))[0]] == 0 and got[np.flatnonzero(x == np.float32(0.75))[0]] == 2


def test_fp4_codes_random_and_every_16bit_value():
    rng = np.random.default_rng(3)
    parts = [
        rng.integers(0, 0x7F800000, 400_000, dtype=np.uint32),  # uniform over all finite magnitudes
        (0x3E000000 + rng.integers(0, 0x2000000, 400_000)).astype(np.uint32),  # [0.125, 8): the busy part
        (finite_bits_16("BF16").astype(np.uint32) << 16),
    ]
    bits = np.concatenate(parts)
    bits = np.concatenate([bits, bits | 0x80000000])
    x = bits.view(np.float32)
    f16 = finite_bits_16("F16").view(np.float16).astype(np.float32)
    x = np.concatenate([x, f16])
    got = nvfp4.fp4_codes(x.copy())
    ref = fp4_ref(x)
    bad = np.flatnonzero(got != ref)
    assert not bad.size, [(float(x[i]), int(got[i]), int(ref[i])) for i in bad[:10]]
    assert np.array_equal(got, modelopt_fp4(x))


# ================================================================ 3. FP8 against correctly rounded E4M3

def fp8_refs(w: torch.Tensor, scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Two independent correctly rounded E4M3 references of f32(W) / scale: torch and ml_dtypes."""
    q = w.float() / torch.tensor(np.float32(scale))
    t = q.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    f = w.float().numpy() / np.float32(scale)
    m = np.clip(f, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return t, m


def assert_fp8(w: torch.Tensor, scale: np.float32, what=""):
    dtype = dtype_name(w)
    raw = to_raw(w)
    ours = fp8.quantize(raw, dtype, np.float32(scale), NAME)
    t, m = fp8_refs(w, scale)
    assert np.array_equal(t, m), "references disagree (torch vs ml_dtypes)"
    if not np.array_equal(ours, t):
        i = np.argwhere(ours != t)[0]
        x = float(w.float()[tuple(i)])
        raise AssertionError(f"{what}: {int((ours != t).sum())} codes differ; first at {tuple(i)}: input {x!r} "
                             f"/ scale {float(scale)!r} = {x / float(scale)!r}: ours 0b{ours[tuple(i)]:08b} "
                             f"torch 0b{t[tuple(i)]:08b}")
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_random_matches_correctly_rounded(dtype):
    for k, (shape, mag) in enumerate([((1, 16), 1e-3), ((17, 272), 1.0), ((33, 48), 1e3), ((64, 1024), 0.02),
                                      ((3, 7), 1e-5), ((128, 4096), 0.1)]):
        w = randn(shape, mag, k, dtype)
        scale = fp8.global_scale(base.tensor_amax(to_raw(w), dtype, NAME))
        assert_fp8(w, scale, f"{dtype} {shape} {mag}")
        assert_fp8(w, np.float32(scale * np.float32(0.01)), "clamped")  # most quotients clamp to +-448


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_fp8_every_finite_16bit_value(dtype):
    w = from_bits(finite_bits_16(dtype).astype(np.uint32), dtype)[None, :]
    amax = base.tensor_amax(to_raw(w), dtype, NAME)
    for scale in [fp8.global_scale(amax), np.float32(1.0), fp8.global_scale(np.float32(0.0371)),
                  np.float32(2.0**-120), np.float32(3.0 * 2**20)]:
        assert_fp8(w, scale, f"scale {scale}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2.0**-7, 3.0 * 2**-5, 0.75, 1.75, 7 * 2.0**-9, 1.25])
def test_fp8_ties_to_even(dtype, scale):
    """Quotients exactly halfway between neighbouring E4M3 values (subnormal and normal) must go
    to the even code."""
    v = e4m3_values()
    mids = (v[:-1] + v[1:]) / 2  # includes 2^-10, halfway between 0 and the smallest subnormal
    x = np.concatenate([mids, -mids]).astype(np.float32)
    scale = np.float32(scale)
    w = exact_tensor(x * scale, dtype)[None, :]
    q = w.float().numpy() / scale
    assert np.array_equal(q[0], x), "test construction: quotients not exactly halfway"
    ours = assert_fp8(w, scale, "ties")
    assert not (ours & 1).any(), "a tie went to an odd code"
    lo = np.concatenate([v[:-1], -v[:-1]])  # the lower-magnitude neighbour of each midpoint
    hi = np.concatenate([v[1:], -v[1:]])
    got = ours.view(ml_dtypes.float8_e4m3fn).astype(np.float64)[0]
    assert ((got == lo) | (got == hi)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_near_midpoints_with_generic_scales(dtype):
    """Inputs within a few input-ulps of midpoint * scale for non-power-of-two scales: the quotient
    lands on, just below or just above a rounding midpoint, where one fp32 ulp of the division
    (e.g. multiplying by a rounded reciprocal) flips the E4M3 code."""
    v = e4m3_values()
    mids = (v[:-1] + v[1:]) / 2
    amaxes = np.float32([0.0371, 1.7, 123.4, 3.3e-3, 0.61])
    if dtype == "F16":
        mids = mids[mids >= 2.0**-6]  # keep W inside f16's normal range for these scales
    ws, on_tie = [], 0
    for amax in amaxes:
        scale = fp8.global_scale(amax)
        w0 = (mids * np.float64(scale)).astype(np.float32)
        cands = [w0]
        for direction in (np.inf, -np.inf):
            y = w0
            for _ in range(3):
                y = _nextafter_in(exact_tensor_round(y, dtype), dtype, direction)
                cands.append(y)
        w = np.concatenate([exact_tensor_round(c, dtype) for c in cands])
        w = np.concatenate([w, -w])
        q = w / scale
        on_tie += int(np.isin(np.abs(q), mids.astype(np.float32)).sum())
        ws.append((exact_tensor(w, dtype)[None, :], scale))
    if dtype == "F32":  # 16-bit W cannot be exactly midpoint * scale for such scales
        assert on_tie > 50, f"test construction: only {on_tie} quotients exactly on a midpoint"
    for w, scale in ws:
        assert_fp8(w, scale, f"near midpoints, scale {scale!r}")


def exact_tensor_round(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded (RNE) to the input dtype, back as float32."""
    return torch.from_numpy(np.asarray(x, np.float32)).to(TORCH[dtype]).float().numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_zero_and_negative_zero(dtype):
    w = torch.tensor([[0.0, -0.0, 1.0, -1.0], [-0.0, -0.0, 0.0, 0.0]], dtype=TORCH[dtype])
    ours = assert_fp8(w, np.float32(1.0))
    assert ours[0].tolist() == [0x00, 0x80, 0x38, 0xB8]  # -0.0 stays negative zero, as torch's cast
    z = torch.zeros((3, 32), dtype=TORCH[dtype])
    amax = base.tensor_amax(to_raw(z), dtype, NAME)
    scale = fp8.global_scale(amax)
    assert amax == 0 and scale.dtype == np.float32 and scale == np.float32(1.0)
    assert not fp8.quantize(to_raw(z), dtype, scale, NAME).any()


def test_fp8_global_scale_matches_formula_and_modelopt():
    rng = np.random.default_rng(4)
    for k in range(20):
        w = torch.from_numpy(rng.standard_normal((8, 32)).astype(np.float32) * np.float32(10.0 ** rng.uniform(-6, 6)))
        amax = base.tensor_amax(w.numpy(), "F32", NAME)
        ours = fp8.global_scale(amax)
        assert ours.view(np.uint32) == (np.float32(amax) / np.float32(448)).view(np.uint32)
        _, their_scale = FP8QTensor.quantize(w)
        assert np.float32(their_scale.item()).view(np.uint32) == ours.view(np.uint32)
    assert fp8.global_scale(np.float32(0)) == np.float32(1.0)


def test_fp8_modelopt_double_rounding_is_at_most_one_code():
    """ModelOpt divides a bf16 weight in bf16 and casts again: a few percent of its codes are one
    step off the correctly rounded value, and ours is then the nearer one. For fp32 inputs ModelOpt
    rounds once, and the two are identical."""
    def ordinal(c):
        c = c.astype(np.int32)
        return np.where(c & 0x80, -(c & 0x7F), c & 0x7F)

    for dtype in ("BF16", "F32"):
        w = randn((256, 1024), 0.02, 9, dtype)
        scale = fp8.global_scale(base.tensor_amax(to_raw(w), dtype, NAME))
        ours = fp8.quantize(to_raw(w), dtype, scale, NAME)
        q, _ = FP8QTensor.quantize(w, scales=torch.tensor(scale))
        theirs = q._quantized_data.view(torch.uint8).numpy()
        if dtype == "F32":
            assert np.array_equal(ours, theirs)
            continue
        step = np.abs(ordinal(ours) - ordinal(theirs))
        assert step.max() <= 1
        frac = (step != 0).mean()
        assert 0 < frac < 0.1, frac
        exact = w.double().numpy() / np.float64(scale)
        e_ours = np.abs(ours.view(ml_dtypes.float8_e4m3fn).astype(np.float64) - exact)
        e_theirs = np.abs(theirs.view(ml_dtypes.float8_e4m3fn).astype(np.float64) - exact)
        assert (e_ours <= e_theirs).all()
        assert (e_ours[step != 0] < e_theirs[step != 0]).mean() > 0.9


# ================================================================ 4. the E4M3 block-scale cast

def test_block_scale_cast_matches_torch_in_scale_range():
    """The ml_dtypes cast behind nvfp4.block_scales equals torch's float8_e4m3fn cast on every
    rounding-relevant pattern of [2^-9, 448] (all top-8 mantissa bits x sticky variants, per
    exponent), every midpoint +-1 ulp, and 2M random values; and fp8.e4m3 equals torch's clamped
    cast over the whole fp32 range."""
    lo, hi = np.float32(2.0**-9).view(np.uint32), np.float32(448.0).view(np.uint32)
    exps = np.arange(lo >> 23, (hi >> 23) + 1, dtype=np.uint32)
    top = np.arange(256, dtype=np.uint32) << 15
    low = np.array([0, 1, 2, 0x3FFF, 0x4000, 0x4001, 0x7FFE, 0x7FFF], np.uint32)
    structured = ((exps[:, None, None] << 23) | top[None, :, None] | low[None, None, :]).reshape(-1)
    v = e4m3_values()
    v = v[(v >= 2.0**-9) & (v <= 448)]
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9)),
                             v.astype(np.float32)])
    rand = np.random.default_rng(6).integers(lo, hi + 1, 2_000_000, dtype=np.uint32)
    bits = np.concatenate([structured, around.view(np.uint32), rand])
    x = bits.view(np.float32)
    x = x[(x >= 2.0**-9) & (x <= 448)]
    assert x.size > 2_000_000 and (x == np.float32(2.0**-9)).any() and (x == np.float32(448)).any()
    # t = 6 * f32(1/6) rounds to exactly 1.0, so block_scales(x, 1/6) is the cast of x itself
    s2 = np.float32(1 / 6)
    assert np.float32(6) * s2 == np.float32(1.0)
    ours = nvfp4.block_scales(x.copy(), s2)
    ref = torch_e4m3(x)
    bad = np.flatnonzero(ours != ref)
    assert not bad.size, [(float(x[i]), hex(ours[i]), hex(ref[i])) for i in bad[:10]]
    assert np.array_equal(x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), ref)
    # below and above the range: clamped to 2^-9 / 448; zero gives 1.0
    edge = np.float32([0.0, 1e-30, 2.0**-10, 2.0**-9 * 0.99, 449, 464, 1e30, 3e38])
    assert nvfp4.block_scales(edge, s2).tolist() == [E4M3_ONE, 1, 1, 1, 0x7E, 0x7E, 0x7E, 0x7E]
    # fp8.e4m3 over signed fp32 values of every magnitude
    y = np.random.default_rng(7).integers(0, 0xFF800000, 1_000_000, dtype=np.uint32).view(np.float32)
    y = y[np.isfinite(y)]
    assert np.array_equal(fp8.e4m3(y), torch_e4m3(np.clip(y, -448, 448)))


# ================================================================ 5. NaN / Inf

NONFINITE = {
    "BF16": [0x7FC0, 0xFFC0, 0x7F81, 0x7F80, 0xFF80],
    "F16": [0x7E00, 0xFE00, 0x7C01, 0x7C00, 0xFC00],
    "F32": [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000],
}


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", range(5), ids=["nan", "-nan", "snan", "inf", "-inf"])
def test_nonfinite_raises_with_tensor_name(fmt, dtype, k):
    bad = NONFINITE[dtype][k]
    for pos in [(0, 0), (2, 47), (1, 17)]:
        raw = to_raw(randn((3, 48), 1.0, 0, dtype))
        raw.view(base._UINT[dtype])[pos] = bad
        with pytest.raises(NumericError, match=re.escape(NAME)):
            if fmt == "nvfp4":
                nvfp4.quantize(raw, dtype, np.float32(1.0), NAME)
            else:
                fp8.quantize(raw, dtype, np.float32(1.0), NAME)
        with pytest.raises(NumericError, match=re.escape(NAME)):
            base.tensor_amax(raw, dtype, NAME)


def test_nonfinite_found_in_every_chunk_under_threads(monkeypatch):
    """Row chunks run on a thread pool: a NaN in any chunk must still raise. Regression test for a
    shared running max that the pool's threads updated read-modify-write and lost about 1% of the
    time (nvfp4.Quantizer.quantize); 300 tries catch that with probability ~95%."""
    monkeypatch.setenv("SHARDQUANT_THREADS", "2")
    rows, cols = 256, 4096  # 2 MiB of bf16: two 1 MiB chunks
    raw = to_raw(randn((rows, cols), 0.02, 12, "BF16"))
    rng = np.random.default_rng(12)
    for i in range(300):
        r = raw.copy()
        r[(i * 37) % rows, rng.integers(cols)] = 0x7FC0
        with pytest.raises(NumericError, match=re.escape(NAME)):
            nvfp4.quantize(r, "BF16", np.float32(1e-4), NAME)


# ================================================================ 6. dequantize

@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_modelopt(dtype):
    w = randn((17, 272), 1.0, 13, "F32")
    w[0, :16] = 0
    w[1, 1:16] = -1e-6  # signed zeros (code 8) in a block with a large max
    w[1, 0] = 100.0
    w = w.to(TORCH[dtype])
    s2 = our_s2(w)
    raw = to_raw(w)
    pk, sc = nvfp4.quantize(raw, dtype, s2, NAME)
    ours = nvfp4.dequantize(pk, sc, s2)
    assert ours.dtype == np.float32
    kw = dict(dtype=torch.float32, scale=torch.from_numpy(sc).view(torch.float8_e4m3fn),
              double_scale=torch.tensor(s2), block_sizes={-1: 16})
    theirs = NVFP4QTensor(w.shape, w.dtype, torch.from_numpy(pk)).dequantize(**kw).numpy()
    q, their_sc, their_s2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=torch.tensor(s2))
    theirs2 = q.dequantize(dtype=torch.float32, scale=their_sc, double_scale=their_s2, block_sizes={-1: 16}).numpy()
    # ModelOpt's table maps code 8 to +0.0, ours to -0.0: equal as numbers; compare bits after +0.0
    canon = lambda a: (a + np.float32(0)).view(np.uint32)  # noqa: E731
    assert np.array_equal(canon(ours), canon(theirs))
    assert np.array_equal(canon(ours), canon(theirs2))
    assert (unpack(pk) == 8).any()


# ================================================================ 7. property test

@st.composite
def nvfp4_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 40))
    nb = draw(st.integers(1, 20))
    lo, hi = {"BF16": (-30, 30), "F16": (-5, 3), "F32": (-35, 35)}[dtype]
    mag = 10.0 ** draw(st.integers(lo, hi))
    seed = draw(st.integers(0, 2**31 - 1))
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    s2_mode = draw(st.sampled_from(["amax", "amax", "pow2", "any"]))
    k = draw(st.integers(-12, 12))
    f = draw(st.floats(0.1, 10.0))
    return dtype, rows, nb, mag, seed, zero_frac, s2_mode, k, f


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(nvfp4_cases())
def test_property_nvfp4_matches_modelopt(case):
    dtype, rows, nb, mag, seed, zero_frac, s2_mode, k, f = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, nb, 16)) * mag
    x *= np.where(rng.random((rows, nb, 1)) < 0.2, 10.0 ** rng.uniform(-3, 2, (rows, nb, 1)), 1.0)
    x[rng.random((rows, nb)) < zero_frac] = 0.0
    if dtype == "F16":
        x = np.clip(x, -60000, 60000)
    w = torch.from_numpy(x.reshape(rows, nb * 16)).to(TORCH[dtype])
    s2 = our_s2(w)
    if s2_mode == "pow2":
        s2 = np.float32(s2 * np.float32(2.0**k))
    elif s2_mode == "any":
        s2 = np.float32(s2 * np.float32(f))
    check_nvfp4(w, s2)


def _threshold_definition(w: np.ndarray, d: np.float32, bounds: np.ndarray, strict: np.ndarray) -> np.ndarray:
    """Whether fl(w / d) (IEEE fp32 division, correctly rounded) passes each bound: strictly, or at
    equality for the bounds that round up: the definition code_thresholds states."""
    q = np.float32(w) / np.float32(d)
    return np.where(strict, q > bounds, q >= bounds)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=1, max_value=0x7F7FFFFF))
def test_code_thresholds_are_the_first_passing_patterns(bits):
    """formats/nvfp4.py code_thresholds (a window around fl(bound x d), one pass) equals the
    bisection over every fp32 pattern (_bisect_thresholds), and each threshold t is the first
    pattern that passes: t passes (or is inf), t - 1 fails; any s2 from the least subnormal to
    the largest finite fp32."""
    s2 = np.array([bits], np.uint32).view(np.float32)[0]
    got = nvfp4.code_thresholds(s2).view(np.uint32).astype(np.int64)
    d, bounds, strict = nvfp4._threshold_inputs(s2)
    want = nvfp4._bisect_thresholds(np.broadcast_to(d[:, None], (128, 8)), np.broadcast_to(bounds, (128, 8)),
                                    np.broadcast_to(strict, (128, 8)))
    assert np.array_equal(got, want)
    with np.errstate(all="ignore"):
        for c in (0, 1, 37, 56, 100, 126, 127):
            t = got[c]
            passes = _threshold_definition(t.astype(np.uint32).view(np.float32), d[c], bounds, strict)
            before = _threshold_definition(np.maximum(t - 1, 0).astype(np.uint32).view(np.float32), d[c], bounds,
                                           strict)
            assert np.all(passes | (t == 0x7F800000)) and not np.any(before & (t > 0)), c


def test_code_thresholds_edge_scales():
    """s2 at the edges: 1.0, the least normal and subnormal, the largest finite, values whose scaled
    E4M3 scales overflow to inf or fall subnormal."""
    for s2 in (1.0, 2.0**-126, 2.0**-149, 3.4028235e38, 1e30, 2.0**-140, 1 / 2688, 7.0e-46):
        s2 = np.float32(s2)
        d, bounds, strict = nvfp4._threshold_inputs(s2)
        want = nvfp4._bisect_thresholds(np.broadcast_to(d[:, None], (128, 8)), np.broadcast_to(bounds, (128, 8)),
                                        np.broadcast_to(strict, (128, 8)))
        assert np.array_equal(nvfp4.code_thresholds(s2).view(np.uint32).astype(np.int64), want), s2
