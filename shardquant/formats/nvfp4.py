"""NVFP4 weights: E2M1 elements in 16-element blocks along the input dim, an E4M3 scale per block
and one fp32 global scale (`weight_scale_2`) per logical quantizer.

Matches ModelOpt 0.47 `NVFP4QTensor.quantize` run on the CPU, bit for bit: every fp32 operation is a
correctly rounded NumPy operation in ModelOpt's order (FORMATS.md section 2).
"""

from __future__ import annotations

import threading

import numpy as np

from .base import e4m3_dtype, e4m3_values, E2M1_MAX, E4M3_MAX, E4M3_MIN_SCALE, Format, block_scales_of, map_rows, to_f32

# docs/formats.md, "nvfp4": weight-only NVFP4 says W4A16_NVFP4 (an `NVFP4` checkpoint without
# input_scale made older vLLM zero every expert); compressed-tensors' tensor_group strategy.
FORMAT = Format(
    name="nvfp4", element="E2M1", num_bits=4, weight_dtype="U8", elems_per_byte=2, granularity="group",
    block_size=16, scale_dtype="F8_E4M3", global_scale=True, activations="none",
    modelopt={"quant_algo": "W4A16_NVFP4", "group_size": 16},
    compressed_tensors={
        "format": "nvfp4-pack-quantized",
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                    "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"},
        "input_activations": None,
        "tensor_scale": "tensor",
    },
    refused={"block-fp8": "the block-fp8 flavor (quant_method fp8) spells only FP8 weights with 128x128 tile "
                          "scales; use --flavor modelopt or compressed-tensors, or --format fp8-block"},
    reads={"modelopt": ("NVFP4", "W4A16_NVFP4", "NVFP4_AWQ"), "compressed-tensors": ("nvfp4-pack-quantized",)},
    min_sqnr=10.0,
    max_scaled=6.0 * 448.0,
    kernel="nvfp4",
    scale_search=("mse",),
)
BLOCK = 16
# E2M1 magnitudes by code 0..7; code | 8 is the negative.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
# The two E2M1 values of every packed byte (low nibble first; code | 8 is the negative, -0.0 included).
_SIGNED = np.concatenate([E2M1_VALUES, -E2M1_VALUES])
PAIR_VALUES = np.stack([_SIGNED[np.arange(256) & 15], _SIGNED[np.arange(256) >> 4]], axis=1).astype(np.float32)
# Rounding bounds between neighbouring magnitudes. A value equal to a bound in _TIE_UP rounds up
# (to the even code), equal to any other bound rounds down: ModelOpt's searchsorted + odd-bound rule.
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)
FLT_MIN = np.finfo(np.float32).tiny  # smallest normal fp32, 2^-126


def _magnitude_code(v: float) -> int:
    return sum(v > b or (v == b and b in _TIE_UP) for b in _BOUNDS)


def _key_table() -> np.ndarray:
    """FP4 magnitude code for every 12-bit key = (fp32 exponent, top 3 mantissa bits, sticky bit).
    Every bound has at most 2 mantissa bits, so the key alone decides each comparison exactly."""
    keys = np.arange(1 << 12, dtype=np.uint32)
    rep = ((keys >> 1) << 20) | (keys & 1)  # a representative fp32 bit pattern of each class
    vals = rep.view(np.float32)
    return np.array([7 if not np.isfinite(v) else _magnitude_code(float(v)) for v in vals], np.uint8)


_KEY_CODE = _key_table()


def fp4_codes(x: np.ndarray) -> np.ndarray:
    """E2M1 codes of fp32 values (sign bit 8 set for x < 0, so -0.0 gives 0 and a negative value
    that rounds to zero gives 8, as ModelOpt's `_cast_fp4`); magnitudes above 5 saturate to 6."""
    mag = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    key = ((mag >> 20) << 1) | ((mag & np.uint32(0xFFFFF)) != 0)
    codes = _KEY_CODE[key]
    codes |= (x < 0).view(np.uint8) << 3
    return codes


def code_thresholds(s2: np.float32) -> np.ndarray:
    """For each E4M3 block-scale code c (rows 0..127) and d = f32(scale_c) * s2: the smallest
    non-negative fp32 magnitudes |w| at which fl(|w| / d) passes each FP4 bound (columns 0..6, in
    _BOUNDS order, with _TIE_UP bounds passed at equality), and at which it is non-zero (column 7).
    So code(w) = #{i < 7 : |w| >= t_i}, plus 8 when w < 0 and |w| >= t_7, exactly the code of the
    correctly rounded quotient, with no division per element (the GPU kernel uses this table).

    fl(w / d) never decreases as w grows, so the threshold is the first passing bit pattern. It lies
    within a few units in the last place of fl(bound x d): each entry looks in a window around that
    product (one correctly rounded division per candidate) and is accepted only when the window's
    first pattern fails and a later one passes; any other entry (d zero, subnormal or infinite) is
    found by bisection over all patterns (_bisect_thresholds, the definition). One table per
    quantizer: the per-expert policy makes thousands, so it is computed in one pass, not 31."""
    d, bounds, strict = _threshold_inputs(s2)
    with np.errstate(all="ignore"):
        # column 7 (non-zero): fl(w / d) > 0 from w / d > 2^-150, half the least subnormal
        target = np.where(bounds == 0, 2.0**-150, bounds.astype(np.float64))
        centre = (target[None, :] * d[:, None].astype(np.float64)).astype(np.float32)
        start = centre.view(np.uint32).astype(np.int64) - _WINDOW // 2
        cand = np.clip(start[..., None] + np.arange(_WINDOW), 0, 0x7F800000)
        q = cand.astype(np.uint32).view(np.float32) / d[:, None, None]
        ok = np.where(strict[None, :, None], q > bounds[None, :, None], q >= bounds[None, :, None])
    first = ok.argmax(axis=2)
    # the window's first pattern fails, so every lower one does: its first passing one is the threshold
    found = ok.any(axis=2) & ~ok[..., 0]
    out = np.take_along_axis(cand, first[..., None], axis=2)[..., 0]
    # d NaN (E4M3 code 0x7F) or inf: no finite w passes (q is NaN or 0): inf, as bisection ends
    out[~np.isfinite(d)] = 0x7F800000
    found[~np.isfinite(d)] = True
    if not found.all():  # any other entry the window missed: by the definition
        r, c = np.nonzero(~found)
        out[r, c] = _bisect_thresholds(d[r], bounds[c], strict[c])
    return out.astype(np.uint32).view(np.float32)


_WINDOW = 16  # candidate bit patterns around fl(bound x d) (code_thresholds)


def _threshold_inputs(s2: np.float32):
    codes = np.arange(128, dtype=np.uint8)
    with np.errstate(over="ignore"):  # a huge s2 makes the largest scales inf: their thresholds are inf too
        d = scale_values(codes) * np.float32(s2)  # code 0 (scale 0) is never used: scales are >= 2^-9
    bounds = np.array(list(_BOUNDS) + [0.0], np.float32)
    strict = np.array([b not in _TIE_UP for b in _BOUNDS] + [True])
    return d, bounds, strict


def _bisect_thresholds(d: np.ndarray, bounds: np.ndarray, strict: np.ndarray) -> np.ndarray:
    """code_thresholds by bisection over every fp32 bit pattern, each step one correctly rounded
    division: the definition, as int64 patterns, one per (d, bound, strict) entry."""
    lo = np.zeros(np.shape(d), np.int64)  # invariant: pattern lo fails, hi passes (inf always passes)
    hi = np.full(np.shape(d), 0x7F800000, np.int64)
    with np.errstate(all="ignore"):
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            q = mid.astype(np.uint32).view(np.float32) / d
            ok = np.where(strict, q > bounds, q >= bounds)
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
    # pattern 0 (w == 0) never passes: fl(0/d) == 0 is below every bound and not > 0
    return hi


def global_scale(amax: np.float32) -> np.float32:
    """s2 = amax / (6 * 448), one correctly rounded fp32 division (ModelOpt on CPU).
    ModelOpt writes NaN for amax == 0; we write 1.0 (all codes 0, block scales 1.0). So too when
    s2 would be subnormal (amax < 2688 * 2^-126, about 3e-35: weights that are zero at this
    precision), which keeps every later scale and product a normal number."""
    s2 = np.float32(amax) / np.float32(E2M1_MAX * E4M3_MAX)
    return np.float32(1.0) if s2 < FLT_MIN else s2


def block_scales(bamax: np.ndarray, s2: np.float32) -> np.ndarray:
    """E4M3 block scales (as uint8 codes): bamax / (6 * s2), zero -> 1.0, clamped to [2^-9, 448]."""
    t = np.float32(E2M1_MAX) * np.float32(s2)
    with np.errstate(over="ignore", invalid="ignore"):  # a tiny or zero s2: inf or NaN, as ModelOpt
        s = bamax / t
    s[s == 0] = 1.0
    np.clip(s, E4M3_MIN_SCALE, E4M3_MAX, out=s)
    return s.astype(e4m3_dtype()).view(np.uint8)


# --scale-search mse: the E4M3 block-scale codes tried around round-to-nearest's, in order of
# preference (a tie keeps the earlier: RTN's own first); positive E4M3 codes are ordered by value.
SEARCH_STEPS = (0, -1, 1, -2, 2)
_CODE_MIN, _CODE_MAX = 1, 0x7E  # 2^-9 and 448: the clamp of block_scales


def block_sse(x: np.ndarray, codes: np.ndarray, s2: np.float32) -> np.ndarray:
    """Squared reconstruction error of each 16-element block of fp32 `x` [rows, nb, 16] under E4M3
    block-scale `codes` [rows, nb]: the codes quantize_block would write, dequantized in its order
    (value x (scale x s2), fp32), then sum over the block of (x - deq)^2 in float64, element 0 to 15
    in turn (a fixed order, so every backend sums alike)."""
    d = scale_values(codes) * np.float32(s2)
    with np.errstate(over="ignore"):
        q = fp4_codes(x / d[..., None])
    deq = _SIGNED[q] * d[..., None]
    e = x.astype(np.float64) - deq.astype(np.float64)
    e *= e
    total = e[..., 0].copy()
    for j in range(1, BLOCK):
        total += e[..., j]
    return total


def search_scales(x: np.ndarray, rtn: np.ndarray, s2: np.float32) -> np.ndarray:
    """Per block, the E4M3 scale code among RTN's and its neighbours (SEARCH_STEPS) with the least
    squared error over the block's own values; ties keep the earlier candidate, so a block no
    neighbour improves keeps RTN's code (zero blocks, exact blocks)."""
    best = rtn.copy()
    err = block_sse(x, rtn, s2)
    wide = rtn.astype(np.int16)
    for step in SEARCH_STEPS[1:]:
        cand = wide + step
        ok = (cand >= _CODE_MIN) & (cand <= _CODE_MAX)
        c = np.clip(cand, _CODE_MIN, _CODE_MAX).astype(np.uint8)
        e = block_sse(x, c, s2)
        better = ok & (e < err)
        best[better] = c[better]
        err[better] = e[better]
    return best


class Quantizer:
    """NVFP4 state of one logical quantizer: its s2, and for 16-bit inputs a lookup table
    code = LUT[block scale code][raw 16-bit value], filled lazily. Every LUT entry is computed by
    the same fp32 division as the direct path, so both give identical codes; a table pays off once a
    quantizer holds more elements than 65536 per distinct block scale. search "mse": each block's
    scale is search_scales' choice instead of round to nearest (--scale-search)."""

    def __init__(self, s2: np.float32, search: str = "none"):
        if search not in ("none",) + FORMAT.scale_search:
            raise ValueError(f"nvfp4 has no scale search {search!r}")
        self.search = search
        self.s2 = np.float32(s2)
        self._lut: dict[str, np.ndarray] = {}
        self._built: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _lut_rows(self, dtype: str, needed: np.ndarray) -> np.ndarray:
        with self._lock:
            if dtype not in self._lut:
                self._lut[dtype] = np.zeros((256, 1 << 16), np.uint8)
                self._built[dtype] = np.zeros(256, bool)
            lut, built = self._lut[dtype], self._built[dtype]
            todo = np.flatnonzero(needed & ~built)
            if todo.size:
                allv = np.arange(1 << 16, dtype=np.uint16)
                f = to_f32(allv if dtype == "BF16" else allv.view(np.float16), dtype)
                d = scale_values(todo.astype(np.uint8)) * self.s2
                for code, dv in zip(todo, d):
                    with np.errstate(all="ignore"):  # NaN/Inf inputs are refused before lookup
                        lut[code] = fp4_codes(f / dv)
                built[todo] = True
            return lut

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(packed uint8 [out, in/2], E4M3 block-scale codes uint8 [out, in/16])."""
        rows, cols = raw.shape
        nb = cols // BLOCK
        scales = block_scales_of(raw, dtype, name, BLOCK, lambda bamax: block_scales(bamax, self.s2))
        if self.search == "mse":
            def search_rows(a: int, b: int) -> None:
                x = to_f32(raw[a:b], dtype).reshape(b - a, nb, BLOCK)
                scales[a:b] = search_scales(x, scales[a:b], self.s2)

            map_rows(search_rows, rows, raw.strides[0] if rows else 0)
        packed = np.empty((rows, cols // 2), np.uint8)
        needed = np.bincount(scales.reshape(-1), minlength=256) > 0
        lut = None
        if dtype in ("BF16", "F16") and raw.size >= (1 << 16) * int(needed.sum()) // 4:
            lut = self._lut_rows(dtype, needed).reshape(-1)
        u16 = raw.view(np.uint16) if lut is not None else None

        def code_rows(a: int, b: int) -> None:
            if lut is not None:
                idx = (scales[a:b].astype(np.uint32) << 16)[:, :, None] | u16[a:b].reshape(b - a, nb, BLOCK)
                codes = lut.take(idx).reshape(b - a, cols)
            else:
                d = scale_values(scales[a:b]) * self.s2
                with np.errstate(over="ignore"):  # |x| past 6 saturates, inf included
                    x = to_f32(raw[a:b], dtype).reshape(b - a, nb, BLOCK) / d[:, :, None]
                codes = fp4_codes(x).reshape(b - a, cols)
            packed[a:b] = codes[:, 0::2] | (codes[:, 1::2] << 4)

        map_rows(code_rows, rows, raw.strides[0] if rows else 0)
        return packed, scales


def scale_values(codes: np.ndarray) -> np.ndarray:
    """fp32 values of E4M3 codes."""
    return e4m3_values(codes)


def quantize(raw: np.ndarray, dtype: str, s2: np.float32, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """One tensor against a given s2 (the quantizer's): (packed uint8, E4M3 scale codes)."""
    return Quantizer(s2).quantize(raw, dtype, name)


def dequantize(packed: np.ndarray, scales: np.ndarray, s2: np.float32) -> np.ndarray:
    """fp32 weights back: E2M1 value * (E4M3 scale * s2), ModelOpt's dequantize order."""
    vals = PAIR_VALUES.view(np.uint64)[:, 0].take(packed).view(np.float32)  # one 8-byte gather per byte
    per_block = scale_values(scales) * np.float32(s2)
    return (vals.reshape(*scales.shape, BLOCK) * per_block[..., None]).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32) -> np.ndarray:
    """fp32 weights from the stored tensors (packed codes, E4M3 block scales) and s2."""
    return dequantize(weight, scale, per_quantizer)
