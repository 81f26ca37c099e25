"""Decoding quantized sources (issue 14 items 1 and 2): the arithmetic only, pure NumPy functions.

- Block FP8 (DeepSeek-V3/R1, Kimi-K2: `weight` F8_E4M3 + `weight_scale_inv` F32 [ceil(out/128),
  ceil(in/128)]; DeepSeek-V4: the same tiles with UE8M0 byte scales named `.scale`):
  value = E4M3(code) x tile scale, decoded whole or one band of rows at a time.
- MXFP4 -> NVFP4 without loss (DeepSeek-V4 and Kimi-K3 routed experts, gpt-oss experts): the E2M1
  codes are copied, each 16-element NVFP4 block takes the E4M3 scale 2^(k_j - m) of its 32-element
  source block (exponent k_j) and the quantizer's global scale is s2 = 2^m, so that
  E4M3 scale x s2 = 2^k_j, the source's own scale (ModelOpt 0.47's closed form).
- gpt-oss's 3-D `*_blocks` / `*_scales` layout and its interleaved gate/up rows.

docs/formats.md, "Quantized sources: decoding", states the arithmetic and where each layout fact
comes from (the layouts, ModelOpt's cast and transformers' gpt-oss code); comments here cite it.
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import NumericError
from .formats import mxfp4, nvfp4
from .formats.base import E4M3_MAX, E4M3_VALUES, e4m3_values, map_rows
from .text import show

FP8_TILE = (128, 128)  # DeepSeek-V3/V4 and Kimi-K2 `weight_block_size` (docs/formats.md 5.1 and "Quantized sources")
E8M0_BIAS = 127  # E8M0 byte b encodes 2^(b - 127); 255 is NaN (docs/formats.md section 8)
E8M0_NAN = 255
E4M3_KMIN, E4M3_KMAX = -9, 8  # E4M3 holds 2^d exactly for d in -9..8 (2^-9 its least subnormal)
M_MIN = -126  # s2 = 2^m stays a normal fp32 (formats/nvfp4.py global_scale keeps s2 normal too)
MX_BLOCK = mxfp4.BLOCK  # 32 elements, 16 packed bytes, per E8M0 byte
NV_BLOCK = nvfp4.BLOCK  # 16 elements per E4M3 scale
# E4M3 code of 2^d for d = -9..8, looked up in formats/base.py's table (positive codes 0..127 first).
POW2_E4M3 = np.array([np.flatnonzero(E4M3_VALUES[:128] == np.float32(2.0**d))[0]
                      for d in range(E4M3_KMIN, E4M3_KMAX + 1)], np.uint8)
ONE_E4M3 = POW2_E4M3[-E4M3_KMIN]  # 1.0 (0x38): formats/nvfp4.py block_scales gives zero blocks this scale


# ---------------------------------------------------------------------------------------------
# Block FP8


def e8m0_values(b: np.ndarray) -> np.ndarray:
    """fp32 2^(b - 127) of E8M0 bytes, exactly: byte 0 is 2^-127 (an fp32 subnormal), 255 NaN
    (OCP MX spec; formats/mxfp4.py scale_values decodes the same way)."""
    with np.errstate(over="ignore"):  # byte 255: ldexp overflows, then reads NaN
        return mxfp4.scale_values(np.asarray(b).view(np.uint8))


def _scale_values(scales: np.ndarray, scale_dtype: str) -> np.ndarray:
    if scale_dtype == "F32":
        return np.asarray(scales, np.float32)
    if scale_dtype in ("E8M0", "F8_E8M0", "U8"):
        return e8m0_values(np.asarray(scales).view(np.uint8))
    raise ValueError(f"block-fp8 scale dtype must be F32 or E8M0, not {scale_dtype!r}")


def _tile_grid(shape: tuple[int, int], scales: np.ndarray, block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scales.shape) != grid:
        raise ValueError(f"block-fp8 scales of shape {list(scales.shape)} do not tile a [{rows}, {cols}] "
                         f"weight in {block[0]}x{block[1]} tiles (expected {list(grid)})")
    return grid


def block_fp8_decode_rows(codes: np.ndarray, scales: np.ndarray, start: int, stop: int,
                          block: tuple[int, int] = FP8_TILE, scale_dtype: str = "F32") -> np.ndarray:
    """fp32 values of rows start..stop of a block-FP8 weight: E4M3(code) x the scale of its tile, one
    fp32 multiply per element (so with F32 scales exactly NumPy's correctly rounded float32 product,
    with E8M0 scales exact: a 4-bit significand times a power of two; products past fp32's range are
    Inf, as the float32 product is). `codes` is the whole [out, in] weight (uint8 or float8_e4m3fn
    storage; a memory map is read only in rows start..stop); `scales` the whole tile grid
    [ceil(out/bh), ceil(in/bw)], F32 values or E8M0 bytes. Edge tiles are simply cropped.

    Decoding is faithful: E4M3 NaN codes (0x7F, 0xFF) and E8M0 byte 255 give NaN, which every
    quantizer then refuses (formats/base.py check_finite); -0.0 stays -0.0."""
    rows, cols = codes.shape
    _tile_grid((rows, cols), scales, block)
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"row band {start}..{stop} outside a weight of {rows} rows")
    s = _scale_values(scales, scale_dtype)
    bh, bw = block
    out = np.empty((stop - start, cols), np.float32)

    def band(a: int, b: int) -> None:  # output rows a..b, source rows start + a .. start + b
        r = np.arange(start + a, start + b) // bh
        per_elem = np.repeat(s[r], bw, axis=1)[:, :cols]
        with np.errstate(over="ignore", invalid="ignore"):  # Inf past fp32, NaN codes: kept as such
            np.multiply(e4m3_values(np.ascontiguousarray(codes[start + a:start + b])), per_elem, out=out[a:b])

    map_rows(band, stop - start, cols * 4)
    return out


def block_fp8_decode(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int] = FP8_TILE,
                     scale_dtype: str = "F32") -> np.ndarray:
    """fp32 [out, in] values of a whole block-FP8 weight (block_fp8_decode_rows over every row)."""
    return block_fp8_decode_rows(codes, scales, 0, codes.shape[0], block, scale_dtype)


def block_fp8_amax_bound(scales: np.ndarray, scale_dtype: str = "F32") -> float:
    """An upper bound of max |value| over a block-FP8 weight, from its scales alone: every finite
    E4M3 code is at most 448 in magnitude, so a tile's decoded values fl32(code x scale) are at most
    fl32(448 x scale) (rounding is monotone; the float64 product could be one fp32 ulp short of it).
    Inf past fp32's range, NaN if a scale is NaN; 0.0 for an empty grid.

    The bound is what the scales know, not the amax: NVFP4's s2 = amax / 2688 needs the exact amax
    of the decoded values (formats/nvfp4.py global_scale), and a tile whose largest code is below 448
    makes the bound loose. block_fp8_amax gets the exact value reading only the tiles that can hold it."""
    s = _scale_values(scales, scale_dtype)
    if s.size == 0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(np.float32(E4M3_MAX) * np.max(np.abs(s)))


def block_fp8_amax(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int] = FP8_TILE,
                   scale_dtype: str = "F32") -> np.float32:
    """Exact max |value| (fp32) of a block-FP8 weight, reading the codes of as few tiles as the scales
    allow: tiles in order of falling scale, stopping at the first whose bound 448 x scale cannot beat
    the largest value already found (for a source quantized with scale = tile amax / 448 that is
    usually after one tile). Tiles never read may hold NaN codes: the quantize pass, which reads
    every tile, refuses those (formats/base.py check_finite); a NaN scale is refused here."""
    rows, cols = codes.shape
    gh, gw = _tile_grid((rows, cols), scales, block)
    s = np.abs(_scale_values(scales, scale_dtype)).reshape(-1)
    if np.isnan(s).any():
        raise NumericError("a block-fp8 scale is NaN (E8M0 byte 255); cannot decode it")
    bh, bw = block
    best = np.float32(0)
    for t in np.argsort(-s, kind="stable"):
        with np.errstate(over="ignore"):
            if np.float32(E4M3_MAX) * s[t] <= best:  # fl32(448 s) bounds every fl32(code x s) of the tile
                break
        i, j = divmod(int(t), gw)
        tile = e4m3_values(np.ascontiguousarray(codes[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]))
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.max(np.abs(tile)) * s[t]  # fp32, as the decoded value's own product rounds
        if np.isnan(v):
            raise NumericError("a block-fp8 tile holds a NaN code (0x7F or 0xFF); cannot quantize it")
        best = max(best, np.float32(v))
    return np.float32(best)


# ---------------------------------------------------------------------------------------------
# MXFP4 -> NVFP4


def _check_e8m0(e8m0: np.ndarray, name: str, top: int | None = None) -> None:
    """NumericError on a byte 255 (NaN). `top`: the array's largest byte when the caller has it (255
    is the largest byte: only then is the array counted)."""
    top = (int(e8m0.max()) if e8m0.size else 0) if top is None else top
    if top == E8M0_NAN:
        bad = int(np.count_nonzero(e8m0 == E8M0_NAN))
        raise NumericError(f"tensor {show(name)} has {bad} MX block scale(s) of byte 255 (NaN); cannot convert it")


def e8m0_group_max(e8m0_arrays: list[np.ndarray], name: str = "weight") -> int:
    """Largest E8M0 byte over the members of one logical quantizer, read from the scale tensors alone
    (1/16 of the bytes of the codes): every tensor's max, so a plan can find it before any code is
    read. Byte 255 (NaN) is refused. 0 for a group without blocks."""
    top = 0
    for b in e8m0_arrays:
        b = np.asarray(b).view(np.uint8)
        if b.size:
            own = int(b.max())
            _check_e8m0(b, name, own)
            top = max(top, own)
    return top


def mx_global_exponent(group_e8m0_max: int) -> int:
    """m of s2 = 2^m for a group whose largest E8M0 byte is b: m = (b - 127) - 8, which puts the
    group's largest block at E4M3 scale 2^8 (the largest power of two E4M3 holds), no higher, raised
    to -126 when lower so that s2 stays a normal fp32 (then every block of the group fits).

    Block j fits iff -9 <= k_j - m <= 8. For every m >= k_max - 8 the blocks that fit are those with
    k_j >= m - 9, most of them at m = k_max - 8. A lower m would fit blocks further down only by
    pushing the group's largest blocks past 2^8: re-quantized, their scales saturate at 448 and the
    group's largest weights are re-rounded or clipped (6 x 2^(m + 9) > 6 x 448 x 2^m), while the
    blocks it would gain are 2^-17 or less of the group's largest; so m = k_max - 8 fits the most
    blocks of any m that leaves the largest blocks exact. It is ModelOpt 0.47's closed form
    (docs/formats.md "Quantized sources: decoding"; tests/test_decode.py compares with it)."""
    return max(int(group_e8m0_max) - E8M0_BIAS - E4M3_KMAX, M_MIN)


def nvfp4_global_scale_for_mx(e8m0_arrays: list[np.ndarray], name: str = "weight") -> tuple[np.float32, int]:
    """(s2, m) of one logical quantizer from its members' E8M0 scale tensors: s2 = 2^m exactly, m from
    mx_global_exponent. Pass the same m's group byte (e8m0_group_max) to mxfp4_to_nvfp4 for each member.
    In the pipeline's terms this s2 is global_scale(amax) of amax = 2688 x 2^m (the division is exact)."""
    m = mx_global_exponent(e8m0_group_max(e8m0_arrays, name))
    return np.float32(np.ldexp(np.float32(1), m)), m


@functools.lru_cache(maxsize=64)
def _cast_table(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source E8M0 byte b, for the global exponent m: the E4M3 code of 2^(b - 127 - m) (ONE_E4M3
    where that is out of range) twice, one per 16-element half, in a uint16, so one gather gives a
    weight's scales; and whether it is in range. Hand-written rather than arithmetic per block: the
    cast is the whole work of an MXFP4 source (docs/benchmarks/README.md), and a group's members
    share m, so the table is made once per group."""
    d = np.arange(256) - (E8M0_BIAS + m)
    fit = (d >= E4M3_KMIN) & (d <= E4M3_KMAX)
    code = np.where(fit, POW2_E4M3[np.clip(d, E4M3_KMIN, E4M3_KMAX) - E4M3_KMIN], ONE_E4M3).astype(np.uint16)
    pair = code * np.uint16(0x0101)
    pair.setflags(write=False)
    fit.setflags(write=False)
    return pair, fit


def mxfp4_to_nvfp4(packed: np.ndarray, e8m0: np.ndarray, group_e8m0_max: int | None = None,
                   name: str = "weight") -> tuple[np.ndarray, np.ndarray, np.float32, int]:
    """Cast one MXFP4 weight (packed E2M1 uint8 [out, in/2], low nibble first; E8M0 bytes [out, in/32])
    to NVFP4: (packed uint8 [out, in/2], E4M3 scale codes uint8 [out, in/16], s2, requant_blocks).

    group_e8m0_max is the largest E8M0 byte of the logical quantizer the weight belongs to (gate and
    up of one expert, or every expert of a layer: e8m0_group_max over the members), None for a weight
    that is its own quantizer. It must be at least this weight's own largest byte (ValueError if not).
    s2 = 2^m, m = mx_global_exponent(group_e8m0_max). Per 32-element source block j, k_j = byte - 127:
    - -9 <= k_j - m <= 8: both 16-element halves take E4M3 scale 2^(k_j - m), the 16 packed bytes are
      copied; E4M3 scale x s2 = 2^k_j, so nvfp4.dequantize equals mxfp4.dequantize bit for bit.
    - out of that range and dead (every code +-0): bytes copied (-0.0 nibbles kept), scale 1.0 as
      formats/nvfp4.py block_scales gives a zero block; exact, not counted.
    - out of range and live: re-quantized from its decoded fp32 values by nvfp4.Quantizer(s2), the
      converter's own RTN arithmetic (block scale from each 16-element half's amax, clamped to
      [2^-9, 448]); counted in requant_blocks (32-element source blocks). With m >= k_max - 8 these
      are blocks 18 or more binades below the group's largest (k_j <= m - 10): their scales clamp to
      2^-9, so their codes are the source codes divided by 2^(m - 9 - k_j) >= 2, rounded.
    Byte 0 decodes as 2^-127 (OCP MX; formats/mxfp4.py scale_values), an ordinary exponent here; a
    writer using it for zero blocks (compressed-tensors) gives dead blocks, exact whatever m is.
    Byte 255 (NaN) is refused (NumericError). Rows are independent: a band of rows converted with the
    same group_e8m0_max gives the same band of the whole result."""
    packed = np.asarray(packed).view(np.uint8)
    e8m0 = np.asarray(e8m0).view(np.uint8)
    rows, half = packed.shape
    nb = e8m0.shape[1] if e8m0.ndim == 2 else -1
    if e8m0.shape[0] != rows or half != nb * (MX_BLOCK // 2):
        raise ValueError(f"MXFP4 {show(name)}: packed {list(packed.shape)} and scales {list(e8m0.shape)} "
                         f"do not match (expected scales [{rows}, {half * 2 // MX_BLOCK}])")
    own = int(e8m0.max()) if e8m0.size else 0
    _check_e8m0(e8m0, name, own)
    gmax = own if group_e8m0_max is None else int(group_e8m0_max)
    if gmax < own:
        raise ValueError(f"group_e8m0_max {gmax} is below the largest block byte {own} of {show(name)}: "
                         "the group's maximum must cover every member")
    m = mx_global_exponent(gmax)
    s2 = np.float32(np.ldexp(np.float32(1), m))
    pair, fit = _cast_table(m)
    scales = pair[e8m0].view(np.uint8).reshape(rows, nb * (MX_BLOCK // NV_BLOCK))
    if not e8m0.size or fit[int(e8m0.min())]:  # every byte between the least and the largest fits
        return np.ascontiguousarray(packed), scales, s2, 0
    fits = fit[e8m0]
    out = np.array(packed, np.uint8, copy=True, order="C")
    r, c = np.nonzero(~fits)
    if r.size == 0:
        return out, scales, s2, 0
    blocks = out.reshape(rows, nb, MX_BLOCK // 2)
    live = (blocks[r, c] & 0x77).any(axis=1)  # a non-zero magnitude nibble (0x8 is -0.0)
    r, c = r[live], c[live]
    if r.size:
        src = blocks[r, c]  # [n, 16] packed bytes of the live out-of-range blocks
        values = mxfp4.dequantize(src, e8m0[r, c][:, None])  # [n, 32] fp32, exact
        q, s = nvfp4.Quantizer(s2).quantize(values, "F32", name)
        blocks[r, c] = q
        scales.reshape(rows, nb, MX_BLOCK // NV_BLOCK)[r, c] = s
    return out, scales, s2, int(r.size)


# ---------------------------------------------------------------------------------------------
# gpt-oss layout


def gpt_oss_expert(blocks: np.ndarray, scales: np.ndarray, expert: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert of gpt-oss's `*_blocks` U8 [E, rows, in/32, 16] and `*_scales` U8 [E, rows, in/32]
    as a 2-D MXFP4 weight: (packed [rows, in/2], E8M0 bytes [rows, in/32]); views, no copy, of
    contiguous inputs. The 16 bytes of block g hold elements 32g..32g+31, low nibble first, and the
    rows are output features (transformers' own dequantizer decodes [E, rows, in] and transposes it
    to the model's [E, in, rows]: docs/formats.md "Quantized sources: decoding", "gpt-oss layout")."""
    if blocks.ndim != 4 or blocks.shape[3] != MX_BLOCK // 2 or blocks.shape[:3] != scales.shape:
        raise ValueError(f"gpt-oss blocks {list(blocks.shape)} and scales {list(scales.shape)}: "
                         "expected [E, rows, in/32, 16] and [E, rows, in/32]")
    e, rows, nb, _ = blocks.shape
    return blocks[expert].reshape(rows, nb * (MX_BLOCK // 2)), scales[expert]


def deinterleave_gate_up(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gate, up) of gpt-oss's fused gate_up along axis 0 (an expert's packed rows, scale rows or
    bias): gate = rows 0, 2, 4, ..., up = rows 1, 3, 5, ... (transformers' GptOssExperts splits its
    output features `gate_up[..., ::2]`, `gate_up[..., 1::2]`: docs/formats.md "Quantized sources:
    decoding", "gpt-oss layout"; tests/test_decode.py checks it against transformers' dequantizer).
    Strided views: copy before writing."""
    if x.shape[0] % 2:
        raise ValueError(f"gpt-oss gate_up has an odd number of rows ({x.shape[0]})")
    return x[0::2], x[1::2]


# ---------------------------------------------------------------------------------------------
# The cast's per-quantizer record (shardquant/pipeline.py, manifest "cast", verify)

E2M1_MAX = 6.0  # the largest E2M1 magnitude


def mx_cast_amax(group_e8m0_max: int) -> np.float32:
    """The amax a cast records for its quantizer: 6 x 2^(b - 127) for the group's largest E8M0 byte b,
    the largest value its scales allow (max |W| is at most this, and equal where a block of that
    exponent holds a +-6 code). Known from the scale tensors alone, before any code is read."""
    return np.float32(np.ldexp(np.float32(E2M1_MAX), int(group_e8m0_max) - E8M0_BIAS))


def mx_cast_global_scale(amax: np.float32) -> np.float32:
    """s2 = 2^m of a cast whose recorded amax is mx_cast_amax(b): m = mx_global_exponent(b)."""
    k = int(np.round(np.log2(np.float64(amax) / E2M1_MAX)))
    return np.float32(np.ldexp(np.float32(1), mx_global_exponent(k + E8M0_BIAS)))


def mx_cast_record_ok(amax: float, global_scale: float) -> bool:
    """A manifest's cast quantizer: amax is 6 x a power of two and the global scale is the one the
    cast derives from it."""
    a = np.float32(amax)
    if not (np.isfinite(a) and a > 0):
        return False
    k = np.log2(np.float64(a) / E2M1_MAX)
    return bool(k == np.round(k)) and mx_cast_global_scale(a) == np.float32(global_scale)
