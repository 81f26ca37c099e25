"""Decoding quantized sources (shardquant/decode.py, issue 14 items 1 and 2), against independent
references:

- block FP8: ml_dtypes' float8_e4m3fn and float8_e8m0fnu casts, tile by tile with explicit tile
  indices; the F32-scale product against NumPy's float32 multiply, the E8M0 product in float64 then
  compared exactly in fp32 (E4M3 x a power of two is exact).
- MXFP4 -> NVFP4: the E2M1 codes are the source nibbles bit for bit on every block that fits, and
  formats/nvfp4.py `dequantize` equals formats/mxfp4.py `dequantize` bit for bit (and both equal an
  E2M1 table x 2^(b - 127) computed in float64); blocks that do not fit equal `nvfp4.Quantizer(s2)`
  applied to the decoded values.
- ModelOpt 0.47 has the closed-form cast and it runs on the CPU
  (modelopt/torch/export/shard_cast_utils.py `quantize_mxfp4_to_nvfp4_lossless`, with k_max from
  modelopt/torch/quantization/utils/numeric_utils.py): compared code for code, scale for scale, s2 and
  block count. Two deliberate differences, asserted as such: ModelOpt re-casts the decoded bf16
  values, so a -0.0 element (nibble 8) comes back as +0 (code 0, its `_cast_fp4`; formats/nvfp4.py
  fp4_codes does the same) where we copy the nibble; and a dead (all-zero) block out of E4M3's range
  gets scale 2^-9 there (its amax 0, clamped) and 1.0 here (formats/nvfp4.py block_scales' zero-block scale).
- gpt-oss layout and gate/up split: against transformers 5.24's own dequantizer
  (transformers/integrations/mxfp4.py `convert_moe_packed_tensors`) and its `gate_up[..., ::2]`,
  `gate_up[..., 1::2]` split (models/gpt_oss/modeling_gpt_oss.py).
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

from shardquant import decode
from shardquant.errors import NumericError
from shardquant.formats import mxfp4, nvfp4

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def e4m3_f64(codes: np.ndarray) -> np.ndarray:
    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal fp32 arrays, -0.0 and Inf included; NaN where the other is NaN."""
    na, nb = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and np.array_equal(na, nb) and np.array_equal(
        a[~na].view(np.uint32), b[~nb].view(np.uint32))


def tile_ref(codes: np.ndarray, per_tile, block=(128, 128)) -> np.ndarray:
    """Reference decode, tile by tile: per_tile(values of the tile, (i, j)) -> fp32 tile."""
    rows, cols = codes.shape
    out = np.empty((rows, cols), np.float32)
    for i in range(-(-rows // block[0])):
        for j in range(-(-cols // block[1])):
            sl = np.s_[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            out[sl] = per_tile(codes[sl], (i, j))
    return out


# ---------------------------------------------------------------------------------------------
# Block FP8


def fp8_source(rows=300, cols=200, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)  # NaN codes 0x7F/0xFF and -0.0 included
    grid = (-(-rows // 128), -(-cols // 128))
    f32 = (2.0 ** rng.uniform(-30, 10, grid) * rng.uniform(1, 2, grid)).astype(np.float32)
    return codes, f32


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (1, 129), (257, 1)])
def test_block_fp8_f32_scales(shape):
    codes, s = fp8_source(*shape)
    codes.reshape(-1)[:4] = [0x80, 0x7F, 0xFF, 0x7E]  # -0.0, NaN, NaN, 448 (all in tile 0, 0)
    s[0, 0] = 1.0
    ref = tile_ref(codes, lambda t, ij: codes_f32(t) * s[ij])  # NumPy float32 multiply
    got = decode.block_fp8_decode(codes, s)
    assert got.dtype == np.float32 and same_bits(got, ref)
    g = got.reshape(-1)
    assert np.signbit(g[0]) and g[0] == 0 and np.isnan(g[1]) and np.isnan(g[2]) and g[3] == 448
    # float8_e4m3fn storage decodes as its bytes do
    assert same_bits(decode.block_fp8_decode(codes.view(ml_dtypes.float8_e4m3fn), s), ref)


def codes_f32(t: np.ndarray) -> np.ndarray:
    return t.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def test_block_fp8_e8m0_scales():
    codes, _ = fp8_source(384, 300, seed=1)
    rng = np.random.default_rng(1)
    b = rng.integers(0, 255, (3, 3), dtype=np.uint8)
    b[0, 0], b[0, 1], b[0, 2], b[1, 0] = 0, 127, 254, 1
    codes[128:256, 0:128] = 0  # a zero tile
    codes[0:128, 256:300] = np.where(rng.random((128, 44)) < 0.5, 0x38, 0xB0)  # +1.0, -0.5 at 2^127

    def ref_tile(t, ij):  # float64 product, exact, then one cast to fp32 (overflow -> Inf as fp32's)
        with np.errstate(over="ignore"):
            return (e4m3_f64(t) * np.ldexp(1.0, int(b[ij]) - 127)).astype(np.float32)

    ref = tile_ref(codes, ref_tile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.array_equal(b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32), decode.e8m0_values(b))
    for sd in ("E8M0", "F8_E8M0"):
        got = decode.block_fp8_decode(codes, b, scale_dtype=sd)
        assert same_bits(got, ref)
    got = decode.block_fp8_decode(codes, b.view(ml_dtypes.float8_e8m0fnu), scale_dtype="E8M0")
    assert same_bits(got, ref)
    assert not got[128:256, 0:128].any()
    # byte 0 is 2^-127: the least E4M3 subnormal (2^-9) times it is 2^-136, an exact fp32 subnormal
    tiny = decode.block_fp8_decode(np.full((1, 1), 1, np.uint8), np.zeros((1, 1), np.uint8), scale_dtype="E8M0")
    assert tiny[0, 0] == 2.0**-136
    # byte 255 (NaN) makes its tile NaN
    b[2, 2] = 255
    got = decode.block_fp8_decode(codes, b, scale_dtype="E8M0")
    assert np.isnan(got[256:, 256:]).all() and same_bits(got[:256], ref[:256])


@pytest.mark.parametrize("band", [(0, 300), (0, 1), (100, 200), (127, 129), (256, 300), (299, 300), (5, 5)])
def test_block_fp8_row_band(band):
    codes, s = fp8_source(300, 200, seed=2)
    whole = decode.block_fp8_decode(codes, s)
    a, b = band
    assert same_bits(decode.block_fp8_decode_rows(codes, s, a, b), whole[a:b])
    e = np.random.default_rng(2).integers(100, 140, s.shape, dtype=np.uint8)
    assert same_bits(decode.block_fp8_decode_rows(codes, e, a, b, scale_dtype="E8M0"),
                     decode.block_fp8_decode(codes, e, scale_dtype="E8M0")[a:b])


def test_block_fp8_other_tile_and_bad_shapes():
    codes, _ = fp8_source(70, 50, seed=3)
    s = np.random.default_rng(3).uniform(0.5, 2, (3, 2)).astype(np.float32)
    ref = tile_ref(codes, lambda t, ij: codes_f32(t) * s[ij], block=(32, 32))
    assert same_bits(decode.block_fp8_decode(codes, s, block=(32, 32)), ref)
    with pytest.raises(ValueError, match="tile"):
        decode.block_fp8_decode(codes, s)
    with pytest.raises(ValueError, match="band"):
        decode.block_fp8_decode_rows(codes, s, 10, 71, block=(32, 32))
    with pytest.raises(ValueError, match="F32 or E8M0"):
        decode.block_fp8_decode(codes, s, block=(32, 32), scale_dtype="BF16")


def finite_codes(rng, shape):
    c = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.where((c & 0x7F) == 0x7F, c ^ 1, c).astype(np.uint8)  # 0x7F/0xFF -> 0x7E/0xFE


@pytest.mark.parametrize("seed", range(4))
def test_block_fp8_amax_exact_and_bound(seed):
    rng = np.random.default_rng(seed)
    codes = finite_codes(rng, (300, 260))
    codes[np.abs(e4m3_f64(codes)) > 300] = 0x30  # no code near 448: the bound is loose
    s = (2.0 ** rng.uniform(-8, 0, (3, 3))).astype(np.float32)
    dec = decode.block_fp8_decode(codes, s)
    exact = np.max(np.abs(dec))
    assert decode.block_fp8_amax(codes, s) == exact
    bound = decode.block_fp8_amax_bound(s)
    assert bound == float(np.float32(448) * s.max()) and bound >= exact
    # a tile holding 448 makes the bound the amax (DeepSeek's scale = tile amax / 448)
    i, j = np.unravel_index(np.argmax(s), s.shape)
    codes[i * 128, j * 128] = 0xFE  # -448
    assert decode.block_fp8_amax(codes, s) == decode.block_fp8_amax_bound(s) == np.max(
        np.abs(decode.block_fp8_decode(codes, s)))
    e = rng.integers(110, 130, (3, 3), dtype=np.uint8)
    assert decode.block_fp8_amax(codes, e, scale_dtype="E8M0") == np.max(
        np.abs(decode.block_fp8_decode(codes, e, scale_dtype="E8M0")))
    assert decode.block_fp8_amax_bound(e, "E8M0") == 448 * 2.0 ** (int(e.max()) - 127)


def test_block_fp8_amax_reads_only_the_tiles_it_needs():
    """Tiles whose bound cannot beat the amax found are never read: NaN codes planted there would
    raise if they were."""
    rng = np.random.default_rng(5)
    codes = finite_codes(rng, (256, 384))
    s = np.full((2, 3), 1.0, np.float32)
    s[1, 2] = 4.0
    codes[128, 256] = 0x7E  # 448 x 4 in the largest-scale tile
    codes[:128] = 0x7F  # every tile of scale 1.0 in row 0 is NaN
    assert decode.block_fp8_amax(codes, s) == 1792.0
    codes[128:256, 256:384] = 0x30  # now the top tile (0.5 x 4) rules nothing out: the others are read
    with pytest.raises(NumericError, match="NaN"):
        decode.block_fp8_amax(codes, s)
    with pytest.raises(NumericError, match="NaN"):
        decode.block_fp8_amax(codes, np.full((2, 3), 255, np.uint8), scale_dtype="E8M0")
    assert decode.block_fp8_amax_bound(np.zeros((0, 0), np.float32)) == 0.0


def test_block_fp8_amax_in_a_tile_of_smaller_scale():
    """The largest-scale tile holds small codes: the amax is in another tile, which must be read."""
    codes = np.full((256, 256), 0x30, np.uint8)  # 0.5
    codes[0, 0] = 0x72  # 160 in the tile of scale 1
    codes[200, 200] = 0x7E  # 448 in a tile of scale 0.5: 224
    s = np.array([[1.0, 0.25], [0.25, 0.5]], np.float32)
    assert decode.block_fp8_amax(codes, s) == 224.0 == np.max(np.abs(decode.block_fp8_decode(codes, s)))


# ---------------------------------------------------------------------------------------------
# MXFP4 -> NVFP4


def mx_ref(packed: np.ndarray, e8m0: np.ndarray) -> np.ndarray:
    """fp32 values of MXFP4 from the E2M1 table and 2^(b - 127), in float64 (exact), cast once."""
    rows = packed.shape[0]
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, -1)
    scale = np.repeat(np.ldexp(1.0, e8m0.astype(np.int64) - 127), 32, axis=1)
    with np.errstate(over="ignore"):
        return (E2M1[codes] * scale).astype(np.float32)


def mx_source(rows, cols, lo, hi, seed):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)  # -0.0 (nibble 8) included
    e8m0 = rng.integers(lo, hi + 1, (rows, cols // 32), dtype=np.uint8)
    return packed, e8m0


def expected_scale_values(e8m0: np.ndarray, m: int) -> np.ndarray:
    return np.repeat(np.ldexp(1.0, e8m0.astype(np.int64) - 127 - m), 2, axis=1)


def assert_lossless(packed, e8m0, q, s, s2, m):
    assert np.array_equal(q, packed)
    assert np.array_equal(e4m3_f64(s), expected_scale_values(e8m0, m))
    assert s2 == np.float32(2.0**m)
    with np.errstate(over="ignore"):
        nv, mx = nvfp4.dequantize(q, s, s2), mxfp4.dequantize(packed, e8m0)
    assert same_bits(nv, mx) and same_bits(nv, mx_ref(packed, e8m0))


@pytest.mark.parametrize("lo,hi,seed", [(110, 127, 0), (100, 117, 1), (1, 18, 2), (237, 254, 3), (127, 127, 4)])
def test_mx_to_nv_lossless_in_range(lo, hi, seed):
    packed, e8m0 = mx_source(40, 256, lo, hi, seed)
    e8m0[0, 0] = hi  # the top exponent is present
    q, s, s2, n = decode.mxfp4_to_nvfp4(packed, e8m0)
    m = max(hi - 127 - 8, -126)
    assert n == 0 and decode.mx_global_exponent(hi) == m
    assert_lossless(packed, e8m0, q, s, s2, m)
    assert np.count_nonzero((q & 15) == 8) > 0  # -0.0 nibbles were there, and kept


def test_mx_to_nv_byte_zero_and_tiny():
    """Byte 0 is 2^-127; a tensor whose bytes are all at the bottom keeps s2 = 2^-126 (normal) and
    every block fits."""
    packed, e8m0 = mx_source(8, 64, 0, 5, 6)
    e8m0[:, 0] = 0
    q, s, s2, n = decode.mxfp4_to_nvfp4(packed, e8m0)
    assert n == 0 and s2 == np.float32(2.0**-126)
    assert_lossless(packed, e8m0, q, s, s2, -126)
    q, s, s2, n = decode.mxfp4_to_nvfp4(packed, np.zeros_like(e8m0))
    assert n == 0 and s2 == np.float32(2.0**-126)
    assert_lossless(packed, np.zeros_like(e8m0), q, s, s2, -126)


def plant_out_of_range(packed, e8m0, top=130):
    """Top byte `top` at [0, 0]; live blocks 18, 19, 25 and 60 binades below and at byte 0; dead
    blocks (all +0, all -0.0) out of range and in range. Returns (live out-of-range, dead) masks."""
    e8m0[0, 0] = top
    live = [(1, 0, top - 18), (2, 1, top - 19), (3, 2, top - 25), (4, 3, top - 60), (5, 4, 0), (6, 5, top - 30)]
    for r, c, b in live:
        e8m0[r, c] = b
        packed[r, c * 16:(c + 1) * 16] |= 0x11  # every element non-zero
    dead = [(7, 0, top - 40, 0x00), (7, 1, top - 50, 0x88), (7, 2, top - 3, 0x88), (8, 3, 0, 0x80)]
    for r, c, b, byte in dead:
        e8m0[r, c] = b
        packed[r, c * 16:(c + 1) * 16] = byte
    oor = np.zeros(e8m0.shape, bool)
    for r, c, _ in live:
        oor[r, c] = True
    dead_oor = np.zeros(e8m0.shape, bool)
    for r, c, b, _ in dead:
        dead_oor[r, c] = b - top + 8 < -9
    return oor, dead_oor


def test_mx_to_nv_out_of_range_blocks_requantized():
    packed, e8m0 = mx_source(16, 192, 115, 130, 7)
    oor, dead_oor = plant_out_of_range(packed, e8m0)
    q, s, s2, n = decode.mxfp4_to_nvfp4(packed, e8m0)
    m = 130 - 127 - 8
    assert s2 == np.float32(2.0**m) and n == int(oor.sum()) == 6
    # the RTN path: formats/nvfp4.py's own Quantizer on the decoded values, whole tensor
    ref_q, ref_s = nvfp4.Quantizer(s2).quantize(mxfp4.dequantize(packed, e8m0), "F32", "w")
    b32 = np.repeat(oor, 16, axis=1)
    b2 = np.repeat(oor, 2, axis=1)
    assert np.array_equal(q[b32], ref_q[b32]) and np.array_equal(s[b2], ref_s[b2])
    assert (e4m3_f64(s[b2]) == 2.0**-9).all()  # clamped: all 18+ binades down
    # codes of the block 18 binades down are the source's halved (then rounded), not all zero
    assert np.any(q[1, 0:16] & 0x77)
    # every other block: codes copied, scale 2^(k - m) (dead out-of-range blocks: 1.0)
    keep = ~oor
    assert np.array_equal(q[np.repeat(keep, 16, axis=1)], packed[np.repeat(keep, 16, axis=1)])
    want = np.where(dead_oor, 1.0, np.ldexp(1.0, e8m0.astype(np.int64) - 127 - m))
    k2 = np.repeat(keep, 2, axis=1)
    assert np.array_equal(e4m3_f64(s)[k2], np.repeat(want, 2, axis=1)[k2])
    fits = ~(oor | dead_oor)
    nv, mx = nvfp4.dequantize(q, s, s2), mxfp4.dequantize(packed, e8m0)
    assert same_bits(nv[np.repeat(fits, 32, axis=1)], mx[np.repeat(fits, 32, axis=1)])
    dead32 = np.repeat(dead_oor, 32, axis=1)
    assert same_bits(nv[dead32], mx[dead32])  # +-0.0 exactly, signs kept
    assert np.array_equal(q[7, 16:32], np.full(16, 0x88, np.uint8))


def test_mx_to_nv_group_shares_s2():
    gate, gs = mx_source(24, 128, 104, 117, 8)  # all within 17 of the group's top, 121
    up, us = mx_source(24, 128, 90, 121, 9)
    gs[0, 0], us[0, 0] = 117, 121
    top = decode.e8m0_group_max([gs, us])
    s2, m = decode.nvfp4_global_scale_for_mx([gs, us])
    assert top == 121 and m == 121 - 127 - 8 and s2 == np.float32(2.0**m)
    gq, gsc, g2, gn = decode.mxfp4_to_nvfp4(gate, gs, top)
    uq, usc, u2, un = decode.mxfp4_to_nvfp4(up, us, top)
    assert g2 == u2 == s2
    assert_lossless(gate, gs, gq, gsc, g2, m)  # gate's own top is 117: its scales are 2^(k - m) <= 2^4
    assert e4m3_f64(gsc).max() <= 2.0**4
    assert un == int(np.count_nonzero(us < 121 - 17))  # up's low blocks (>= 90) partly fall out
    alone = decode.mxfp4_to_nvfp4(gate, gs)  # gate alone: another s2
    assert alone[2] == np.float32(2.0 ** (117 - 135)) and np.array_equal(alone[0], gate)
    with pytest.raises(ValueError, match="group_e8m0_max"):
        decode.mxfp4_to_nvfp4(up, us, 117)


def test_mx_to_nv_rows_independent():
    packed, e8m0 = mx_source(20, 192, 95, 130, 10)
    plant_out_of_range(packed, e8m0)
    q, s, s2, n = decode.mxfp4_to_nvfp4(packed, e8m0)
    parts = [decode.mxfp4_to_nvfp4(packed[a:b], e8m0[a:b], 130) for a, b in [(0, 3), (3, 11), (11, 20)]]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), q)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), s)
    assert sum(p[3] for p in parts) == n and all(p[2] == s2 for p in parts)


def test_mx_to_nv_nan_and_bad_shapes():
    packed, e8m0 = mx_source(4, 64, 120, 130, 11)
    e8m0[1, 1] = 255
    with pytest.raises(NumericError, match="255"):
        decode.mxfp4_to_nvfp4(packed, e8m0)
    with pytest.raises(NumericError, match="255"):
        decode.nvfp4_global_scale_for_mx([e8m0])
    with pytest.raises(ValueError, match="do not match"):
        decode.mxfp4_to_nvfp4(packed[:, :16], e8m0)


# ---------------------------------------------------------------------------------------------
# ModelOpt's closed-form cast


@pytest.fixture(scope="module")
def modelopt_cast():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its transformers-version warning
        from modelopt.torch.export.shard_cast_utils import mxfp4_kmax, quantize_mxfp4_to_nvfp4_lossless
    return mxfp4_kmax, quantize_mxfp4_to_nvfp4_lossless


@pytest.mark.parametrize("seed", range(3))
def test_mx_to_nv_equals_modelopt(modelopt_cast, seed):
    mxfp4_kmax, cast = modelopt_cast
    gate, gs = mx_source(32, 256, 95, 125, 20 + seed)
    up, us = mx_source(32, 256, 100, 131, 30 + seed)
    oor, dead_oor = plant_out_of_range(up, us, top=131)
    # ModelOpt's per-pair k_max (its build_w13_kmax_overrides): max of the two members'
    k_max = max(mxfp4_kmax(torch.from_numpy(gs)), mxfp4_kmax(torch.from_numpy(us)))
    top = decode.e8m0_group_max([gs, us])
    assert k_max == top - 127
    for packed, e8m0 in [(gate, gs), (up, us)]:
        q, s, s2, n = decode.mxfp4_to_nvfp4(packed, e8m0, top)
        mq, ms, ms2, n_total, n_lossless = cast(torch.from_numpy(packed), torch.from_numpy(e8m0), k_max, "cpu")
        mq, ms = mq.numpy(), ms.view(torch.uint8).numpy()
        assert float(ms2) == s2
        dead = (dead_oor if packed is up else np.zeros_like(dead_oor))
        live_s = ~np.repeat(dead, 2, axis=1)
        assert np.array_equal(ms[live_s], s[live_s])
        assert (e4m3_f64(ms[~live_s]) == 2.0**-9).all() and (e4m3_f64(s[~live_s]) == 1.0).all()
        a = np.stack([q & 15, q >> 4], -1).reshape(q.shape[0], -1, 32)  # nibbles per source block
        b = np.stack([mq & 15, mq >> 4], -1).reshape(q.shape[0], -1, 32)
        live = (np.stack([packed & 15, packed >> 4], -1).reshape(a.shape) & 7).any(axis=2)  # the source's
        rtn = live & (e8m0.astype(int) < top - 17)  # re-quantized by both: equal code for code
        assert rtn.sum() > 0 and np.array_equal(a[rtn], b[rtn])
        # copied blocks: equal, except -0.0 (nibble 8), which ModelOpt's re-cast of the decoded values
        # turns into +0
        differ = a[~rtn] != b[~rtn]
        assert differ.any() and (a[~rtn][differ] == 8).all() and (b[~rtn][differ] == 0).all()
        # its lossless count skips byte-0 blocks and counts dead ones by exponent; ours counts live blocks
        byte0_live = int(np.count_nonzero(rtn & (e8m0 == 0)))
        assert n_total - n_lossless == n - byte0_live + int(np.count_nonzero(dead & (e8m0 != 0)))
        assert n == int(rtn.sum())


# ---------------------------------------------------------------------------------------------
# gpt-oss


def test_gpt_oss_layout_and_gate_up_split():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    E, I2, H = 3, 12, 128  # [E, 2I, H/32, 16] blocks, as gate_up_proj_blocks
    rng = np.random.default_rng(40)
    blocks = rng.integers(0, 256, (E, I2, H // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 135, (E, I2, H // 32), dtype=np.uint8)  # within 17: all fit
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                     dtype=torch.float32)  # the model's [E, H, 2I]
    gate_ref, up_ref = ref[..., ::2], ref[..., 1::2]  # GptOssExperts._apply_gate
    for e in range(E):
        packed, e8m0 = decode.gpt_oss_expert(blocks, scales, e)
        assert packed.shape == (I2, H // 2) and e8m0.shape == (I2, H // 32)
        assert np.shares_memory(packed, blocks)
        whole = mxfp4.dequantize(packed, e8m0)
        assert same_bits(whole.T.copy(), ref[e].numpy())
        (gp, up), (gsc, usc) = decode.deinterleave_gate_up(packed), decode.deinterleave_gate_up(e8m0)
        assert same_bits(mxfp4.dequantize(gp, gsc).T.copy(), gate_ref[e].contiguous().numpy())
        assert same_bits(mxfp4.dequantize(up, usc).T.copy(), up_ref[e].contiguous().numpy())
        s2, m = decode.nvfp4_global_scale_for_mx([gsc, usc])
        top = decode.e8m0_group_max([gsc, usc])
        for p, sc in [(gp, gsc), (up, usc)]:
            q, s, t2, n = decode.mxfp4_to_nvfp4(p, sc, top)
            assert n == 0 and t2 == s2 and np.array_equal(q, p)
    bias = np.arange(I2, dtype=np.float32)
    g, u = decode.deinterleave_gate_up(bias)
    assert g.tolist() == list(range(0, I2, 2)) and u.tolist() == list(range(1, I2, 2))
    with pytest.raises(ValueError, match="odd"):
        decode.deinterleave_gate_up(bias[:5])
    with pytest.raises(ValueError, match="expected"):
        decode.gpt_oss_expert(blocks[..., :8], scales, 0)
